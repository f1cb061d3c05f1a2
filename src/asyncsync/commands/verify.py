"""`verify`: does the bucket hold what the local tree has? One listing, answered per file.

SRC is walked as push walks it (the same scanner, filters, symlink policy and state-directory
exclusion) and compared with one listing of ``PREFIX/`` (key, size, ETag). A file whose stat
matches its manifest row and whose object still has the ETag the manifest recorded is proven
by the manifest alone: no HEAD, no read. Any other object is HEADed (``--workers`` at once)
and its ``xxh128`` metadata compared with the file's digest: the manifest's while the file's
stat is unchanged, else a fresh hash (through the same no-follow opens push reads by). A gzip
object's size is the ``asyncsync-size`` of its metadata, not the listed (compressed) one.
``--deep`` trusts no metadata: every object is read back (large ones in parallel ranges,
bounded by ``--max-memory``), gzip bodies decoded, and its content digest compared. Objects
with no local file are reported, never deleted; ``PREFIX/_asyncsync/`` holds asyncsync's own
records and is not compared. The manifest is opened read-only, so verify runs beside a watch
daemon that holds it; without one, every file is hashed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from ..config import (
    MiB,
    PushConfig,
    check_destination_outside,
    default_state_dir,
    parse_destination,
    store_config_for_workers,
    validate_source,
)
from ..errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    FatalStoreError,
    NotFound,
    ObjectChanged,
    SourceChanged,
    SourceNotRegular,
    SourceVanished,
    StoreError,
    TransientStoreError,
    first_error,
)
from ..names import printable
from ..options import Settings
from ..pipeline.budget import ByteBudget
from ..pipeline.digest import hash_chunk_for, hash_file
from ..pipeline.keys import InvalidKey, object_key
from ..pipeline.manifest import Manifest, ObjectRecord
from ..pipeline.readback import READ_CHUNK, ContentDigest
from ..pipeline.scan import ScanIssue, ScannedFile, scan_directories
from ..pipeline.session import ManifestUse, Pipeline, scan_options_for, scope_for
from ..report import human_bytes
from ..stores.protocol import META_DIGEST, META_SIZE, ObjectInfo, ObjectStore

log = logging.getLogger("asyncsync")

# --deep reads an object larger than one range in ranges of this size, several at once
# (fewer with a small --max-memory: at least four ranges fit in the budget).
RANGE_SIZE = 8 * MiB
RANGES_IN_FLIGHT = 8
# Keys below PREFIX/ that asyncsync writes itself (run.json, history copies, doctor probes).
OWN_RECORDS = "_asyncsync/"


def range_size_for(max_memory: int) -> int:
    """Bytes per ranged GET: 8 MiB, less where --max-memory could not hold four of them."""
    return max(READ_CHUNK, min(RANGE_SIZE, max_memory // 4 // MiB * MiB))


@dataclass(frozen=True)
class VerifyConfig:
    push: PushConfig  # SRC, DEST, state dir, store and filters, as push reads them
    workers: int
    max_memory: int
    deep: bool = False
    json: bool = False
    quiet: bool = False


def verify_config_from(settings: Settings, source: str | Path, destination: str) -> VerifyConfig:
    """SRC, DEST and validated settings -> the frozen config; the store's built as push's."""
    dest = parse_destination(destination)
    src = validate_source(Path(source))
    check_destination_outside(src, dest)
    workers, max_memory, deep = settings["workers"], settings["max_memory"], settings["deep"]
    # A HEAD per worker; with --deep also every range the byte budget lets be in flight.
    connections = workers + (max_memory // range_size_for(max_memory) if deep else 0)
    store = store_config_for_workers(settings, workers, connections)
    state_dir = (settings["state_dir"] or default_state_dir()).absolute()
    push = PushConfig(source=src, destination=dest, state_dir=state_dir, store=store,
                      include=settings["include"], exclude=settings["exclude"],
                      follow_symlinks=settings["follow_symlinks"])
    return VerifyConfig(push, workers=workers, max_memory=max_memory, deep=deep,
                        json=settings["json"], quiet=settings["quiet"])


# -- what is found ------------------------------------------------------------------------


class Kind(enum.Enum):
    MISSING = "missing"  # a local file with no object
    SIZE = "size"  # the object's (original) size is not the file's
    DIGEST = "digest"  # the object's digest (metadata, or content with --deep) is not the file's
    NO_DIGEST = "no-digest"  # the object carries no xxh128 metadata: nothing to compare with
    EXTRA = "extra"  # an object with no local file (reported, never deleted)
    ERROR = "error"  # could not be compared: the file unreadable, the object unreadable


@dataclass(frozen=True)
class Problem:
    kind: Kind
    path: str  # relative to SRC (for an extra object: its key below PREFIX/)
    key: str
    local: int | str | None  # the compared value on each side: a size or a digest
    remote: int | str | None
    message: str

    def line(self) -> str:
        return printable(f"{self.kind.value}: {self.path}: {self.message}")

    def as_json(self) -> dict[str, Any]:
        return {"type": "problem", "kind": self.kind.value, "path": self.path, "key": self.key,
                "local": self.local, "remote": self.remote, "message": self.message}


class Tally:
    """Counts what was checked and prints each problem as it is found (a line, or a JSON
    object, on stdout), then the summary (stderr; with --json a last object on stdout)."""

    def __init__(self, config: VerifyConfig, out: TextIO, err: TextIO) -> None:
        self.config = config
        self.out, self.err = out, err
        self.started = time.monotonic()
        self.files = 0
        self.matched = 0
        self.counts = dict.fromkeys(Kind, 0)
        self.heads = 0
        self.hashed = 0
        self.hashed_bytes = 0
        self.downloaded_bytes = 0
        self.retries = 0

    def problem(self, problem: Problem) -> None:
        self.counts[problem.kind] += 1
        text = (json.dumps(problem.as_json(), ensure_ascii=False) if self.config.json
                else problem.line())
        self.out.write(text + "\n")

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        self.retries += 1
        log.info("retry %d in %.2fs: %s", attempt, pause, printable(str(exc)))

    @property
    def problems(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {
            "type": "summary", "destination": self.config.push.destination.url,
            "files": self.files, "matched": self.matched,
            **{kind.value.replace("-", "_"): count for kind, count in self.counts.items()},
            "heads": self.heads, "hashed": self.hashed, "hashed_bytes": self.hashed_bytes,
            "downloaded_bytes": self.downloaded_bytes, "retries": self.retries,
            "deep": self.config.deep, "ok": self.problems == 0,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def finish(self) -> int:
        summary = self.summary()
        if self.config.json:
            self.out.write(json.dumps(summary, ensure_ascii=False) + "\n")
        self.out.flush()
        if not self.config.json and not self.config.quiet:
            found = ", ".join(f"{count} {kind.value}" for kind, count in self.counts.items()
                              if count)
            work = [f"{self.heads} HEAD", f"{self.hashed} hashed"]
            if self.config.deep:
                work.append(f"{human_bytes(self.downloaded_bytes)} read back")
            if self.retries:
                work.append(f"{self.retries} retries")
            verdict = f"{found}" if found else "everything matches"
            self.err.write(
                f"asyncsync: verify {printable(summary['destination'])}: {self.files} files,"
                f" {self.matched} match; {verdict} ({', '.join(work)};"
                f" {summary['seconds']:.1f}s)\n")
            self.err.flush()
        return EXIT_SOME_FAILED if self.problems else EXIT_OK


# -- one file against its object --------------------------------------------------------------


class Listed(NamedTuple):
    """An object as the listing showed it: all verify keeps of it (a prefix may hold
    millions), its stored size (compressed for a gzip body) and ETag."""

    size: int
    etag: str


def _bare(etag: str) -> str:
    return etag.strip('"')


@dataclass(frozen=True, slots=True)
class Local:
    """A scanned file, its key and its manifest row (None: not known to the manifest)."""

    file: ScannedFile
    key: str
    record: ObjectRecord | None

    @property
    def unchanged(self) -> bool:
        """The file is what the manifest row was made from: the row's digest is its digest."""
        file, record = self.file, self.record
        return record is not None and record.same_stat(file.path, file.size, file.mtime_ns,
                                                       file.inode)

    def recorded(self, listed: Listed) -> ObjectRecord | None:
        """The manifest row, if the object is still the version it recorded."""
        record = self.record
        if (record is not None and _bare(record.etag) == _bare(listed.etag)
                and listed.size == record.object_size):
            return record
        return None

    def proven_by_manifest(self, listed: Listed) -> bool:
        """Unchanged, and the object is still the version the manifest recorded."""
        return self.unchanged and self.recorded(listed) is not None


@dataclass(frozen=True, slots=True)
class Remote:
    """What the bucket says an object holds: its original size and digest (None: unknown)."""

    size: int | None
    digest: str | None

    @classmethod
    def of(cls, info: ObjectInfo) -> Remote:
        """From a HEAD: a gzip body's size is the compressed one; the original's is kept in
        the metadata."""
        size: int | None = info.size
        if (info.content_encoding or "").lower() == "gzip":
            try:
                size = int(info.metadata.get(META_SIZE, ""))
            except ValueError:
                size = None
        return cls(size, info.metadata.get(META_DIGEST) or None)


class Verifier:
    """Compares files with their objects: inline where the manifest proves the object, in a
    task (one of ``--workers``) where a HEAD, a hash or a download is needed."""

    def __init__(self, config: VerifyConfig, store: ObjectStore, tally: Tally) -> None:
        self.config = config
        self.store = store
        self.tally = tally
        self.budget = ByteBudget(config.max_memory)
        self.range_size = range_size_for(config.max_memory)
        self.window = max(1, min(RANGES_IN_FLIGHT, config.max_memory // self.range_size))

    def report(self, local: Local, kind: Kind, local_value: int | str | None,
               remote_value: int | str | None, message: str) -> None:
        self.tally.problem(Problem(kind, local.file.relative, local.key, local_value,
                                   remote_value, message))

    async def check(self, local: Local, listed: Listed) -> None:
        """One file against its listed object; whatever goes wrong with this file alone is
        a problem of this file, a store that refuses us altogether ends the run."""
        try:
            if self.config.deep:
                await self._check_content(local, listed)
            else:
                await self._check_metadata(local, listed)
        except FatalStoreError:
            raise
        except (SourceVanished, SourceNotRegular, SourceChanged) as exc:
            self.report(local, Kind.ERROR, None, None, f"cannot read the file: {exc}")
        except OSError as exc:
            self.report(local, Kind.ERROR, None, None,
                        f"cannot read the file: {exc.strerror or exc}")
        except NotFound:
            self.report(local, Kind.MISSING, local.file.size, None,
                        f"no object {local.key} (deleted since the listing)")
        except ObjectChanged:
            self.report(local, Kind.ERROR, None, None,
                        "the object was replaced while it was verified; run again")
        except zlib.error as exc:
            self.report(local, Kind.DIGEST, None, None,
                        f"the object's gzip body does not decode ({exc})")
        except StoreError as exc:
            self.report(local, Kind.ERROR, None, None, f"cannot read the object: {exc}")

    async def _check_metadata(self, local: Local, listed: Listed) -> None:
        record = local.recorded(listed)
        if record is not None:  # the version the manifest recorded: its row says what it holds
            remote = Remote(record.size, record.digest)
        else:
            head = await self.store.head_object(local.key)
            self.tally.heads += 1
            if head is None:
                raise NotFound(local.key)
            remote = Remote.of(head)
        if remote.size is not None and remote.size != local.file.size:
            self._size_differs(local, remote.size)
            return
        if remote.digest is None:
            self.report(local, Kind.NO_DIGEST, None, None,
                        "the object has no xxh128 metadata: not written by asyncsync push?"
                        " (--deep compares its content)")
            return
        size, digest = await self.local_digest(local)
        if remote.size is not None and size != remote.size:  # it changed since the scan
            self._size_differs(local, remote.size, size)
        elif digest != remote.digest:
            self._digest_differs(local, digest, remote.digest, "its xxh128 metadata")
        else:
            self.tally.matched += 1

    async def _check_content(self, local: Local, listed: Listed) -> None:
        content_digest, content_size, metadata = await self.read_back(local.key, listed)
        if content_size != local.file.size:
            self._size_differs(local, content_size)
            return
        size, digest = await self.local_digest(local)
        if size != content_size:
            self._size_differs(local, content_size, size)
        elif digest != content_digest:
            self._digest_differs(local, digest, content_digest, "its content")
        elif not metadata.get(META_DIGEST):
            self.report(local, Kind.NO_DIGEST, digest, None,
                        "the content matches, but the object has no xxh128 metadata")
        elif metadata[META_DIGEST] != content_digest:
            self.report(local, Kind.DIGEST, digest, metadata[META_DIGEST],
                        f"the content matches, but the object's xxh128 metadata is"
                        f" {metadata[META_DIGEST]}")
        else:
            self.tally.matched += 1

    def _size_differs(self, local: Local, remote: int, size: int | None = None) -> None:
        size = local.file.size if size is None else size
        self.report(local, Kind.SIZE, size, remote,
                    f"the file has {size} bytes, the object {remote}")

    def _digest_differs(self, local: Local, digest: str, remote: str, where: str) -> None:
        self.report(local, Kind.DIGEST, digest, remote,
                    f"the file's xxh128 is {digest}, {where} {remote}")

    async def local_digest(self, local: Local) -> tuple[int, str]:
        """The file's size and digest: the manifest's while its stat is the row's, else read
        and hashed now (in a worker thread, its buffer paid for from the byte budget)."""
        record = local.record
        if record is not None and local.unchanged:
            return record.size, record.digest
        chunk = hash_chunk_for(local.file.size)
        grant = await self.budget.acquire(chunk)
        try:
            digest, identity = await asyncio.to_thread(hash_file, local.file, chunk)
        finally:
            self.budget.release(grant)
        self.tally.hashed += 1
        self.tally.hashed_bytes += identity.size
        return identity.size, digest

    # -- --deep: the object read back -------------------------------------------------------

    async def read_back(self, key: str, listed: Listed) -> tuple[str, int, dict[str, str]]:
        """The content digest and size of the listed version of ``key`` (a gzip body
        decoded), and its metadata. Every request is pinned to the listed ETag."""
        if listed.size <= self.range_size:
            return await self._read_whole(key, listed)
        return await self._read_ranges(key, listed)

    async def _read_whole(self, key: str, listed: Listed) -> tuple[str, int, dict[str, str]]:
        grant = await self.budget.acquire(READ_CHUNK)  # one chunk held at a time
        try:
            async with self.store.get_object(key, if_match=listed.etag,
                                             chunk_size=READ_CHUNK) as body:
                content = ContentDigest(body.info.content_encoding)
                metadata = dict(body.info.metadata)
                async for chunk in body:
                    self.tally.downloaded_bytes += len(chunk)
                    content.feed(chunk)
            digest, size = content.finish()
        finally:
            self.budget.release(grant)
        return digest, size, metadata

    async def _fetch(self, key: str, etag: str, start: int, end: int
                     ) -> tuple[ObjectInfo, bytearray]:
        buffer = bytearray(end - start)
        view, at = memoryview(buffer), 0
        async with self.store.get_object(key, offset=start, end=end, if_match=etag,
                                         chunk_size=READ_CHUNK) as body:
            info = body.info
            async for chunk in body:
                view[at:at + len(chunk)] = chunk
                at += len(chunk)
        self.tally.downloaded_bytes += at
        if at != len(buffer):
            raise TransientStoreError(f"GetObject {key}: bytes {start}-{end}: the body ended"
                                      f" at byte {start + at}", op="GetObject", key=key,
                                      code="IncompleteBody")
        return info, buffer

    async def _read_ranges(self, key: str, listed: Listed) -> tuple[str, int, dict[str, str]]:
        """A large object in ranges fetched in parallel, a steady window of them, hashed in
        order as they arrive. Each range is paid for from the byte budget before its request
        is made and refunded once hashed; the one hashing never waits for the budget, so
        what it holds is always given back."""
        ranges = [(start, min(start + self.range_size, listed.size))
                  for start in range(0, listed.size, self.range_size)]
        ready: asyncio.Queue[asyncio.Task[tuple[ObjectInfo, bytearray]]] = asyncio.Queue(
            max(1, self.window - 1))
        held: dict[asyncio.Task[tuple[ObjectInfo, bytearray]], int] = {}
        content: ContentDigest | None = None
        metadata: dict[str, str] = {}
        try:
            async with asyncio.TaskGroup() as tasks:

                async def request() -> None:
                    for start, end in ranges:
                        grant = await self.budget.acquire(end - start)
                        task = tasks.create_task(self._fetch(key, listed.etag, start, end))
                        held[task] = grant
                        await ready.put(task)

                tasks.create_task(request())
                for _ in ranges:
                    task = await ready.get()
                    info, data = await task
                    if content is None:
                        content = ContentDigest(info.content_encoding)
                        metadata = dict(info.metadata)
                    await asyncio.to_thread(content.feed, data)
                    del data
                    self.budget.release(held.pop(task))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        finally:
            # Every task has ended by now: what they still hold is freed.
            for grant in held.values():
                self.budget.release(grant)
        assert content is not None  # a ranged object has at least one range
        digest, size = content.finish()
        return digest, size, metadata


# -- the whole tree against one listing ---------------------------------------------------------


def _under(relative: str, paths: set[str] | frozenset[str]) -> bool:
    """``relative`` is one of ``paths`` or lies beneath one."""
    if not paths:
        return False
    parts = relative.split("/")
    return any("/".join(parts[:n]) in paths for n in range(1, len(parts) + 1))


async def verify_tree(config: VerifyConfig, store: ObjectStore, manifest: Manifest | None,
                      tally: Tally) -> None:
    """List PREFIX/ once, walk SRC, compare each file, then report the objects left over."""
    push = config.push
    prefix = push.destination.prefix
    key_base = f"{prefix}/" if prefix else ""
    listing: dict[str, Listed] = {}
    async for info in store.list_objects(key_base):
        listing[info.key] = Listed(info.size, info.etag)
    log.info("verify: %d object(s) under %s", len(listing), printable(push.destination.url))
    options = scan_options_for(push)
    scope = scope_for(push)
    verifier = Verifier(config, store, tally)
    not_files: set[str] = set()  # paths the walk found but push does not send (links, ...)
    slots = asyncio.Semaphore(config.workers)

    async def check(local: Local, listed: Listed) -> None:
        try:
            await verifier.check(local, listed)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as tasks:
            async for batch in scan_directories(str(push.source), options):
                keyed: list[tuple[str, ScannedFile]] = []
                for item in batch:
                    if isinstance(item, ScanIssue):
                        not_files.add(item.relative)
                        if item.failed:
                            tally.problem(Problem(Kind.ERROR, item.relative,
                                                  key_base + item.relative, None, None,
                                                  item.message))
                        else:
                            log.warning("%s: %s", printable(item.relative),
                                        printable(item.message))
                        continue
                    try:
                        keyed.append((object_key(prefix, item.relative), item))
                    except InvalidKey as exc:
                        tally.problem(Problem(Kind.ERROR, item.relative, "", None, None,
                                              str(exc)))
                records = (manifest.lookup_many(scope, [key for key, _ in keyed])
                           if manifest is not None and keyed else {})
                for key, item in keyed:
                    tally.files += 1
                    local = Local(item, key, records.get(key))
                    listed = listing.pop(key, None)
                    if listed is None:
                        verifier.report(local, Kind.MISSING, item.size, None,
                                        f"no object {key}")
                    elif not config.deep and local.proven_by_manifest(listed):
                        tally.matched += 1  # the common case: nothing to ask, nothing to read
                    else:
                        await slots.acquire()  # before the task: the walk waits for slots
                        tasks.create_task(check(local, listed))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    path_filter = options.path_filter
    for key in sorted(listing):
        relative = key[len(key_base):]
        if (relative.startswith(OWN_RECORDS) or relative.endswith("/")  # a folder marker
                or not path_filter.accepts(relative)
                or _under(relative, options.skip_paths) or _under(relative, not_files)):
            continue
        tally.problem(Problem(Kind.EXTRA, relative, key, None, listing[key].size,
                              "an object with no local file (not deleted)"))


async def run_verify(config: VerifyConfig, out: TextIO | None = None,
                     err: TextIO | None = None) -> int:
    """Compare, print; return the exit code: 0 everything matches, 1 any problem. Bad
    configuration (a missing bucket, refused credentials) raises ConfigError (exit 2)."""
    tally = Tally(config, out or sys.stdout, err or sys.stderr)
    push = config.push
    # Read-only: a watch daemon may hold the manifest. It only saves work here: without one
    # (or with one that cannot be read) every file is hashed.
    async with Pipeline.open_read(push.destination, push.store, on_retry=tally.retried,
                                  state_dir=push.state_dir,
                                  manifest=ManifestUse.READ_IF_ANY) as reader:
        if reader.manifest_problem is not None:
            log.warning("%s; verifying without it: every file is hashed",
                        printable(str(reader.manifest_problem)))
        elif reader.manifest is None:
            log.info("no manifest in %s: every file is hashed", printable(str(push.state_dir)))
        await verify_tree(config, await reader.store(), reader.manifest, tally)
    return tally.finish()
