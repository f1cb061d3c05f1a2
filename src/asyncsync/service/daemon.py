"""The daemon apart from its work (uvicorn's `Server` apart from the app).

`Daemon` owns what watch and run share whatever they sync: the lifecycle (the loop that ticks
its `Service` until asked to stop, then the shutdown, with a flush unless something fatal
happened), the signals, the health server with readiness, and the daemon's state. The work
(watch's queue of files, `pipeline.syncqueue` driven by `commands/watch.py`) reports to the
daemon through the `QueueObserver` methods; readers get the state only as a frozen `Snapshot`:
per run directory the files pending, the last successful upload and the failures, plus whether
the store answers and the manifest is open. /readyz and the gauges of /metrics are read from
it, and so will be a web page.

`service.signals.Signals` is the one SIGINT/SIGTERM policy of every command (push, watch,
run); the daemon installs it for watch and run: the first signal drains (push cancels, watch
stops scanning and flushes, run passes it to the training's process group), a second one
exits at once with 128+N, SIGKILLing the training's group first when there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from ..config import WatchConfig
from ..errors import TransientStoreError
from ..pipeline.events import FileOutcome, NoEvents, Status
from .signals import Signals

if TYPE_CHECKING:
    # Imported only where a Daemon uses them: aiohttp.web with prometheus_client would add
    # some 40 ms to the start of every command that loads this module.
    from .health import HealthServer
    from .metrics import Metrics
    from .statusline import StatusLine

log = logging.getLogger("asyncsync")

ABOVE_RUNS = "."
"""The run of the files that lie no deeper than the run directories themselves."""


def run_depth_of(config: WatchConfig) -> int:
    """How many levels below SRC a run directory lies (``--run-depth``)."""
    return config.run_depth


def run_of(relative: str, depth: int) -> str:
    """The run directory a file belongs to: its first ``depth`` path segments
    (``detect/train2`` for ``detect/train2/weights/last.pt`` at depth 2), or `ABOVE_RUNS`."""
    parts = relative.split("/", depth)
    return "/".join(parts[:depth]) if len(parts) > depth else ABOVE_RUNS


# -- the state and its snapshot ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunStatus:
    """One run directory as the daemon sees it."""

    pending: int = 0  # files out of sync with the bucket, uploading ones included
    pending_bytes: int = 0  # their sizes as last seen
    last_sync: float | None = None  # Unix time of the last upload of one of its files
    failures: int = 0  # failed uploads since the daemon started


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon's state at one moment, read-only."""

    runs: Mapping[str, RunStatus]  # by run directory (`run_of`)
    in_flight: int
    store_up: bool | None  # None: not contacted yet
    store_problem: str
    manifest_open: bool

    @property
    def pending(self) -> int:
        return sum(status.pending for status in self.runs.values())

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) as /readyz answers. Reasons start with `health.PUBLIC_REASONS`
        words, so that a server on a public address may say which part is at fault."""
        if not self.manifest_open:
            return False, "manifest not open"
        if self.store_up is False:
            return False, f"store unreachable: {self.store_problem}"
        return True, "ready"


class Service(Protocol):
    """The work a `Daemon` drives."""

    async def start(self) -> None:
        """Before the first tick (bad configuration raises here)."""

    async def tick(self, now: float) -> float:
        """Do what is due; return when the next tick is wanted (the daemon may come sooner)."""

    async def shutdown(self, *, flush: bool) -> None:
        """Stop; with ``flush``, send what is still out of sync first."""


class _StoreEvents(NoEvents):
    """What the daemon takes from the pipeline's events rather than from its work: the
    store's retries and the bytes it sent (the outcomes come through the queue)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        self._metrics.retried(exc, attempt, pause)
        log.debug("retry %d in %.2fs: %s", attempt, pause, exc)

    def sent(self, nbytes: int) -> None:
        self._metrics.sent(nbytes)


class Daemon:
    """Lifecycle, signals, health and the state snapshot of watch and run."""

    def __init__(
        self, config: WatchConfig, *, metrics: Metrics | None = None,
        drain: Callable[[int], None] | None = None, status: StatusLine | None = None,
    ) -> None:
        """``drain``: what a first signal does while no child runs (default: say so and
        stop, as watch does). ``status``: the terminal's status line (watch on a tty)."""
        from .metrics import Metrics

        self.config = config
        self.metrics = metrics or Metrics(
            run_depth=config.run_depth, daemon=True, source=str(config.push.source),
            run_ttl=config.metrics_run_ttl, max_runs=config.metrics_max_runs,
        )
        self.events = _StoreEvents(self.metrics)  # the `Events` sink for `Pipeline.open`
        self.signals = Signals(drain or self._stop_on_signal)
        self.run_depth = run_depth_of(config)
        self._stopping = asyncio.Event()
        self.writers_gone = False  # `run`: the training exited, nothing writes SRC now
        self._wake = asyncio.Event()
        self._fatal: BaseException | None = None
        self._health: HealthServer | None = None
        # The state: written by the report methods below, read only through snapshot().
        self._runs: dict[str, RunStatus] = {}
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._store_up: bool | None = None
        self._store_problem = "store not contacted yet"
        self._manifest_open = False
        # The per-run gauges as last set: only what moved is set again on a tick.
        self._exported_syncs: dict[str, float] = {}
        self._exported_pending: dict[str, tuple[int, int]] = {}
        self.status = status
        self._last_upload: tuple[str, float] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Daemon]:
        """Signals handled, and the health server up with --metrics-addr, for the duration."""
        self.signals.install(asyncio.get_running_loop())
        if self.config.metrics_addr is not None:
            from .health import HealthServer

            host, port = self.config.metrics_addr
            self._health = HealthServer(host, port, self.metrics, self.readiness)
            await self._health.start()
        # "12s ago" must move while nothing happens: the line is redrawn every second.
        redraw = asyncio.create_task(self._redraw()) if self.status is not None else None
        try:
            yield self
        finally:
            if redraw is not None:
                redraw.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await redraw
            if self.status is not None:
                self.status.close()
            if self._health is not None:
                await self._health.stop()
                self._health = None

    async def _redraw(self) -> None:
        while True:
            self._show_status()
            await asyncio.sleep(1.0)

    def _show_status(self) -> None:
        if self.status is not None:
            from .statusline import describe

            self.status.show(describe(self.snapshot(), self._last_upload,
                                      self._in_flight_bytes))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def store_up(self) -> bool | None:
        """Whether the last store request succeeded (None: none made yet)."""
        return self._store_up

    def request_stop(self, *, writers_gone: bool = False) -> None:
        """Stop; ``writers_gone``: nothing writes SRC any more (`run`'s training exited), so
        the shutdown flush need not wait for files to settle."""
        self.writers_gone = self.writers_gone or writers_gone
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """Something may be due now: tick without waiting for the time the service asked."""
        self._wake.set()

    def fail(self, exc: BaseException) -> None:
        """The work cannot go on (the manifest failed): stop without a flush; `serve`
        raises ``exc``."""
        if self._fatal is None:
            self._fatal = exc
        self.request_stop()

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less when asked to stop; True if stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self.stopping

    async def serve(self, service: Service) -> None:
        """Tick ``service`` until asked to stop, then shut it down (flushing unless fatal)."""
        await service.start()
        try:
            while not self.stopping:
                # Cleared before the tick, so that an upload ending during it ticks again.
                self._wake.clear()
                wake_at = await service.tick(time.time())
                self.publish()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.05, wake_at - time.time()))
        except BaseException:
            await service.shutdown(flush=False)
            raise
        await service.shutdown(flush=self._fatal is None)
        self.publish()
        if self._fatal is not None:
            raise self._fatal

    def _stop_on_signal(self, signum: int) -> None:
        log.warning("%s received: stopping (again to force)", signal.Signals(signum).name)
        self.request_stop()

    # -- what the work reports (pipeline.syncqueue.QueueObserver) ------------------------------

    def pending(self, relative: str, delta: int, nbytes: int) -> None:
        run = run_of(relative, self.run_depth)
        status = self._runs.get(run, RunStatus())
        status = replace(status, pending=max(0, status.pending + delta),
                         pending_bytes=max(0, status.pending_bytes + delta * nbytes))
        if status.pending == 0:
            status = replace(status, pending_bytes=0)
        if status == RunStatus():
            self._runs.pop(run, None)  # nothing to say about it any more: the map stays small
        else:
            self._runs[run] = status

    def outcome(self, outcome: FileOutcome) -> None:
        """One file's upload ended (any status)."""
        if outcome.status is Status.UPLOADED:
            run = run_of(outcome.relative, self.run_depth)
            now = time.time()
            self._runs[run] = replace(self._runs.get(run, RunStatus()), last_sync=now)
            self._last_upload = (outcome.relative, now)
        elif outcome.status is Status.FAILED:
            run = run_of(outcome.relative, self.run_depth)
            status = self._runs.get(run, RunStatus())
            self._runs[run] = replace(status, failures=status.failures + 1)
        self.metrics.outcome(outcome)

    def torn(self, reads: int) -> None:
        self.metrics.torn_reads.inc(reads)

    def history_copied(self) -> None:
        self.metrics.history_copied()

    def in_flight(self, n: int, nbytes: int = 0) -> None:
        self._in_flight = n
        self._in_flight_bytes = nbytes

    def store_reachable(self, ok: bool, problem: str = "") -> None:
        self._store_up = ok
        if problem:
            self._store_problem = problem

    def manifest_open(self, is_open: bool) -> None:
        self._manifest_open = is_open

    def scanned(self, seconds: float) -> None:
        self.metrics.scanned_tree(seconds)

    def deleted(self) -> None:
        self.metrics.deleted()

    def cleanup_failed(self) -> None:
        self.metrics.cleanup_failed()

    # -- what readers get -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        # RunStatus values are frozen, so a shallow copy of the map is a true snapshot.
        return Snapshot(
            runs=MappingProxyType(dict(self._runs)), in_flight=self._in_flight,
            store_up=self._store_up, store_problem=self._store_problem,
            manifest_open=self._manifest_open,
        )

    def readiness(self) -> tuple[bool, str]:
        return self.snapshot().readiness()

    def publish(self) -> Snapshot:
        """Set the gauges of /metrics from a fresh snapshot, and return it."""
        snapshot = self.snapshot()
        metrics = self.metrics
        metrics.set_queue_depth(snapshot.pending)
        metrics.set_in_flight(snapshot.in_flight, self._in_flight_bytes)
        if snapshot.store_up is not None:
            metrics.store_reachable(snapshot.store_up)
        for run, status in snapshot.runs.items():
            # Only the runs whose figures moved: a label lookup per run on every tick adds up.
            if status.last_sync is not None and self._exported_syncs.get(run) != status.last_sync:
                metrics.run_synced(run, status.last_sync)
                self._exported_syncs[run] = status.last_sync
            pending = (status.pending, status.pending_bytes)
            if self._exported_pending.get(run, (0, 0)) != pending:
                metrics.run_pending(run, *pending)
                self._exported_pending[run] = pending
        for run in [run for run in self._exported_pending if run not in snapshot.runs]:
            # In sync now: its gauges say 0 (until the TTL removes the run's series).
            if self._exported_pending.pop(run) != (0, 0):
                metrics.run_pending(run, 0, 0)
        for run in [run for run in self._exported_syncs if run not in snapshot.runs]:
            del self._exported_syncs[run]
        if metrics.expire():
            self._exported_syncs = {r: t for r, t in self._exported_syncs.items()
                                    if r in snapshot.runs}
        self._show_status()
        return snapshot
