"""`watch`: the push pipeline run forever, for directories that training is still writing.

The same stages as push (scan, manifest, plan, transfer, store), driven differently: a
periodic stat scan (and inotify events, when available) finds files out of sync with the
manifest; `settle.SettleTracker` holds each until it has been still for ``--settle`` seconds
(and paces checkpoints); then one upload per key runs at a time. The transfer stage refuses
torn reads (identity changed while reading, a zip archive without its central directory),
so what lands in the bucket is always a complete version; a file caught changing simply
waits to settle again. The queue needs no storage of its own: it is exactly the set of files
whose stat differs from the manifest, which a restart finds again by scanning.

Transient store failures never stop the daemon: files back off and go again; /readyz says
the store is away. On SIGTERM/SIGINT it stops scanning, sends what changed at once (settle
and pacing no longer apply; the torn-read checks still do), waits up to ``--grace`` seconds
for uploads in flight, and exits 0; multipart uploads still running then are kept in the
manifest and resume on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import replace

from ..config import WatchConfig
from ..errors import FatalStoreError, ManifestError, StoreError
from ..pipeline.budget import ByteBudget
from ..pipeline.keys import InvalidKey, PathFilter, object_key
from ..pipeline.manifest import Manifest, ObjectRecord
from ..pipeline.plan import plan_file
from ..pipeline.scan import ScanIssue, ScannedFile, ScanOptions, StatCache, scan_directories
from ..pipeline.settle import SettleTracker
from ..pipeline.source import SourceRoot
from ..pipeline.transfer import FileOutcome, Uploader
from ..service.metrics import Metrics
from ..stores.protocol import ObjectStore
from .push import EndpointUnreachable, StoreSession, open_store, scope_for, state_dir_inside

log = logging.getLogger("asyncsync")

HISTORY_DIR = "_asyncsync/history"
# Attempts per file in the shutdown flush (a file that keeps failing must not hold it up).
FINAL_TRIES = 3


class Watcher:
    def __init__(self, config: WatchConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.push = config.push
        self.metrics = metrics or Metrics()
        self.scope = scope_for(self.push)
        self.tracker = SettleTracker(
            settle=config.settle,
            checkpoint_interval=config.checkpoint_interval,
            checkpoints=PathFilter(include=config.checkpoint_globs),
        )
        self.history = PathFilter(include=config.history_globs)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._reported: set[str] = set()
        self._stat_cache = StatCache()
        self._store_ok: bool | None = None
        self._store_problem = "store not contacted yet"
        self._manifest: Manifest | None = None
        self._session: StoreSession | None = None
        self._uploader: Uploader | None = None
        self._fatal: BaseException | None = None
        self._scan_requested = False
        self._probe: asyncio.Task[None] | None = None
        # Files still out of sync when the daemon stopped (known after run() returns).
        self.unsent = 0

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def readiness(self) -> tuple[bool, str]:
        if self._manifest is None:
            return False, "manifest not open"
        if self._store_ok is False:
            return False, f"store unreachable: {self._store_problem}"
        return True, "ready"

    async def run(self) -> None:
        """Watch until asked to stop. Configuration errors raise; nothing transient does."""
        from ..service.health import HealthServer

        health = None
        if self.config.metrics_addr is not None:
            host, port = self.config.metrics_addr
            health = HealthServer(host, port, self.metrics, self.readiness)
            await health.start()
        try:
            await self._run()
        finally:
            if health is not None:
                await health.stop()

    async def _run(self) -> None:
        if not await self._wait_for_source():
            return
        self._manifest = Manifest.open(self.push.state_dir)
        self._session = StoreSession(
            open_store(self.push, self._retried), self.push.store.max_attempts,
            sticky=False,
        )
        # Changes under the upload are the settle logic's business, not the uploader's.
        transfer = replace(self.push.transfer, changed_retries=0)
        self._uploader = Uploader(
            store=self._store, manifest=self._manifest, scope=self.scope, config=transfer,
            budget=ByteBudget(transfer.max_memory), temp_dir=self.push.state_dir / "tmp",
        )
        try:
            await self._check_store_at_start()
            await self._loop()
            if self._fatal is None:
                await self._final_pass()
            else:
                raise self._fatal
        finally:
            self._uploader.close()
            await self._session.close()
            self._manifest.close()

    async def _wait_for_source(self) -> bool:
        source = self.push.source
        if not source.is_dir():
            log.info("waiting for %s to appear", source)
        while not source.is_dir():
            pause = min(1.0, self.config.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=pause)
            if self._stopping.is_set():
                # `run`'s training may create DIR and end within one pause: its files
                # still get the shutdown flush.
                return source.is_dir()
        return True

    async def _check_store_at_start(self) -> None:
        """Bad configuration (no such bucket, wrong keys) stops the daemon at once; a store
        that is merely unreachable is waited for."""
        try:
            await self._store()
        except EndpointUnreachable as exc:
            log.warning("%s; will keep trying", exc)

    async def _store(self) -> ObjectStore:
        assert self._session is not None
        try:
            store = await self._session.get()
        except (EndpointUnreachable, FatalStoreError) as exc:
            self._store_reachable(False, str(exc))
            raise
        return store

    def _store_reachable(self, ok: bool, problem: str = "") -> None:
        self._store_ok = ok
        if problem:
            self._store_problem = problem
        self.metrics.store_reachable(ok)

    async def _probe_store(self) -> None:
        """After a failure, ask the store now and then whether it is back, so /readyz
        recovers even when nothing is waiting to be uploaded."""
        try:
            while self._store_ok is False and not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=5.0)
                try:
                    store = await self._store()
                    await store.check_bucket()
                except (StoreError, EndpointUnreachable):
                    continue
                self._store_reachable(True)
                self._wake.set()
        finally:
            self._probe = None

    def _retried(self, exc: Exception, attempt: int, pause: float) -> None:
        self.metrics.retried()
        log.debug("retry %d in %.2fs: %s", attempt, pause, exc)

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        events = None
        if self.config.events:
            events = asyncio.create_task(self._follow_events())
        period = self.config.rescan_interval if events else self.config.interval
        next_scan = 0.0
        cleanup_every = self.config.cleanup_interval
        if self.config.cleanup is not None:
            # Look often enough that a run is cleaned soon after it has been quiet long enough.
            cleanup_every = min(cleanup_every, max(1.0, self.config.cleanup.delete_after / 4))
        next_cleanup = time.time() + cleanup_every
        try:
            while not self._stopping.is_set():
                now = time.time()
                if now >= next_scan or self._scan_requested:
                    self._scan_requested = False
                    await self._full_scan()
                    next_scan = time.time() + period
                self._start_due(time.time())
                assert self._manifest is not None
                self._manifest.commit()
                if self.config.cleanup and time.time() >= next_cleanup:
                    await self._clean()
                    next_cleanup = time.time() + cleanup_every
                self._publish_gauges()
                # With every worker busy, the next finishing upload is what wakes the loop.
                workers_free = len(self._in_flight) < self.push.transfer.workers
                ready = self.tracker.next_ready(self._in_flight) if workers_free else None
                if self._store_ok is False and self._probe is None:
                    self._probe = asyncio.create_task(self._probe_store())
                wake_times = (next_scan, ready, next_cleanup if self.config.cleanup else None)
                wake_at = min(t for t in wake_times if t is not None)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.05, wake_at - time.time()))
        finally:
            for task in (events, self._probe):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _full_scan(self) -> None:
        started = time.monotonic()
        options = ScanOptions(
            follow_symlinks=self.push.follow_symlinks,
            path_filter=PathFilter(self.push.include, self.push.exclude),
            skip_paths=state_dir_inside(self.push.source, self.push.state_dir),
        )
        now = time.time()
        self._stat_cache.begin()
        try:
            async for batch in scan_directories(str(self.push.source), options,
                                                self._stat_cache):
                files: list[tuple[str, ScannedFile]] = []
                for item in batch:
                    if isinstance(item, ScanIssue):
                        self._report_once(item.relative, item.message, item.failed)
                    elif (key := self._key(item)) is not None:
                        files.append((key, item))
                assert self._manifest is not None
                records = self._manifest.lookup_many(self.scope, [key for key, _ in files])
                for key, item in files:
                    self._observe(key, item, records.get(key), now)
        except FileNotFoundError:
            log.info("%s is gone; waiting for it to come back", self.push.source)
        # Files gone since (a run directory deleted under DDP, say) leave the queue.
        for relative in self._stat_cache.end():
            with contextlib.suppress(InvalidKey):
                key = object_key(self.push.destination.prefix, relative)
                if key not in self._in_flight:
                    self.tracker.forget(key)
        self.metrics.scanned(time.monotonic() - started)

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
            self.tracker.forget(key)
            return
        if record is not None and key not in self.tracker:
            self.tracker.remember_sent(key, record.uploaded_at)
        self.tracker.observe(key, item, now)

    def _report_once(self, relative: str, message: str, failed: bool) -> None:
        """Scans repeat every few seconds: say each problem once, not every time."""
        marker = f"{relative}\0{message}"
        if marker in self._reported:
            return
        self._reported.add(marker)
        (log.error if failed else log.warning)("%s: %s", relative, message)

    def _start_due(self, now: float, *, tries: dict[str, int] | None = None) -> None:
        """Start uploads of due candidates; with ``tries`` (the shutdown flush), every
        candidate is due, but each key gets at most FINAL_TRIES attempts."""
        final = tries is not None
        for key, candidate in self.tracker.due(now, final=final):
            if key in self._in_flight:
                continue  # one upload per key; the newer version goes when this one ends
            if len(self._in_flight) >= self.push.transfer.workers:
                break
            if tries is not None:
                if tries.get(key, 0) >= FINAL_TRIES:
                    continue
                tries[key] = tries.get(key, 0) + 1
            task = asyncio.create_task(self._upload(key, candidate.scanned))
            self._in_flight[key] = task

    async def _upload(self, key: str, scanned: ScannedFile) -> None:
        assert self._manifest is not None and self._uploader is not None
        started = time.monotonic()
        try:
            record = self._manifest.lookup(self.scope, key)
            if record is not None and self._rewrites_history(scanned, record):
                await self._preserve(record, scanned)
            outcome = await self._uploader.sync(scanned, key, plan_file(scanned, record))
        except (FatalStoreError, EndpointUnreachable, StoreError) as exc:
            self._store_reachable(False, str(exc))
            log.error("%s: %s; will retry", scanned.relative, exc)
            self.metrics.failed("store")
            self.tracker.failed(key, time.time())
            return
        except ManifestError as exc:
            # Without a manifest nothing can be recorded: stop, and say why.
            self._fatal = exc
            self.request_stop()
            return
        finally:
            self._in_flight.pop(key, None)
            self._wake.set()
        self._handle(key, scanned, outcome, time.monotonic() - started)

    def _handle(
        self, key: str, scanned: ScannedFile, outcome: FileOutcome, seconds: float
    ) -> None:
        now = time.time()
        identity = (scanned.size, scanned.mtime_ns, scanned.inode)
        if outcome.status in ("uploaded", "unchanged"):
            if outcome.status == "uploaded":
                self._store_reachable(True)
                self.metrics.uploaded(outcome.bytes_sent, seconds, _run_of(outcome.relative))
                log.info("uploaded %s -> %s (%d bytes, %s, %.2fs)", outcome.relative, key,
                         outcome.size, outcome.reason, seconds)
            else:
                self.metrics.unchanged()
                log.info("unchanged %s (same content)", outcome.relative)
            # The manifest now holds the identity the uploader actually read.
            assert self._manifest is not None
            record = self._manifest.lookup(self.scope, key)
            sent = (record.size, record.mtime_ns, record.inode) if record else identity
            self.tracker.sent(key, sent, now)
            if record is not None and sent != identity:
                self.tracker.forget(key)
        elif outcome.status == "skipped":
            self.tracker.forget(key)
            # Vanished, or swapped for a symlink and so never read: whatever is there now,
            # the next scan looks at it afresh.
            self._stat_cache.forget(outcome.relative)
            (log.info if outcome.reason == "vanished" else log.warning)(
                "%s: %s", outcome.relative, outcome.reason)
        elif outcome.failure == "changed":
            self.tracker.unsettle(key, now)
            log.info("%s: changed while uploading; waiting for it to settle", outcome.relative)
        else:
            self.metrics.failed(outcome.failure or "other")
            if outcome.failure == "store":
                self._store_reachable(False, outcome.error or "store error")
            self.tracker.failed(key, now)
            log.error("%s: %s; will retry", outcome.relative, outcome.error)

    def _rewrites_history(self, scanned: ScannedFile, record: ObjectRecord) -> bool:
        """An append-only file (results.csv) that shrank or was recreated since its upload:
        overwriting its object would destroy the history it held."""
        return (
            self.history.include != ()
            and self.history.accepts(scanned.relative)
            and record.source == scanned.path
            and (scanned.size < record.size or scanned.inode != record.inode)
        )

    async def _preserve(self, record: ObjectRecord, scanned: ScannedFile) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(record.uploaded_at))
        prefix = self.push.destination.prefix
        history_key = object_key(prefix, f"{HISTORY_DIR}/{scanned.relative}/{stamp}")
        store = await self._store()
        await store.copy_object(record.key, history_key)
        log.info("kept the previous %s as %s before overwriting it", record.key, history_key)

    async def _final_pass(self) -> None:
        """Shutdown: send everything out of sync now, then wait up to --grace."""
        deadline = time.monotonic() + self.config.grace
        log.info("stopping: final scan, then up to %.0fs for uploads", self.config.grace)
        with contextlib.suppress(OSError):
            await self._full_scan()
        tries: dict[str, int] = {}
        while time.monotonic() < deadline:
            self._start_due(time.time(), tries=tries)
            if not self._in_flight:
                break
            await asyncio.wait(
                list(self._in_flight.values()), timeout=deadline - time.monotonic(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        if self._in_flight:
            log.warning("grace period over: %d upload(s) kept for the next start",
                        len(self._in_flight))
            for task in self._in_flight.values():
                task.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        self.unsent = len(self.tracker)
        if self.unsent:
            log.warning("%d file(s) not uploaded before exit; they go up on the next start",
                        self.unsent)

    # -- events, cleanup, metrics -------------------------------------------------------------

    async def _follow_events(self) -> None:
        """inotify (through watchfiles) only wakes the loop early; scans stay the truth."""
        try:
            from watchfiles import awatch
        except ImportError:  # pragma: no cover - a dependency, but keep the daemon alive
            return
        while not self._stopping.is_set():
            try:
                async for changes in awatch(
                    self.push.source, stop_event=self._stopping, debounce=200, step=50,
                    recursive=True, yield_on_timeout=False,
                ):
                    self._on_events(changes)
            except (FileNotFoundError, RuntimeError, OSError) as exc:
                log.debug("event watch stopped (%s); scans continue", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.config.interval)

    def _on_events(self, changes: Iterable[tuple[object, str]]) -> None:
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
                    self.tracker.forget(object_key(self.push.destination.prefix, relative))
                continue
            if stat.S_ISREG(st.st_mode):
                item = ScannedFile(path, relative, st.st_size, st.st_mtime_ns, st.st_ino,
                                   st.st_dev, root)
                if (key := self._key(item)) is not None:
                    assert self._manifest is not None
                    self._observe(key, item, self._manifest.lookup(self.scope, key), now)
            elif stat.S_ISDIR(st.st_mode):
                # A new directory may hold files written before its watch was in place
                # (mkdir, then write at once): scan instead of trusting events for it.
                self._scan_requested = True
        self._wake.set()

    async def _clean(self) -> None:
        from .cleanup import CleanupPolicy, clean_quiet_runs

        settings = self.config.cleanup
        assert settings is not None and self._manifest is not None
        policy = CleanupPolicy(
            delete_after=settings.delete_after, keep=settings.keep, dry_run=settings.dry_run,
            run_depth=settings.run_depth,
        )
        try:
            store = await self._store()
            decisions = await clean_quiet_runs(
                source=self.push.source, prefix=self.push.destination.prefix,
                manifest=self._manifest, scope=self.scope, store=store,
                policy=policy,
            )
        except (StoreError, EndpointUnreachable, OSError) as exc:
            log.warning("cleanup skipped this time: %s", exc)
            return
        for decision in decisions:
            if decision.action == "deleted":
                self.metrics.deleted()

    def _publish_gauges(self) -> None:
        self.metrics.set_queue_depth(len(self.tracker))
        self.metrics.set_in_flight(len(self._in_flight))


def _run_of(relative: str) -> str:
    """The run label of a file: its top-level directory under the source."""
    head, _, rest = relative.partition("/")
    return head if rest else "."
