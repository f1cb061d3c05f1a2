"""`watch`: the push pipeline run forever, for directories that training is still writing.

Three parts, each in its own module: the `service.daemon.Daemon` (lifecycle, signals,
/healthz /readyz /metrics, the state snapshot), the `pipeline.syncqueue.SyncQueue` (observe ->
due -> upload -> handle, the final flush) and, here, `WatchService`, what the daemon ticks:
when to scan (every ``--interval`` seconds, or ``--rescan-interval`` while inotify events
wake it earlier), when to clean quiet runs, and asking a store that failed whether it is back.

Transient store failures never stop the daemon: files back off and go again; /readyz says
the store is away. Bad configuration (no such bucket, wrong credentials) raises at start. On
SIGTERM/SIGINT it stops scanning, sends what changed (pacing no longer applies, a file need
hold still for only a second, the torn-read checks still apply), waits up to ``--grace``
seconds for uploads in flight, and exits 0; multipart uploads still running then are kept
in the manifest and resume on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..config import WatchConfig
from ..errors import EndpointUnreachable, ManifestFull, StoreError
from ..names import printable
from ..pipeline.session import Pipeline, never_resumed
from ..pipeline.syncqueue import SyncQueue
from ..service.daemon import Daemon

if TYPE_CHECKING:
    from ..service.statusline import StatusLine
    from .serve import ServeConfig

log = logging.getLogger("asyncsync")

# How often a store that failed is asked whether it is back, so that /readyz recovers even
# when nothing is waiting to be uploaded.
PROBE_SECONDS = 5.0
# How often a manifest kept shut by a full state disk is tried again.
ROOM_POLL_SECONDS = 2.0


async def run_watch(config: WatchConfig, status: StatusLine | None = None, *,
                    browser: ServeConfig | None = None) -> None:
    """`asyncsync watch`: until SIGINT/SIGTERM. Configuration errors raise. ``status``:
    the one-line status drawn on a terminal; ``browser``: the run browser of DEST served
    beside the daemon (--serve), showing its live snapshot."""
    daemon = Daemon(config, status=status)
    async with daemon.running(), contextlib.AsyncExitStack() as serving:
        if browser is not None:
            from .serve import browse

            await serving.enter_async_context(browse(browser, live=daemon.snapshot))
        await watch(config, daemon)


@contextlib.asynccontextmanager
async def open_pipeline(config: WatchConfig, daemon: Daemon) -> AsyncIterator[Pipeline | None]:
    """The stages for a daemon, with /readyz told whether the manifest is open. A manifest
    that cannot be opened for want of room (a full state disk) is waited for, as a store
    outage is; None: a signal came first."""
    async with contextlib.AsyncExitStack() as stack:
        pipeline = await _open_when_there_is_room(config, daemon, stack)
        if pipeline is None:
            yield None
            return
        daemon.manifest_open(True)
        try:
            yield pipeline
        finally:
            daemon.manifest_open(False)


async def _open_when_there_is_room(
    config: WatchConfig, daemon: Daemon, stack: contextlib.AsyncExitStack
) -> Pipeline | None:
    waiting = False
    while True:
        try:
            # daemon=True: a store outage is not remembered; settles=True: a file that
            # changes under its upload is the queue's business (it waits to settle again).
            pipeline = await stack.enter_async_context(
                Pipeline.open(config.push, daemon.events, daemon=True, settles=True))
        except ManifestFull as exc:
            if not waiting:
                log.error("%s; waiting for room (trying again every %.0fs)", exc,
                          ROOM_POLL_SECONDS)
                waiting = True
        else:
            if waiting:
                log.info("the manifest is open: there is room again")
            return pipeline
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(daemon.signals.arrived.wait(), ROOM_POLL_SECONDS)
        if daemon.signals.received or daemon.stopping:
            return None


async def watch(config: WatchConfig, daemon: Daemon, pipeline: Pipeline | None = None) -> int:
    """Keep SRC mirrored until ``daemon`` stops (with the stages ``pipeline`` opened already,
    as `run` does); return how many files were left out of sync."""
    if not await _wait_for_source(config, daemon):
        return 0
    if pipeline is None:
        async with open_pipeline(config, daemon) as opened:
            # None: stopped while a full state disk kept the manifest shut; nothing was read.
            return 0 if opened is None else await _serve(config, daemon, opened)
    return await _serve(config, daemon, pipeline)


async def _serve(config: WatchConfig, daemon: Daemon, pipeline: Pipeline) -> int:
    service = WatchService(config, daemon, pipeline)
    await daemon.serve(service)
    return service.unsent


async def _wait_for_source(config: WatchConfig, daemon: Daemon) -> bool:
    source = config.push.source
    if not source.is_dir():
        log.info("waiting for %s to appear", source)
    while not source.is_dir():
        if await daemon.sleep(min(1.0, config.interval)):
            # `run`'s training may create DIR and end within one pause: its files still
            # get the shutdown flush.
            return source.is_dir()
    return True


class WatchService:
    """What the daemon ticks for watch and run: scans, the queue, inotify, cleanup, probes."""

    def __init__(self, config: WatchConfig, daemon: Daemon, pipeline: Pipeline) -> None:
        self.config = config
        self.daemon = daemon
        self.pipeline = pipeline
        self.queue = SyncQueue(config, pipeline, daemon)
        self.unsent = 0  # files still out of sync after the shutdown (flush or not)
        self._events: asyncio.Task[None] | None = None
        # Set at shutdown: watchfiles' reader thread polls it, and cannot be cancelled.
        self._events_stop = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None
        self._period = config.interval
        self._next_scan = 0.0
        self._disk_full = False  # the last commit failed for room: said once, retried
        self._cleanup_every = config.cleanup_interval
        if config.cleanup is not None:
            # Look often enough that a run is cleaned soon after it has been quiet long enough.
            self._cleanup_every = min(self._cleanup_every,
                                      max(1.0, config.cleanup.delete_after / 4))
        self._next_cleanup = time.time() + self._cleanup_every

    async def start(self) -> None:
        self.daemon.metrics.watch_pipeline(self.pipeline)
        push = self.config.push
        log.info("watching %s -> %s (settle %gs, %s)", printable(str(push.source)),
                 printable(push.destination.url), self.config.settle,
                 "inotify events" if self.config.events else f"a scan every {self._period:g}s")
        if await self._check_store_at_start():
            await self._abort_orphans()
        if self.config.events:
            self._events = asyncio.create_task(self._follow_events())
            self._period = self.config.rescan_interval

    async def tick(self, now: float) -> float:
        if now >= self._next_scan or self.queue.rescan_requested:
            self.queue.rescan_requested = False
            await self.queue.scan()
            self._next_scan = time.time() + self._period
        self.queue.start_due(time.time())
        self._commit()
        if self.config.cleanup is not None and time.time() >= self._next_cleanup:
            await self._clean()
            self._next_cleanup = time.time() + self._cleanup_every
        if self.daemon.store_up is False and self._probe is None:
            self._probe = asyncio.create_task(self._probe_store())
        wake_times = (self._next_scan, self.queue.next_ready(),
                      self._next_cleanup if self.config.cleanup is not None else None)
        return min(t for t in wake_times if t is not None)

    def _commit(self) -> None:
        """Commit what this tick recorded. A full state directory is ridden out as a store
        outage is: said once, committed on a later tick once there is room (the uploads
        whose rows are lost if the manifest gave them up are sent again on a restart)."""
        try:
            self.pipeline.manifest.commit()
        except ManifestFull as exc:
            if not self._disk_full:
                log.error("%s; uploads go on, recorded once there is room", exc)
            self._disk_full = True
            return
        if self._disk_full:
            log.info("the manifest is written again")
        self._disk_full = False

    async def shutdown(self, *, flush: bool) -> None:
        self._events_stop.set()
        for task in (self._events, self._probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if flush:
            self.unsent = await self.queue.flush(self.config.grace,
                                                 writers_gone=self.daemon.writers_gone)
            await self._abort_orphans()
        else:
            await self.queue.abandon()
            self.unsent = len(self.queue)

    # -- the store ----------------------------------------------------------------------------

    async def _check_store_at_start(self) -> bool:
        """Bad configuration (no such bucket, wrong keys) raises; a store that is merely
        unreachable is waited for (False)."""
        try:
            await self.queue.store()
        except EndpointUnreachable as exc:
            log.warning("%s; will keep trying", exc)
            return False
        return True

    async def _abort_orphans(self) -> None:
        """Uploads an earlier daemon left for files deleted since, or small enough now for
        one PUT, can never resume (at start, and after the shutdown flush sent the final,
        stripped checkpoints)."""
        transfer = self.config.push.transfer
        try:
            await self.pipeline.abort_orphans(
                lambda pending: not never_resumed(pending, transfer))
        except (StoreError, EndpointUnreachable) as exc:
            log.warning("stale uploads not aborted this time: %s", exc)

    async def _probe_store(self) -> None:
        try:
            while self.daemon.store_up is False:
                if await self.daemon.sleep(PROBE_SECONDS):
                    return
                try:
                    store = await self.queue.store()
                    await store.check_bucket()
                except (StoreError, EndpointUnreachable):
                    continue
                self.daemon.store_reachable(True)
                self.daemon.wake()
        finally:
            self._probe = None

    # -- inotify, cleanup ---------------------------------------------------------------------

    async def _follow_events(self) -> None:
        """inotify (through watchfiles) only wakes the daemon early; scans stay the truth."""
        try:
            from watchfiles import awatch
        except ImportError:  # pragma: no cover - a dependency, but keep the daemon alive
            return
        while not (self._events_stop.is_set() or self.daemon.stopping):
            try:
                async for changes in awatch(
                    self.config.push.source, stop_event=self._events_stop, debounce=200, step=50,
                    recursive=True, yield_on_timeout=False,
                ):
                    self.queue.observe_changes(changes)
                    self.daemon.wake()
            except (FileNotFoundError, RuntimeError, OSError) as exc:
                log.debug("event watch stopped (%s); scans continue", exc)
            await self.daemon.sleep(self.config.interval)

    async def _clean(self) -> None:
        from .cleanup import CleanupPolicy, clean_quiet_runs

        settings = self.config.cleanup
        assert settings is not None
        policy = CleanupPolicy(
            delete_after=settings.delete_after, keep=settings.keep, dry_run=settings.dry_run,
            run_depth=settings.run_depth,
        )
        try:
            store = await self.queue.store()
            decisions = await clean_quiet_runs(
                source=self.config.push.source, prefix=self.config.push.destination.prefix,
                manifest=self.pipeline.manifest, scope=self.pipeline.scope, store=store,
                policy=policy,
            )
        except (StoreError, EndpointUnreachable, OSError) as exc:
            log.warning("cleanup skipped this time: %s", exc)
            self.daemon.cleanup_failed()
            return
        for decision in decisions:
            if decision.action == "deleted":
                self.daemon.deleted()
            elif decision.action == "kept" and decision.reason.startswith("cannot "):
                # Kept because it could not be read or deleted, not by the policy: a disk
                # that cleanup cannot free fills up (the cleanup-failing alert).
                self.daemon.cleanup_failed()
