"""watch's queue: observe -> due -> upload -> handle, and the final flush.

push runs the stages once over the tree (`mirror`); the watch daemon runs them forever from
this queue. A scan or an inotify event *observes* a file: one whose stat matches its manifest
row leaves the queue, any other joins `settle.SettleTracker`, which says when it is *due*
(settled, paced, backed off). Due files are *uploaded*, one upload per key at a time and at
most ``--workers`` at once, each planned by `plan` (including whether a shrunken append-only
file's previous object must first be kept under ``_asyncsync/history``). The outcome is
*handled*: sent, gone, changed under the read (wait to settle again), or failed (back off).
The queue needs no storage of its own: it is exactly the set of files whose stat differs from
the manifest, which a restart finds again by scanning.

The queue neither sleeps nor decides when to scan: the daemon (`service.daemon`) drives it, and
it reports what happens to a `QueueObserver` (the daemon, whose state snapshot and metrics are
built from those reports), so nothing here knows about HTTP, Prometheus or signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterable
from typing import Protocol

from ..config import WatchConfig
from ..errors import (
    EndpointUnreachable,
    FatalStoreError,
    ManifestError,
    ManifestFull,
    SourceChanged,
    SourceNotRegular,
    SourceVanished,
    StoreError,
    store_cause,
)
from ..stores.protocol import ObjectStore
from .digest import starts_with
from .events import Failure, FileOutcome, Status
from .keys import InvalidKey, PathFilter, object_key
from .manifest import ObjectRecord
from .plan import history_key, history_version_key, plan_file
from .scan import ScanIssue, ScannedFile, StatCache, scan_directories
from .session import Pipeline
from .settle import SettleTracker
from .source import SourceRoot

log = logging.getLogger("asyncsync")

# Attempts per file in the shutdown flush (a file that keeps failing must not hold it up).
FINAL_TRIES = 3
# How often the shutdown flush looks again at files still settling, and for how long: a
# file written without pause (a log appended to by a training that goes on while only the
# daemon stops) goes up as it is then, whole to the torn-read checks, rather than hold the
# shutdown for all of --grace and be left out.
SETTLE_POLL = 0.25
SETTLE_WAIT = 3.0


class QueueObserver(Protocol):
    """What the queue reports; files are named by their path relative to SRC. Called on the
    event loop's thread; must return quickly."""

    def pending(self, relative: str, delta: int, nbytes: int) -> None:
        """The file (of ``nbytes``) joined (+1) or left (-1) the files out of sync."""

    def outcome(self, outcome: FileOutcome) -> None:
        """An upload ended: uploaded, unchanged or failed."""

    def torn(self, reads: int) -> None:
        """Reads refused because the file changed under them (it waits to settle again)."""

    def history_copied(self) -> None:
        """The previous version of an append-only file was kept before it was overwritten."""

    def in_flight(self, n: int, nbytes: int) -> None:
        """Uploads running now, and the bytes of their files."""

    def store_reachable(self, ok: bool, problem: str = "") -> None: ...

    def scanned(self, seconds: float) -> None:
        """A full scan took ``seconds``."""

    def wake(self) -> None:
        """An upload ended: more may be due now."""

    def fail(self, exc: BaseException) -> None:
        """Nothing more can be recorded (the manifest failed): stop, and raise ``exc``."""


class SyncQueue:
    """The files of one source out of sync with the bucket, and their uploads."""

    def __init__(self, config: WatchConfig, pipeline: Pipeline, observer: QueueObserver) -> None:
        self.config = config
        self.push = pipeline.config
        self.pipeline = pipeline
        self.observer = observer
        self.tracker = SettleTracker(
            settle=config.settle,
            checkpoint_interval=config.checkpoint_interval,
            checkpoints=PathFilter(include=config.checkpoint_globs),
        )
        self.history = PathFilter(include=config.history_globs)
        # A directory appeared (its files may predate its inotify watch): scan it all.
        self.rescan_requested = False
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._in_flight_bytes: dict[str, int] = {}
        # The files counted as pending (key -> relative path and size), kept in step with the
        # tracker so that the observer's per-run tallies move by one file, never by a recount.
        self._counted: dict[str, tuple[str, int]] = {}
        self._reported: set[str] = set()
        self._stat_cache = StatCache()

    def __len__(self) -> int:
        return len(self.tracker)

    @property
    def uploading(self) -> int:
        return len(self._in_flight)

    # -- observe ----------------------------------------------------------------------------

    async def scan(self) -> None:
        """A full stat scan of SRC (no reads of unchanged files, no bucket listing)."""
        started = time.monotonic()
        now = time.time()
        manifest, scope = self.pipeline.manifest, self.pipeline.scope
        self._stat_cache.begin()
        try:
            async for batch in scan_directories(str(self.push.source),
                                                self.pipeline.scan_options, self._stat_cache):
                files: list[tuple[str, ScannedFile]] = []
                for item in batch:
                    if isinstance(item, ScanIssue):
                        self._report_once(item.relative, item.message, item.failed)
                    elif (key := self._key(item)) is not None:
                        files.append((key, item))
                records = manifest.lookup_many(scope, [key for key, _ in files])
                for key, item in files:
                    self._observe(key, item, records.get(key), now)
        except FileNotFoundError:
            log.info("%s is gone; waiting for it to come back", self.push.source)
        # Files gone since (a run directory deleted under DDP, say) leave the queue.
        for relative in self._stat_cache.end():
            with contextlib.suppress(InvalidKey):
                key = object_key(self.push.destination.prefix, relative)
                if key not in self._in_flight:
                    self._forget(key)
        self.observer.scanned(time.monotonic() - started)

    def observe_changes(self, changes: Iterable[tuple[object, str]]) -> None:
        """inotify's changed paths (through watchfiles): they only make files known early;
        scans stay the truth."""
        now = time.time()
        source = str(self.push.source)
        root = SourceRoot(source, self.push.follow_symlinks)
        accepts = PathFilter(self.push.include, self.push.exclude).accepts
        for _, path in changes:
            relative = os.path.relpath(path, source).replace(os.sep, "/")
            if relative.startswith("..") or not accepts(relative):
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                with contextlib.suppress(InvalidKey):
                    self._forget(object_key(self.push.destination.prefix, relative))
                continue
            if stat.S_ISREG(st.st_mode):
                item = ScannedFile(path, relative, st.st_size, st.st_mtime_ns, st.st_ino,
                                   st.st_dev, root)
                if (key := self._key(item)) is not None:
                    record = self.pipeline.manifest.lookup(self.pipeline.scope, key)
                    self._observe(key, item, record, now)
            elif stat.S_ISDIR(st.st_mode):
                # A new directory may hold files written before its watch was in place
                # (mkdir, then write at once): scan instead of trusting events for it.
                self.rescan_requested = True

    def _key(self, item: ScannedFile) -> str | None:
        try:
            return object_key(self.push.destination.prefix, item.relative)
        except InvalidKey as exc:
            self._report_once(item.relative, str(exc), True)
            return None

    def _observe(
        self, key: str, item: ScannedFile, record: ObjectRecord | None, now: float
    ) -> None:
        """Compare one file with its manifest row; queue it if it is out of sync."""
        if record is not None and record.same_stat(item.path, item.size, item.mtime_ns,
                                                     item.inode):
            self._forget(key)
            return
        if record is not None and key not in self.tracker:
            self.tracker.remember_sent(key, record.uploaded_at)
        self.tracker.observe(key, item, now)
        if key not in self._counted:
            self._counted[key] = (item.relative, item.size)
            self.observer.pending(item.relative, 1, item.size)

    def _forget(self, key: str) -> None:
        self.tracker.forget(key)
        self._uncount(key)

    def _uncount(self, key: str) -> None:
        """After the tracker may have let ``key`` go: move the pending tally with it."""
        if key not in self.tracker and (counted := self._counted.pop(key, None)) is not None:
            self.observer.pending(counted[0], -1, counted[1])

    def _report_once(self, relative: str, message: str, failed: bool) -> None:
        """Scans repeat every few seconds: say each problem once, not every time."""
        marker = f"{relative}\0{message}"
        if marker in self._reported:
            return
        self._reported.add(marker)
        (log.error if failed else log.warning)("%s: %s", relative, message)

    # -- due ----------------------------------------------------------------------------------

    def next_ready(self) -> float | None:
        """When the next upload may start. With every worker busy, the next upload to end
        is what wakes the daemon instead (None)."""
        if len(self._in_flight) >= self.push.transfer.workers:
            return None
        return self.tracker.next_ready(self._in_flight)

    def start_due(
        self, now: float, *, tries: dict[str, int] | None = None, writers_gone: bool = False
    ) -> None:
        """Start uploads of due files; with ``tries`` (the shutdown flush), every settled file
        is due (every file if ``writers_gone``), but each key gets at most FINAL_TRIES
        attempts."""
        final = tries is not None
        for key, candidate in self.tracker.due(now, final=final, writers_gone=writers_gone):
            if key in self._in_flight:
                continue  # one upload per key; the newer version goes when this one ends
            if len(self._in_flight) >= self.push.transfer.workers:
                break
            if tries is not None:
                if tries.get(key, 0) >= FINAL_TRIES:
                    continue
                tries[key] = tries.get(key, 0) + 1
            self._in_flight[key] = asyncio.create_task(self._upload(key, candidate.scanned))
            self._in_flight_bytes[key] = candidate.scanned.size
        self._report_in_flight()

    def _report_in_flight(self) -> None:
        self.observer.in_flight(len(self._in_flight), sum(self._in_flight_bytes.values()))

    # -- upload -------------------------------------------------------------------------------

    async def store(self) -> ObjectStore:
        """The store; a failure to reach it is reported, then raised."""
        try:
            return await self.pipeline.store()
        except (EndpointUnreachable, FatalStoreError) as exc:
            self.observer.store_reachable(False, str(exc))
            raise

    async def _upload(self, key: str, scanned: ScannedFile) -> None:
        manifest, scope = self.pipeline.manifest, self.pipeline.scope
        started = time.monotonic()
        try:
            record = manifest.lookup(scope, key)
            if self._emptied_checkpoint(key, scanned, record):
                return
            await self._keep_history(scanned, record)
            outcome = await self.pipeline.uploader.sync(scanned, key, plan_file(scanned, record))
        except (FatalStoreError, EndpointUnreachable, StoreError) as exc:
            self.observer.store_reachable(False, str(exc))
            log.error("%s: %s; will retry", scanned.relative, exc)
            self.observer.outcome(FileOutcome(
                scanned.relative, key, Status.FAILED, "store", scanned.size, error=str(exc),
                failure=Failure.STORE, cause=store_cause(exc),
            ))
            self.tracker.failed(key, time.time())
            return
        except ManifestFull as exc:
            # Room comes back (a log rotated, a checkpoint deleted): what could not be
            # recorded is uploaded again then, as after a store outage.
            log.error("%s: %s; will retry", scanned.relative, exc)
            self.observer.outcome(FileOutcome(
                scanned.relative, key, Status.FAILED, "state directory full", scanned.size,
                error=str(exc), failure=Failure.READ,
            ))
            self.tracker.failed(key, time.time())
            return
        except ManifestError as exc:
            # Without a manifest nothing can be recorded: stop, and say why.
            self.observer.fail(exc)
            return
        finally:
            self._in_flight.pop(key, None)
            self._in_flight_bytes.pop(key, None)
            self._report_in_flight()
            self.observer.wake()
        self._handle(key, scanned, outcome, time.monotonic() - started)

    def _emptied_checkpoint(
        self, key: str, scanned: ScannedFile, record: ObjectRecord | None
    ) -> bool:
        """A checkpoint found empty where the bucket holds a version of it is between
        torch.save's truncate and its first write (or a save that died there): it waits
        to be written, and the bucket keeps the version it has. The torn-read checks cannot
        tell this one, since an empty file holds still while it is read."""
        if (scanned.size or record is None or not record.size
                or not self.tracker.checkpoints.include
                or not self.tracker.checkpoints.accepts(scanned.relative)):
            return False
        self._report_once(scanned.relative, f"empty, while the bucket holds {record.size} "
                          "bytes of it: kept there until the file is written again", False)
        self.tracker.unsettle(key, time.time())
        return True

    async def _keep_history(self, scanned: ScannedFile, record: ObjectRecord | None) -> None:
        """Copy the previous object aside first when planning says the upload would destroy
        history (an append-only file that shrank or was recreated)."""
        if record is None or not self.history.include or not self.history.accepts(
                scanned.relative):
            return
        try:
            # In a thread: telling an append from a rewrite in place reads the file's start.
            target = await asyncio.to_thread(
                history_key, scanned, record, self.history, self.push.destination.prefix,
                still_starts_with_object=lambda kept: _starts_with(scanned, kept))
        except InvalidKey as exc:
            # Refusing the upload would keep the new results out of the bucket for good.
            self._report_once(scanned.relative, f"previous version not kept: {exc}", False)
            return
        if target is None or record is None:
            return
        store = await self.store()
        # Named by the version really there (the manifest's row may lag the bucket), so that
        # a copy never lands over an earlier one.
        current = await store.head_object(record.key)
        if current is None:
            return  # nothing there to keep
        try:
            target = history_version_key(target, current.etag)
        except InvalidKey as exc:
            self._report_once(scanned.relative, f"previous version not kept: {exc}", False)
            return
        await store.copy_object(record.key, target)
        self.observer.history_copied()
        log.info("kept the previous %s as %s before overwriting it", record.key, target)

    # -- handle -------------------------------------------------------------------------------

    def _handle(
        self, key: str, scanned: ScannedFile, outcome: FileOutcome, seconds: float
    ) -> None:
        now = time.time()
        identity = (scanned.size, scanned.mtime_ns, scanned.inode)
        if outcome.status in (Status.UPLOADED, Status.UNCHANGED):
            self.observer.outcome(outcome)
            if outcome.status is Status.UPLOADED:
                self.observer.store_reachable(True)
                log.info("uploaded %s -> %s (%d bytes, %s, %.2fs)", outcome.relative, key,
                         outcome.size, outcome.reason, seconds)
            else:
                log.info("unchanged %s (same content)", outcome.relative)
            # The identity the uploader actually read (what the manifest now holds).
            read = outcome.identity
            sent = (read.size, read.mtime_ns, read.inode) if read is not None else identity
            self.tracker.sent(key, sent, now)
            if sent != identity:
                self.tracker.forget(key)
            self._uncount(key)
        elif outcome.status is Status.SKIPPED:
            self._forget(key)
            # Vanished, or swapped for a symlink and so never read: whatever is there now,
            # the next scan looks at it afresh.
            self._stat_cache.forget(outcome.relative)
            (log.info if outcome.reason == "vanished" else log.warning)(
                "%s: %s", outcome.relative, outcome.reason)
        elif outcome.failure is Failure.CHANGED:
            # Not a failure here: the file is still being written, and waits to settle.
            self.observer.torn(outcome.torn_reads)
            self.tracker.unsettle(key, now)
            log.info("%s: changed while uploading; waiting for it to settle", outcome.relative)
        else:
            self.observer.outcome(outcome)
            if outcome.failure is Failure.STORE:
                self.observer.store_reachable(False, outcome.error or "store error")
            self.tracker.failed(key, now)
            log.error("%s: %s; will retry", outcome.relative, outcome.error)

    # -- the end ------------------------------------------------------------------------------

    async def flush(self, grace: float, *, writers_gone: bool = False) -> int:
        """Shutdown: send everything out of sync (pacing and backoff no longer apply; a file
        must still hold still for `settle.FINAL_SETTLE`, unless ``writers_gone``, and the
        torn-read checks still apply), waiting up to ``grace`` seconds. A file still
        settling is looked at again until it holds still, for SETTLE_WAIT at most. Uploads
        still running then are cancelled: the manifest keeps them to resume. Returns how
        many files are left out of sync."""
        deadline = time.monotonic() + grace
        settle_until = time.monotonic() + SETTLE_WAIT
        log.info("stopping: final scan, then up to %.0fs for uploads", grace)
        with contextlib.suppress(OSError):
            await self.scan()
        tries: dict[str, int] = {}
        while time.monotonic() < deadline:
            self.start_due(time.time(), tries=tries,
                           writers_gone=writers_gone or time.monotonic() >= settle_until)
            settling = [key for key in self.tracker.keys()
                        if key not in self._in_flight and tries.get(key, 0) < FINAL_TRIES]
            if not self._in_flight and not settling:
                break
            wait = deadline - time.monotonic()
            if settling:
                wait = min(wait, SETTLE_POLL)
            if self._in_flight:
                await asyncio.wait(list(self._in_flight.values()), timeout=max(0.0, wait),
                                   return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(max(0.0, wait))
            self._restat([key for key in settling if key not in self._in_flight])
        if self._in_flight:
            log.warning("grace period over: %d upload(s) kept for the next start",
                        len(self._in_flight))
            await self.abandon()
        unsent = len(self.tracker)
        if unsent:
            log.warning("%d file(s) not uploaded before exit; they go up on the next start",
                        unsent)
        return unsent

    def _restat(self, keys: list[str]) -> None:
        """Look at these queued files again (the flush's scans: a file still settling may
        have moved, or been written at last)."""
        candidates = {key: c for key in keys if (c := self.tracker.get(key)) is not None}
        if not candidates:
            return
        records = self.pipeline.manifest.lookup_many(self.pipeline.scope, list(candidates))
        now = time.time()
        for key, candidate in candidates.items():
            old = candidate.scanned
            try:
                st = os.stat(old.path, follow_symlinks=False)
            except OSError:
                self._forget(key)
                continue
            if not stat.S_ISREG(st.st_mode):
                self._forget(key)
                continue
            item = ScannedFile(old.path, old.relative, st.st_size, st.st_mtime_ns, st.st_ino,
                               st.st_dev, old.root)
            self._observe(key, item, records.get(key), now)

    async def abandon(self) -> None:
        """Cancel the uploads in flight (multipart ones stay in the manifest, to resume)."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        self._in_flight_bytes.clear()
        self._report_in_flight()


def _starts_with(scanned: ScannedFile, record: ObjectRecord) -> bool:
    """Whether the file still starts with the bytes of its object; a file that cannot be
    read to tell counts as rewritten (keeping the object aside costs a copy, no more)."""
    try:
        return starts_with(scanned, record.size, record.digest)
    except (OSError, SourceChanged, SourceNotRegular, SourceVanished):
        return False
