"""Stage: restore, the download side of transfer: one object written beneath a local root,
whole and proven, or not at all.

Which keys may become which paths is decided on segments (`place.key_segments`), and every
directory is reached from the root without following a symlink (`place.directory_beneath`),
so a key can name nothing outside the root. A local file whose size and xxh3-128 are the
object's (``asyncsync-size``, ``xxh128`` metadata) is left alone. Anything else is written to
a temp file beside its final name, checked against the object's digest, fsynced and renamed
over the name (`place.publish`): the final name only ever holds a complete, proven file.

An object up to `RANGED_FROM` (and any gzip one, decoded as it streams, the way
`readback.content_digest` decodes) is one streamed GET, hashed as it comes. A larger one is
fetched in ranges of ``range_size``, a steady window of them in flight, each written where it
belongs in the file and pinned to the object's ETag. Such a download survives being killed:
its temp file has a stable name (`resume_name`, from the key) and a sidecar beside it
(``<name>.ranges``, JSON: the key, ETag, size, range size and the ranges finished, each
fsynced into the data file before it is listed there). The next run continues with the
missing ranges if the object's ETag is still the sidecar's, and starts the file afresh if not.
Each range in flight holds one chunk of the byte budget, whatever the range size.

Every blocking step runs in a worker thread, and a cancelled download (SIGINT, SIGTERM, a
sibling range that failed) waits for its threads to return before it closes the descriptors
they write through (`_in_thread`). Each directory a run writes to is first cleared of the
temp files a killed run left in it (`place.remove_stale_temps`); the resumable downloads and
their sidecars stay for the next run to continue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import xxhash

from ..config import MAX_PART_SIZE, MIN_PART_SIZE, MiB
from ..errors import (
    AsyncsyncError,
    FatalStoreError,
    NotFound,
    ObjectChanged,
    StoreError,
    TransientStoreError,
    first_error,
)
from ..names import printable
from ..stores.protocol import META_DIGEST, META_SIZE, ObjectInfo, ObjectStore
from .budget import ByteBudget
from .digest import hash_chunk_for, new_digest
from .place import (
    TEMP_PREFIX,
    create_temp,
    directory_beneath,
    key_segments,
    open_directory_beneath,
    publish,
    remove_stale_temps,
    write_atomically,
)
from .readback import READ_CHUNK

log = logging.getLogger("asyncsync")
T = TypeVar("T")

# Objects larger than this are fetched in ranges (and resume); smaller ones in one GET.
RANGED_FROM = 16 * MiB
RANGE_SIZE = 8 * MiB
# What one call of the gzip decoder may produce: a small body may inflate a thousandfold.
DECODE_CHUNK = 256 * 1024
# Key segments below a prefix that asyncsync writes itself (run records, history copies).
OWN_SEGMENT = "_asyncsync"
HISTORY_SEGMENT = "history"
RESUME_PREFIX = TEMP_PREFIX + "pull-"
RANGES_SUFFIX = ".ranges"
RANGES_FORMAT = "asyncsync-pull-ranges/1"
# A download of an object that keeps changing under it is tried this often, then fails.
CHANGED_ATTEMPTS = 2
# The ETag of an object stored by one plain PUT without SSE-KMS: the MD5 of its body.
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")


class RestoreError(AsyncsyncError):
    """One object could not be restored (the message says why); nothing was placed."""


class DigestMismatch(RestoreError):
    """What was downloaded is not what the object's metadata describes: not placed."""


# -- which keys become which paths ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where a key below the prefix lands: its path segments beneath the root, and the path
    --include/--exclude judge (a history copy's is the path of the file it is a copy of)."""

    segments: tuple[str, ...]
    filtered_as: str

    @property
    def relative(self) -> str:
        return "/".join(self.segments)


def target_for(relative: str, size: int, *, with_history: bool) -> Target | None:
    """The target of the key whose path below the prefix is ``relative``; None if it is not
    restored: a folder marker (``dir/``, empty), or a record asyncsync keeps for itself in an
    ``_asyncsync`` segment (run records; history copies too, unless ``with_history``).
    `UnsafeKey` if it could land anywhere but beneath the root: a leading ``/``, an empty,
    ``.`` or ``..`` segment, a backslash (a separator to the tools that may have written
    it), a NUL, or a segment that is one of our temp files' names."""
    if relative == "" or (relative.endswith("/") and size == 0):
        if relative:
            key_segments(relative[:-1], allow_backslash=False)  # a marker, but a safe one
        return None
    segments = key_segments(relative, allow_backslash=False)
    if OWN_SEGMENT not in segments:
        return Target(tuple(segments), relative)
    at = segments.index(OWN_SEGMENT)
    # PREFIX/_asyncsync/history/<path of the file>/<upload time>-<ETag>: `plan.history_key`.
    history = segments[at + 1:at + 2] == [HISTORY_SEGMENT] and len(segments) >= at + 4
    if not (with_history and history):
        return None
    original = "/".join(segments[:at] + segments[at + 2:-1])
    return Target(tuple(segments), original)


def expected_size(info: ObjectInfo) -> int | None:
    """The size of the object's original content: a gzip body's is in its metadata."""
    if not is_gzip(info):
        return info.size
    try:
        return int(info.metadata.get(META_SIZE, ""))
    except ValueError:
        return None


def is_gzip(info: ObjectInfo) -> bool:
    return (info.content_encoding or "").lower() == "gzip"


def resume_name(key: str) -> str:
    """The stable temp name of a ranged download of ``key`` in its final directory."""
    digest = xxhash.xxh3_128_hexdigest(key.encode("utf-8", "surrogatepass"))
    return RESUME_PREFIX + digest


# -- outcomes -------------------------------------------------------------------------------


class Status(enum.StrEnum):
    DOWNLOADED = "downloaded"
    UNCHANGED = "unchanged"
    WOULD_DOWNLOAD = "would-download"  # --dry-run
    SKIPPED = "skipped"  # deleted since the listing: nothing to restore
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Restored:
    key: str
    relative: str
    status: Status
    reason: str
    size: int  # the content's (a gzip object's decoded size)
    bytes_received: int = 0
    ranges: int = 0
    resumed_ranges: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Wanted:
    """An object to restore, as the listing showed it."""

    key: str
    target: Target
    size: int
    etag: str


# -- blocking helpers (worker threads) -------------------------------------------------------


def _blocked(exc: OSError) -> bool:
    """The walk met a symlink or a file where a directory of the path should be."""
    return exc.errno in (errno.ENOTDIR, errno.ELOOP)


def _local_file(root: str, segments: tuple[str, ...]) -> os.stat_result | None:
    """The stat of the regular file at the target (None: there is none, or something that is
    not a regular file, such as a symlink, which publishing replaces, never writes through).
    OSError ENOTDIR/ELOOP when a symlink or file stands on the way."""
    *parents, name = segments
    try:
        with directory_beneath(root, parents) as directory:
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a directory has this name", name)
    return st if stat.S_ISREG(st.st_mode) else None


def _hash_fd(fd: int, chunk: int, hasher: Any = None) -> tuple[int, str]:
    """Size and hex digest (xxh3-128 unless another ``hasher`` is given) of a file."""
    hasher, offset = hasher or new_digest(), 0
    while data := os.pread(fd, chunk, offset):
        hasher.update(data)
        offset += len(data)
    return offset, str(hasher.hexdigest())


def _local_digest(root: str, segments: tuple[str, ...], chunk: int,
                  md5: bool = False) -> tuple[int, str] | None:
    """Size and xxh3-128 (or MD5) of the regular file at the target, read without following
    links; None if it is gone or no longer a regular file."""
    *parents, name = segments
    try:
        with directory_beneath(root, parents) as directory:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        return None  # gone since it was seen
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symlink by now: not a copy of the object
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _hash_fd(fd, chunk, hashlib.md5() if md5 else None)
    finally:
        os.close(fd)


def _write_all_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


async def _in_thread(call: Callable[[], T], *,
                     abandoned: Callable[[T], None] | None = None) -> T:
    """``call()`` in a worker thread. Cancelled, this still waits for the thread to return
    before the cancellation goes on, so no descriptor the call uses is closed under it: a
    closed number is soon another file's, and a late pwrite would land there. What a call
    cut off this way returned is handed to ``abandoned`` (to close a descriptor it opened)."""
    future = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):  # a second cancel: still wait
                await asyncio.wait([future])
        if future.exception() is None and abandoned is not None:
            abandoned(future.result())
        raise


def _close_opened(opened: tuple[int, RangeLog]) -> None:
    os.close(opened[0])


def _discard(directory: int, *names: str) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=directory)


class ContentSink:
    """An object's body in order, decoded if gzip, hashed and written to a file; blocking
    (one call per chunk, in a worker thread: zlib and xxhash release the GIL). Decoded
    output is bounded per decoder call, and a body that inflates past the size the object
    declares is refused at once rather than filling the disk."""

    def __init__(self, fd: int, info: ObjectInfo) -> None:
        self.fd = fd
        self.size = 0
        self.limit = expected_size(info)
        self.hasher = new_digest()
        self.decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if is_gzip(info) else None

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self.limit is not None and self.size + len(data) > self.limit:
            raise DigestMismatch(f"the content is larger than the {self.limit} bytes its"
                                 " object declares")
        self.hasher.update(data)
        _write_all_at(self.fd, data, self.size)
        self.size += len(data)

    def write(self, chunk: bytes) -> None:
        if self.decoder is None:
            self._take(chunk)
            return
        data = self.decoder.decompress(chunk, DECODE_CHUNK)
        while True:
            self._take(data)
            if not self.decoder.unconsumed_tail:
                break
            data = self.decoder.decompress(self.decoder.unconsumed_tail, DECODE_CHUNK)

    def finish(self) -> tuple[int, str]:
        if self.decoder is not None:
            self._take(self.decoder.flush())
            if not self.decoder.eof:
                raise zlib.error("the gzip stream ends early")
        return self.size, str(self.hasher.hexdigest())


# -- the resume sidecar -----------------------------------------------------------------------


@dataclass
class RangeLog:
    """What a ranged download has on disk: the version it is of and the ranges finished."""

    key: str
    etag: str
    size: int
    range_size: int
    done: set[int]

    @property
    def count(self) -> int:
        return max(1, -(-self.size // self.range_size))

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.range_size
        return start, min(self.size, start + self.range_size)

    def as_json(self) -> bytes:
        return json.dumps({"format": RANGES_FORMAT, "key": self.key, "etag": self.etag,
                           "size": self.size, "range_size": self.range_size,
                           "done": sorted(self.done)}, sort_keys=True).encode()

    @classmethod
    def read(cls, directory: int, name: str) -> RangeLog | None:
        """The sidecar ``name`` in ``directory``, or None if missing, damaged or not ours."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except OSError:
            return None
        try:
            with open(fd, "rb", closefd=False) as handle:
                record: Any = json.loads(handle.read(1024 * 1024))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if not isinstance(record, dict) or record.get("format") != RANGES_FORMAT:
            return None
        key, etag, size = record.get("key"), record.get("etag"), record.get("size")
        range_size, done = record.get("range_size"), record.get("done")
        if not (isinstance(key, str) and isinstance(etag, str) and isinstance(size, int)
                and isinstance(range_size, int) and isinstance(done, list)
                and MIN_PART_SIZE <= range_size <= MAX_PART_SIZE and size > 0):
            return None
        found = cls(key, etag, size, range_size, set())
        if not all(isinstance(i, int) and 0 <= i < found.count for i in done):
            return None
        found.done = set(done)
        return found

    def write(self, directory: int, name: str) -> None:
        body = self.as_json()
        write_atomically(directory, name, lambda fd: _write_all_at(fd, body, 0))


def _bare(etag: str) -> str:
    return etag.strip('"')


def _open_resumable(directory: int, name: str, info: ObjectInfo,
                    range_size: int) -> tuple[int, RangeLog]:
    """The ranged download's temp file (created if missing, locked against a concurrent pull
    of the same key) and what it holds: the ranges its sidecar lists if it is of this very
    version of the object, else nothing (the file is emptied and sized anew)."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                 dir_fd=directory)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RestoreError("another asyncsync pull is downloading it into the same place"
                               " right now") from None
        found = RangeLog.read(directory, name + RANGES_SUFFIX)
        if (found is not None and found.key == info.key and found.size == info.size
                and _bare(found.etag) == _bare(info.etag)
                and os.fstat(fd).st_size == info.size):
            return fd, found
        os.ftruncate(fd, 0)  # another version's bytes (or none): start afresh
        os.ftruncate(fd, info.size)
        fresh = RangeLog(info.key, info.etag, info.size, range_size, set())
        fresh.write(directory, name + RANGES_SUFFIX)
        return fd, fresh
    except BaseException:
        os.close(fd)
        raise


# -- the stage --------------------------------------------------------------------------------


class Restorer:
    """Restores objects of ``store`` beneath ``root``; every buffer is paid for from
    ``budget`` before its request is made. ``on_received`` hears every body byte that came."""

    def __init__(
        self, store: ObjectStore, root: str, budget: ByteBudget, *, range_size: int = RANGE_SIZE,
        part_concurrency: int = 8, dry_run: bool = False,
        on_received: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.root = root
        self.budget = budget
        self.range_size = range_size
        self.part_concurrency = max(1, part_concurrency)
        self.dry_run = dry_run
        self.on_received = on_received or (lambda n: None)
        # The directories cleared of stale temp files in this run (set once cleared).
        self._swept: dict[tuple[str, ...], asyncio.Event] = {}

    async def restore(self, wanted: Wanted) -> Restored:
        """Restore one object; whatever goes wrong with it alone is its failure. A store that
        refuses us altogether (`FatalStoreError`) ends the run."""
        relative = wanted.target.relative
        try:
            for attempt in range(1, CHANGED_ATTEMPTS + 1):
                try:
                    return await self._restore(wanted)
                except ObjectChanged:
                    if attempt == CHANGED_ATTEMPTS:
                        raise
                    log.info("%s: replaced while it was downloaded; starting it again",
                             printable(wanted.key))
        except FatalStoreError:
            raise
        except ObjectChanged:
            message = "the object was replaced while it was downloaded, again; run again"
        except NotFound:
            return Restored(wanted.key, relative, Status.SKIPPED, "deleted since it was listed",
                            wanted.size)
        except DigestMismatch as exc:
            message = f"{exc}: damaged in the store or on the way; not placed"
        except (RestoreError, StoreError) as exc:
            message = str(exc)
        except zlib.error as exc:
            message = f"its gzip body does not decode ({exc}); not placed"
        except OSError as exc:
            message = self._os_error(relative, exc)
        return Restored(wanted.key, relative, Status.FAILED, "failed", wanted.size,
                        error=message)

    @staticmethod
    def _os_error(relative: str, exc: OSError) -> str:
        if _blocked(exc):
            where = f" ({exc.filename})" if exc.filename else ""
            return (f"refused: a symlink or a file stands on the path{where}; nothing is"
                    " written through it")
        return f"cannot write {relative}: {exc.strerror or exc}"

    async def _open_directory(self, parents: list[str]) -> int:
        """The target's directory, created if missing and, the first time this run opens it,
        cleared of the temp files killed runs left there. Every other writer of this run
        waits for that, so none of its own new temp files is looked at."""
        directory = await _in_thread(
            functools.partial(open_directory_beneath, self.root, parents, create=True),
            abandoned=os.close)
        try:
            where = tuple(parents)
            swept = self._swept.get(where)
            if swept is None:
                swept = self._swept[where] = asyncio.Event()
                try:
                    removed = await _in_thread(functools.partial(remove_stale_temps, directory))
                finally:
                    swept.set()
                if removed:
                    log.info("%s: removed %d temp file(s) an interrupted run left",
                             printable("/".join(parents) or "."), len(removed))
            else:
                await swept.wait()
        except BaseException:
            os.close(directory)
            raise
        return directory

    async def _restore(self, wanted: Wanted) -> Restored:
        segments = wanted.target.segments
        local = await _in_thread(functools.partial(_local_file, self.root, segments))
        head: ObjectInfo | None = None
        if local is not None or wanted.size > RANGED_FROM:
            head = await self.store.head_object(wanted.key)
            if head is None:
                return Restored(wanted.key, wanted.target.relative, Status.SKIPPED,
                                "deleted since it was listed", wanted.size)
        reason = "new"
        if local is not None and head is not None:
            differs = await self._differs(segments, local, head)
            if differs is None:
                return Restored(wanted.key, wanted.target.relative, Status.UNCHANGED,
                                "unchanged", local.st_size)
            reason = differs
        if self.dry_run:
            size = expected_size(head) if head is not None else None
            return Restored(wanted.key, wanted.target.relative, Status.WOULD_DOWNLOAD, reason,
                            wanted.size if size is None else size)
        if head is not None and head.size > RANGED_FROM and not is_gzip(head):
            return await self._download_ranges(wanted, head, reason)
        return await self._download_stream(wanted, head, reason)

    async def _differs(self, segments: tuple[str, ...], local: os.stat_result,
                       head: ObjectInfo) -> str | None:
        """None if the local file is the object's content (same size and xxh3-128), else
        why it is downloaded. An object push did not write (no ``xxh128``) is compared by
        the MD5 its ETag is, where it is one: a guess wrong only costs a download."""
        digest = head.metadata.get(META_DIGEST)
        size = expected_size(head)
        md5 = not digest and not is_gzip(head) and bool(_MD5_ETAG.fullmatch(_bare(head.etag)))
        if not digest and not md5:
            return "no digest to compare with"
        if size is not None and local.st_size != size:
            return "changed"
        chunk = hash_chunk_for(local.st_size)
        grant = await self.budget.acquire(chunk)
        try:
            found = await _in_thread(
                functools.partial(_local_digest, self.root, segments, chunk, md5))
        finally:
            self.budget.release(grant)
        expected = _bare(head.etag) if md5 else digest
        if found is None or found[1] != expected or (size is not None and found[0] != size):
            return "changed"
        return None

    @staticmethod
    def _check(wanted: Wanted, info: ObjectInfo, size: int, digest: str) -> None:
        """Raise `DigestMismatch` unless the content is what the object's metadata says."""
        declared = expected_size(info)
        if declared is not None and size != declared:
            raise DigestMismatch(f"{size} bytes arrived, the object declares {declared}")
        expected = info.metadata.get(META_DIGEST)
        if expected and digest != expected:
            raise DigestMismatch(f"the downloaded content's xxh128 is {digest}, the object's"
                                 f" metadata says {expected}")

    async def _download_stream(self, wanted: Wanted, head: ObjectInfo | None,
                               reason: str) -> Restored:
        """One GET, hashed (and decoded, for gzip) as it streams into a temp file beside the
        final name; published only if it proves to be the object's content."""
        *parents, name = wanted.target.segments
        # One chunk of the body, and the decoder's output unless the body is known plain.
        hold = min(max(wanted.size, 1), READ_CHUNK)
        hold += DECODE_CHUNK if head is None or is_gzip(head) else 0
        grant = await self.budget.acquire(hold)
        try:
            directory = await self._open_directory(parents)
            try:
                temp, fd = await _in_thread(functools.partial(create_temp, directory),
                                            abandoned=lambda made: os.close(made[1]))
                try:
                    received = 0
                    try:
                        async with self.store.get_object(
                            wanted.key, if_match=head.etag if head is not None else None,
                            chunk_size=READ_CHUNK,
                        ) as body:
                            info = body.info
                            sink = ContentSink(fd, info)
                            async for chunk in body:
                                received += len(chunk)
                                self.on_received(len(chunk))
                                await _in_thread(functools.partial(sink.write, chunk))
                        size, digest = await _in_thread(sink.finish)
                        self._check(wanted, info, size, digest)
                        await _in_thread(functools.partial(os.fsync, fd))
                        await _in_thread(functools.partial(publish, directory, temp, name))
                    finally:
                        os.close(fd)  # after the rename: the lock covers the temp file's life
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temp, dir_fd=directory)
                    raise
            finally:
                os.close(directory)
        finally:
            self.budget.release(grant)
        return Restored(wanted.key, wanted.target.relative, Status.DOWNLOADED, reason, size,
                        bytes_received=received)

    async def _download_ranges(self, wanted: Wanted, head: ObjectInfo,
                               reason: str) -> Restored:
        """A large object in ranges, a steady window in flight, into its resumable temp
        file; hashed from disk once whole, then published. Interrupted, the temp file and its
        sidecar stay for the next run; a damaged download is removed."""
        *parents, name = wanted.target.segments
        resume = resume_name(wanted.key)
        directory = await self._open_directory(parents)
        try:
            fd, ranges = await _in_thread(
                functools.partial(_open_resumable, directory, resume, head, self.range_size),
                abandoned=_close_opened)
            try:
                resumed = len(ranges.done)
                received = await self._fetch_missing(wanted, head, fd, directory, resume, ranges)
                chunk = hash_chunk_for(head.size)
                grant = await self.budget.acquire(chunk)
                try:
                    size, digest = await _in_thread(functools.partial(_hash_fd, fd, chunk))
                finally:
                    self.budget.release(grant)
                try:
                    self._check(wanted, head, size, digest)
                except DigestMismatch:
                    # Every range arrived and the whole is wrong: nothing here to resume.
                    await _in_thread(functools.partial(_discard, directory, resume,
                                                       resume + RANGES_SUFFIX))
                    raise
                await _in_thread(functools.partial(publish, directory, resume, name))
                await _in_thread(functools.partial(_discard, directory, resume + RANGES_SUFFIX))
            finally:
                # After the rename: the lock covers the whole download. Every thread that
                # wrote through ``fd`` has returned by now (`_in_thread`), cancelled or not.
                os.close(fd)
        finally:
            os.close(directory)
        reason = "resumed" if resumed else reason
        return Restored(wanted.key, wanted.target.relative, Status.DOWNLOADED, reason, size,
                        bytes_received=received, ranges=ranges.count, resumed_ranges=resumed)

    async def _fetch_missing(self, wanted: Wanted, head: ObjectInfo, fd: int, directory: int,
                             resume: str, ranges: RangeLog) -> int:
        """Fetch the ranges not on disk yet; return the body bytes received. A slot of the
        window is taken before each range's task is made, so a finished range makes room for
        the next at once (no batches in lockstep)."""
        missing = [i for i in range(ranges.count) if i not in ranges.done]
        window = asyncio.Semaphore(min(self.part_concurrency, max(1, len(missing))))
        logged = asyncio.Lock()  # sidecar writes in order: the last one lists every range
        received = [0]

        async def fetch(index: int) -> None:
            try:
                start, end = ranges.bounds(index)
                grant = await self.budget.acquire(min(READ_CHUNK, end - start))
                try:
                    at = start
                    async with self.store.get_object(wanted.key, offset=start, end=end,
                                                     if_match=head.etag,
                                                     chunk_size=READ_CHUNK) as body:
                        async for chunk in body:
                            await _in_thread(functools.partial(_write_all_at, fd, chunk, at))
                            at += len(chunk)
                            received[0] += len(chunk)
                            self.on_received(len(chunk))
                    if at != end:
                        raise TransientStoreError(
                            f"GetObject {wanted.key}: bytes {start}-{end}: the body ended at"
                            f" byte {at}", op="GetObject", key=wanted.key, code="IncompleteBody")
                    # On disk before it is listed as done: a crash never lists a hole.
                    await _in_thread(functools.partial(os.fdatasync, fd))
                finally:
                    self.budget.release(grant)
                async with logged:
                    ranges.done.add(index)
                    await _in_thread(functools.partial(ranges.write, directory,
                                                       resume + RANGES_SUFFIX))
            finally:
                window.release()

        try:
            async with asyncio.TaskGroup() as tasks:
                for index in missing:
                    await window.acquire()
                    tasks.create_task(fetch(index))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        return received[0]
