"""`pull`: restore ``s3://BUCKET/PREFIX[/RUN]`` (or a ``file://`` store) into a local directory.

One listing of ``PREFIX/`` names the objects; each key's path below the prefix becomes its
path below DEST, decided on segments and refused (reported by key, counted as failed) where
it could land anywhere else (`restore.target_for`). ``--workers`` objects are restored at
once by the restore stage (`pipeline.restore`): a file already there with the object's size
and digest is left alone, anything else is downloaded into a temp file beside its final
name, proven against the object's ``xxh128``, and renamed into place; large objects come in
ranges (``--part-size``, ``--part-concurrency`` of them in flight) and resume after a kill.
Records asyncsync keeps for itself under ``_asyncsync/`` are not restored, except the
history copies of append-only files with ``--with-history``: at
``DEST/_asyncsync/history/<path>/<upload time>-<ETag>``, the place their key names below PREFIX
(for PREFIX/RUN, the copies ``PREFIX/_asyncsync/history/RUN/...`` of RUN's files too).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import (
    Destination,
    StoreConfig,
    parse_destination,
    store_config_for_workers,
)
from ..errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError, TransientStoreError, first_error
from ..names import printable
from ..options import Settings
from ..pipeline.budget import ByteBudget
from ..pipeline.keys import PathFilter
from ..pipeline.place import UnsafeKey
from ..pipeline.readback import READ_CHUNK
from ..pipeline.restore import (
    HISTORY_SEGMENT,
    OWN_SEGMENT,
    RANGE_SIZE,
    Restored,
    Restorer,
    Status,
    Wanted,
    target_for,
)
from ..pipeline.session import Pipeline
from ..report import human_bytes
from ..stores.protocol import ObjectStore

log = logging.getLogger("asyncsync")


@dataclass(frozen=True)
class PullConfig:
    source: Destination  # the store and the prefix below which keys are restored
    destination: Path  # DEST, absolute
    store: StoreConfig
    workers: int
    max_memory: int
    range_size: int
    part_concurrency: int
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_bandwidth: float | None = None
    dry_run: bool = False
    with_history: bool = False
    json: bool = False
    quiet: bool = False

    @property
    def key_base(self) -> str:
        prefix = self.source.prefix
        return f"{prefix}/" if prefix else ""


def parse_source(text: str) -> Destination:
    """``s3://BUCKET[/PREFIX]`` or ``file:///PATH``. A file:// path below the root of a
    file:// store (the directory holding ``.asyncsync-store/``) is that store and a prefix
    in it: the objects' metadata (digests, gzip encoding) lives at the store's root."""
    try:
        source = parse_destination(text)
    except ConfigError as exc:
        # The same rules as push's DEST; the message names the argument as pull calls it.
        raise ConfigError(str(exc).replace("destination", "source", 1)) from None
    if source.scheme != "file":
        return source
    from ..stores.local import STATE_DIR

    path = Path(source.bucket)
    for root in (path, *path.parents):
        if (root / STATE_DIR).is_dir():
            prefix = path.relative_to(root).as_posix()
            return Destination("file", str(root), "" if prefix == "." else prefix)
    return source


def _check_apart(source: Destination, destination: Path) -> None:
    """A file:// store and DEST must not overlap: files placed in the store would be listed
    as objects, and objects restored into DEST would land in the store."""
    if source.scheme != "file":
        return
    root, dest = Path(source.bucket).resolve(), destination.resolve()
    if dest.is_relative_to(root) or root.is_relative_to(dest):
        raise ConfigError(f"destination {str(destination)!r}: overlaps the source store"
                          f" {source.url}; choose a directory apart from it")


def pull_config_from(settings: Settings, source: str, destination: str | Path) -> PullConfig:
    """SRC, DEST and validated settings -> the frozen config; the store's built as push's."""
    src = parse_source(source)
    dest = Path(destination).absolute()
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"destination {str(destination)!r} is not a directory")
    _check_apart(src, dest)
    workers, max_memory = settings["workers"], settings["max_memory"]
    range_size = settings["part_size"] or RANGE_SIZE
    part_concurrency = settings["part_concurrency"]
    # Every worker's request, and the ranges the byte budget lets be in flight besides
    # (each range holds one chunk of it).
    connections = workers + min(workers * (part_concurrency - 1), max_memory // READ_CHUNK)
    store = store_config_for_workers(settings, workers, connections)
    return PullConfig(
        source=src, destination=dest, store=store, workers=workers, max_memory=max_memory,
        range_size=range_size, part_concurrency=part_concurrency,
        include=settings["include"], exclude=settings["exclude"],
        max_bandwidth=settings["max_bandwidth"], dry_run=settings["dry_run"],
        with_history=settings["with_history"], json=settings["json"],
        quiet=settings["quiet"],
    )


# -- what the user is told --------------------------------------------------------------------


class PullReport:
    """Counts outcomes, logs failures (by key, escaped), prints one JSON object per file with
    --json (then the summary), the would-be downloads of --dry-run on stdout, a progress line
    on a terminal, and a one-line summary on stderr."""

    def __init__(self, config: PullConfig, out: TextIO, err: TextIO) -> None:
        self.config = config
        self.out, self.err = out, err
        self.progress = err.isatty() and not config.json and not config.quiet
        self.started = time.monotonic()
        self.counts = dict.fromkeys(Status, 0)
        self.listed = 0
        self.listed_bytes = 0
        self.done_bytes = 0
        self.bytes_received = 0
        self.retries = 0
        self.resumed_ranges = 0
        self.listing_done = False

    def received(self, nbytes: int) -> None:
        self.bytes_received += nbytes

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        self.retries += 1
        log.info("retry %d in %.2fs: %s", attempt, pause, printable(str(exc)))

    def found(self, size: int) -> None:
        self.listed += 1
        self.listed_bytes += size

    def refused(self, key: str, relative: str, message: str) -> None:
        self.outcome(Restored(key, relative, Status.FAILED, "unsafe key", 0,
                              error=f"refused: {message}"))

    def outcome(self, restored: Restored) -> None:
        status = restored.status
        self.counts[status] += 1
        self.done_bytes += restored.size
        self.resumed_ranges += restored.resumed_ranges
        where = printable(restored.key)
        if status is Status.FAILED:
            log.error("%s: %s", where, printable(restored.error or restored.reason))
        elif status is Status.SKIPPED:
            log.warning("%s: %s", where, restored.reason)
        elif status is Status.DOWNLOADED:
            log.info("downloaded %s -> %s (%s, %s)", where, printable(restored.relative),
                     human_bytes(restored.size), restored.reason)
        elif status is Status.UNCHANGED:
            log.debug("unchanged %s", printable(restored.relative))
        if self.config.json:
            record: dict[str, Any] = {
                "type": "file", "path": restored.relative, "key": restored.key,
                "status": str(status), "reason": restored.reason, "size": restored.size,
                "bytes": restored.bytes_received,
            }
            if restored.ranges:
                record["ranges"] = restored.ranges
                record["resumed_ranges"] = restored.resumed_ranges
            if restored.error:
                record["error"] = restored.error
            self._write(json.dumps(record, ensure_ascii=False))
        elif status is Status.WOULD_DOWNLOAD:
            self._write(printable(f"would download {restored.relative} ({restored.reason},"
                                  f" {human_bytes(restored.size)})"))

    def _write(self, line: str) -> None:
        self.clear_progress()
        self.out.write(line + "\n")

    def summary(self) -> dict[str, Any]:
        return {
            "type": "summary", "source": self.config.source.url,
            "downloaded": self.counts[Status.DOWNLOADED],
            "skipped": self.counts[Status.UNCHANGED],
            "would_download": self.counts[Status.WOULD_DOWNLOAD],
            "failed": self.counts[Status.FAILED],
            "ignored": self.counts[Status.SKIPPED],
            "bytes": self.bytes_received, "retries": self.retries,
            "resumed_ranges": self.resumed_ranges,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def finish(self) -> int:
        """Print the summary; the exit code: 0 everything restored, 1 some files failed."""
        self.clear_progress()
        summary = self.summary()
        if self.config.json:
            self.out.write(json.dumps(summary, ensure_ascii=False) + "\n")
        self.out.flush()
        if not self.config.json and not self.config.quiet:
            parts = [f"{summary['downloaded']} downloaded", f"{summary['skipped']} unchanged"]
            if summary["would_download"]:
                parts.append(f"{summary['would_download']} would download")
            parts.append(f"{summary['failed']} failed")
            if summary["ignored"]:
                parts.append(f"{summary['ignored']} ignored")
            seconds = max(summary["seconds"], 1e-9)
            rate = human_bytes(self.bytes_received / seconds)
            self.err.write(
                f"asyncsync: pull {printable(summary['source'])}: {', '.join(parts)};"
                f" {human_bytes(self.bytes_received)} received in {seconds:.1f}s ({rate}/s)"
                + (f", {self.retries} retries" if self.retries else "") + "\n")
            self.err.flush()
        return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK

    async def draw_progress(self, interval: float = 0.2) -> None:
        """Redraw one status line on stderr until cancelled (only on a terminal)."""
        if not self.progress:
            return
        while True:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = self.bytes_received / elapsed
            done = sum(self.counts.values())
            total = f"/{self.listed}" if self.listing_done else f" of {self.listed}+"
            line = (f"{done}{total} files  {human_bytes(self.bytes_received)} received  "
                    f"{human_bytes(rate)}/s")
            remaining = self.listed_bytes - self.done_bytes
            if self.listing_done and rate > 0 and remaining > 0:
                eta = int(remaining / rate)
                line += f"  ETA {eta // 60}:{eta % 60:02d}"
            self.err.write("\r" + line[:100].ljust(70))
            self.err.flush()
            await asyncio.sleep(interval)

    def clear_progress(self) -> None:
        if self.progress:
            self.err.write("\r" + " " * 100 + "\r")
            self.err.flush()


# -- what is restored -------------------------------------------------------------------------


def history_bases(prefix: str) -> list[tuple[str, str]]:
    """For a pull of PREFIX/RUN: where watch kept the history copies of RUN's files if it
    mirrored an ancestor of it (``ANCESTOR/_asyncsync/history/REST/``), each with the path
    below DEST its copies land under. The copies under PREFIX itself are in its listing."""
    parts = prefix.split("/") if prefix else []
    bases = []
    for at in range(len(parts)):
        ancestor, rest = parts[:at], parts[at:]
        base = "/".join([*ancestor, OWN_SEGMENT, HISTORY_SEGMENT, *rest]) + "/"
        bases.append((base, f"{OWN_SEGMENT}/{HISTORY_SEGMENT}/"))
    return bases


async def wanted_objects(config: PullConfig, store: ObjectStore,
                         report: PullReport) -> AsyncIterator[Wanted]:
    """The objects to restore, as they are listed; unsafe keys are reported as failed here,
    asyncsync's own records and what the filters exclude are passed over in silence."""
    path_filter = PathFilter(config.include, config.exclude)
    listings = [(config.key_base, "")]
    if config.with_history:
        listings += history_bases(config.source.prefix)
    for base, under in listings:
        async for info in store.list_objects(base):
            if not info.key.startswith(base):
                continue  # a store that lists more than the prefix asked for
            relative = under + info.key[len(base):]
            try:
                target = target_for(relative, info.size, with_history=config.with_history)
            except UnsafeKey as exc:
                report.refused(info.key, relative, str(exc))
                continue
            if target is None:
                log.debug("%s: not restored (asyncsync's own record or a folder marker)",
                          printable(info.key))
                continue
            if not path_filter.accepts(target.filtered_as):
                continue
            report.found(info.size)
            yield Wanted(info.key, target, info.size, info.etag)
    report.listing_done = True


async def pull_tree(config: PullConfig, store: ObjectStore, report: PullReport) -> None:
    """Restore every wanted object, ``--workers`` at once: a slot is taken before each
    object's task is made, so the listing never runs ahead of the downloads."""
    restorer = Restorer(
        store, str(config.destination), ByteBudget(config.max_memory),
        range_size=config.range_size, part_concurrency=config.part_concurrency,
        dry_run=config.dry_run, on_received=report.received,
    )
    slots = asyncio.Semaphore(config.workers)

    async def restore(wanted: Wanted) -> None:
        try:
            report.outcome(await restorer.restore(wanted))
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as tasks:
            async for wanted in wanted_objects(config, store, report):
                await slots.acquire()
                tasks.create_task(restore(wanted))
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def run_pull(config: PullConfig, out: TextIO | None = None,
                   err: TextIO | None = None) -> int:
    """Restore, report; return the exit code: 0 every object restored or already there, 1
    some failed. A missing bucket or refused credentials raise ConfigError (exit 2)."""
    report = PullReport(config, out or sys.stdout, err or sys.stderr)
    async with Pipeline.open_read(config.source, config.store, on_retry=report.retried,
                                  max_bandwidth=config.max_bandwidth) as session:
        progress = asyncio.create_task(report.draw_progress())
        try:
            store = await session.store()
            if not config.dry_run:
                try:
                    await asyncio.to_thread(os.makedirs, config.destination, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(f"destination {str(config.destination)!r}: cannot"
                                      f" create it: {exc.strerror or exc}") from None
            await pull_tree(config, store, report)
        except asyncio.CancelledError:
            report.finish()
            log.error("interrupted: large downloads keep what they have and resume on the"
                      " next pull")
            raise
        finally:
            progress.cancel()
            report.clear_progress()
    if report.listed == 0 and not report.counts[Status.FAILED]:
        log.warning("nothing to restore under %s", printable(config.source.url))
    return report.finish()
