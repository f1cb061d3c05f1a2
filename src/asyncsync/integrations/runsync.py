"""Mirror one training run from inside the training process.

`RunSync` owns what an in-process integration needs besides the framework's callbacks:
a thread with its own event loop (uploads never run on the training's thread), the
consistent copies of checkpoints that the framework rewrites in place (`staging`), ordered
snapshot uploads (one per key, the newest waiting replaces an older one),
passes of push's own pipeline over the run directory, the run record, and a final flush
bounded in time. `integrations.ultralytics` drives it from ultralytics' callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..commands.record import RECORD_PATH, RunRecord, now_iso, read_results
from ..config import PushConfig
from ..errors import AsyncsyncError, TransientStoreError
from ..names import PrintableFormatter
from ..pipeline.events import Events, Fanout, FileOutcome, Status
from ..pipeline.keys import InvalidKey, object_key
from ..pipeline.mirror import mirror
from ..pipeline.plan import Action, plan_file
from ..pipeline.scan import FileStat, ScanIssue, ScannedFile
from ..pipeline.session import Pipeline
from ..pipeline.source import SourceRoot
from ..report import Reporter
from .staging import CheckpointStaging

if TYPE_CHECKING:
    from ..service.health import HealthServer
    from ..service.metrics import Metrics

log = logging.getLogger("asyncsync.training")

T = TypeVar("T")

# Passes of the final flush over files that failed (a plot still being written, a store
# that hiccupped): each pass retries only what is still out of sync.
FINAL_PASSES = 3

BackgroundWriters = Callable[[], list[threading.Thread]]


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, AsyncsyncError):
        text += f" ({cause})"
    return text


def _join(threads: list[threading.Thread], deadline: float) -> None:
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _ensure_visible_logging() -> None:
    """The summary and warnings must reach the training's console even when the script
    configured no logging (Python would drop INFO and format WARNING bare)."""
    root_logger = logging.getLogger("asyncsync")
    if root_logger.hasHandlers():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("asyncsync: %(message)s"))
    root_logger.addHandler(handler)
    if root_logger.level == logging.NOTSET:
        root_logger.setLevel(logging.INFO)


class _EventLoopThread:
    """An asyncio event loop in a daemon thread: uploads never run on the training's thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Whatever a timed-out flush left running is cancelled, not destroyed pending.
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)


class _RunTally(Reporter):
    """The run's outcomes over every pass and snapshot: what was sent, and which files are
    still not (a later pass that sends the file, or finds it unchanged, takes it off). It
    prints nothing per file: the training's console gets warnings and one summary line."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        super().__init__()
        self.files = 0
        self.bytes = 0
        self.unsent: dict[str, str] = {}  # relative path -> why
        self._warn = warn

    def outcome(self, outcome: FileOutcome) -> None:
        if outcome.status is Status.UPLOADED:
            self.files += 1
            self.bytes += outcome.bytes_sent
        if outcome.status is Status.FAILED:
            self.unsent[outcome.relative] = outcome.error or "failed"
            log.debug("%s: %s", outcome.relative, outcome.error)
        else:
            self.unsent.pop(outcome.relative, None)

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        # The training's console is no place for every retry: a store that stays away is
        # said once, by the pass that fails.
        log.debug("retry %d in %.2fs: %s", attempt, pause, exc)

    def unchanged_files(self, prefix: str, key_prefix: str, files: list[FileStat]) -> None:
        if self.unsent:
            for name, *_ in files:
                self.unsent.pop(prefix + name, None)

    def issue(self, issue: ScanIssue) -> None:
        self._warn(f"{issue.relative}: {issue.message}")


class RunSync:
    """One training run's uploader: the staging area, the event loop thread and the
    pipeline stages (manifest, store, uploader) it drives."""

    def __init__(
        self, template: PushConfig, run_dir: Path, weights_dir: Path, *, flush_timeout: float,
        epochs_planned: int | None, background_writers: BackgroundWriters,
        checkpoint_interval: float = 0.0, metrics_addr: tuple[str, int] | None = None,
    ) -> None:
        """``background_writers``: the threads the framework runs that may still be writing
        into the run directory (ultralytics' plotting threads); passes wait for them.
        ``checkpoint_interval``: a checkpoint is snapshotted at most once per this many
        seconds (0: every time it changes); the final flush sends the last one anyway.
        ``metrics_addr``: serve /metrics (and /healthz, /readyz) there while the run lasts."""
        _ensure_visible_logging()
        self.run_dir = run_dir.resolve()
        self.weights_dir = weights_dir.resolve()
        self._writers = background_writers
        destination = template.destination
        prefix = object_key(destination.prefix, self.run_dir.name) if destination.prefix \
            else self.run_dir.name
        self.config = replace(template, source=self.run_dir,
                              destination=replace(destination, prefix=prefix))
        # During training the weights go up as snapshots only: the per-epoch pass skips them.
        self.epoch_config = self.config
        if self.weights_dir.is_relative_to(self.run_dir) and self.weights_dir != self.run_dir:
            weights = glob.escape(self.weights_dir.relative_to(self.run_dir).as_posix())
            self.epoch_config = replace(self.config, exclude=(*self.config.exclude,
                                                              f"{weights}/*"))
        self.flush_timeout = flush_timeout
        self.staging = CheckpointStaging(
            self.config.state_dir, self.run_dir, self.weights_dir,
            checkpoint_interval=checkpoint_interval, on_copied=self._copied,
            on_failed=self._failed,
        )
        self._finished = False
        self._closed = False
        self._deadline: float | None = None
        self._flush_started = 0.0
        self.tally = _RunTally(self._warn_once)
        self.metrics_addr = metrics_addr
        self.metrics: Metrics | None = None
        self.events: Events = self.tally
        if metrics_addr is not None:
            from ..service.metrics import Metrics

            # Every file of this pipeline belongs to the one run: its directory's name, as
            # its prefix in the bucket is named.
            self.metrics = Metrics(daemon=True, source=str(self.run_dir), run=self.run_dir.name)
            self.metrics.training_status = "running"
            self.events = Fanout((self.tally, self.metrics))
        self._health: HealthServer | None = None
        self._warned: set[str] = set()
        # Why the last pass stopped short (no bucket, store away), until one goes through.
        self.problem: str | None = None
        self._thread = _EventLoopThread(f"asyncsync-{self.run_dir.name}")
        try:
            self._thread.submit(self._open(epochs_planned)).result(timeout=60)
        except BaseException:
            self._thread.stop(5)
            self.staging.close()
            raise
        log.info("mirroring %s to %s", self.run_dir, self.config.destination.url)

    # --- the training's thread ---

    def snapshot_weights(self) -> None:
        """Queue a copy of each checkpoint the trainer just wrote; the training goes on at
        once. The trainer must not write its weights again before `wait_for_snapshots` has
        returned."""
        self.staging.snapshot()

    def wait_for_snapshots(self) -> None:
        """Return once the checkpoint copies under way are made: the trainer may then
        rewrite its weights (the framework calls this before its next save)."""
        self.staging.wait()

    def epoch_done(self) -> None:
        """Sync results.csv, args.yaml and the plots once the plotting threads are done."""
        self._submit(self._sync_epoch(self._writers()), "epoch sync")

    def flush(self, *, finished: bool = False) -> None:
        """The final flush: returns when the bucket holds the run directory as it is now,
        or when the flush timeout has passed (what was left is then logged)."""
        self.wait_for_snapshots()
        if finished:
            self._finished = True
        if self._deadline is None:
            self._flush_started = time.monotonic()
            self._deadline = self._flush_started + self.flush_timeout
        elif time.monotonic() >= self._deadline:
            return  # on_train_end's flush used the whole timeout (and said so)
        _join(self._writers(), self._deadline)
        future = self._thread.submit(self._final_sync())
        try:
            future.result(timeout=max(0.0, self._deadline - time.monotonic()))
        except FutureTimeout:
            future.cancel()
            self.problem = f"the final flush took longer than {self.flush_timeout:.0f} s"
            self._warn_once(f"final flush stopped: {self.problem}")
        except Exception as exc:  # noqa: BLE001 - said once; the training goes on
            self._failed("final flush", exc)

    def close(self, error: BaseException | None) -> None:
        """teardown: flush (again: cheap when on_train_end already did), write the final
        run record, print the summary, and stop the thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            # on_train_end runs only when the training loop completed.
            status = "finished" if self._finished else "crashed"
            fields: dict[str, Any] = {"status": status, "ended": now_iso(),
                                      "unsent": len(self.tally.unsent)}
            if error is not None and not self._finished:
                fields["error"] = f"{type(error).__name__}: {error}"[:500]
            try:
                self._thread.submit(self._finish(fields)).result(timeout=30)
            except Exception as exc:  # noqa: BLE001 - the summary below says what matters
                log.warning("could not close the uploader cleanly: %s", describe(exc))
            # flush() waited for the copies, so the copier queues no more uploads; the loop
            # stops first so that no upload still in flight reads a removed staged file.
            self._thread.stop(10)
            self.staging.close()
            self._summary(status, time.monotonic() - self._flush_started)

    # --- any thread ---

    def _copied(self, relative: str, staged: Path) -> None:
        """The copier's thread: a consistent copy is made; queue its upload."""
        self._submit(self._queue_snapshot(relative, staged), "checkpoint upload")

    def _submit(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        def done(future: Future[None]) -> None:
            if future.cancelled():
                return
            exc = future.exception()
            if exc is not None:
                self._failed(what, exc)

        self._thread.submit(coro).add_done_callback(done)

    def _failed(self, what: str, exc: BaseException) -> None:
        problem = describe(exc)
        if problem != self.problem:  # one warning per cause, not one per callback
            log.warning("%s failed: %s", what, problem)
        self.problem = problem

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _summary(self, status: str, flush_seconds: float) -> None:
        where = self.config.destination.url
        sent = f"{self.tally.files} upload(s), {self.tally.bytes / 1e6:.1f} MB"
        if self.problem:
            log.warning("%s -> %s: NOT in sync: %s; %s; run %s",
                        self.run_dir.name, where, self.problem, sent, status)
        elif self.tally.unsent:
            first = next(iter(self.tally.unsent.items()))
            log.warning("%s -> %s: %d file(s) NOT uploaded (%s: %s); %s; run %s",
                        self.run_dir.name, where, len(self.tally.unsent), *first, sent, status)
        else:
            log.info("%s -> %s: in sync; %s; final flush %.1f s; run %s",
                     self.run_dir.name, where, sent, flush_seconds, status)

    # --- the event loop's thread ---

    async def _open(self, epochs_planned: int | None) -> None:
        config = self.config
        self._stages = contextlib.AsyncExitStack()
        # A daemon's pipeline: a store that is away for an epoch is tried again at the next.
        self.pipeline = await self._stages.enter_async_context(
            Pipeline.open(config, self.events, daemon=True)
        )
        if self.metrics is not None and self.metrics_addr is not None:
            from ..service.health import HealthServer

            self.metrics.watch_pipeline(self.pipeline)
            host, port = self.metrics_addr
            self._health = HealthServer(host, port, self.metrics, self._readiness)
            await self._health.start()
            self._stages.push_async_callback(self._health.stop)
        self.manifest, self.session = self.pipeline.manifest, self.pipeline.session
        self.scope, self.uploader = self.pipeline.scope, self.pipeline.uploader
        self.lock = asyncio.Lock()  # one tree sync (and record write) at a time
        self.uploading: dict[str, asyncio.Task[None]] = {}
        self.waiting: dict[str, Path] = {}
        self.record = RunRecord(
            self.session, object_key(config.destination.prefix, RECORD_PATH),
            run=self.run_dir.name, epochs_planned=epochs_planned,
        )
        self._background(self._first_record())

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._report_task)

    def _report_task(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._failed("upload", exc)

    async def _queue_snapshot(self, relative: str, staged: Path) -> None:
        superseded = self.waiting.pop(relative, None)
        if superseded is not None:
            superseded.unlink(missing_ok=True)
        if relative in self.uploading:
            self.waiting[relative] = staged  # one upload per key: versions land in order
        else:
            self._start_snapshot(relative, staged)

    def _start_snapshot(self, relative: str, staged: Path) -> None:
        task = asyncio.get_running_loop().create_task(self._send_snapshot(relative, staged))
        self.uploading[relative] = task

        def done(finished: asyncio.Task[None]) -> None:
            self.uploading.pop(relative, None)
            self._report_task(finished)
            following = self.waiting.pop(relative, None)
            if following is not None:
                self._start_snapshot(relative, following)

        task.add_done_callback(done)

    async def _send_snapshot(self, relative: str, staged: Path) -> None:
        try:
            st = os.stat(staged)
            # The staging directory is ours: the copy is opened beneath it.
            item = ScannedFile(str(staged), relative, st.st_size, st.st_mtime_ns, st.st_ino,
                               st.st_dev, SourceRoot(str(staged.parent)))
            await self._send(item)
            self.manifest.commit()
        finally:
            staged.unlink(missing_ok=True)

    async def _send(self, item: ScannedFile) -> FileOutcome | None:
        try:
            key = object_key(self.config.destination.prefix, item.relative)
        except InvalidKey as exc:
            self.tally.unsent[item.relative] = str(exc)
            return None
        decision = plan_file(item, self.manifest.lookup(self.scope, key))
        if decision.action is Action.SKIP:
            self.tally.unsent.pop(item.relative, None)
            return None
        outcome = await self.uploader.sync(item, key, decision)
        self.events.outcome(outcome)
        return outcome

    async def _sync_epoch(self, plotting: list[threading.Thread]) -> None:
        if plotting:
            deadline = time.monotonic() + 60
            await asyncio.get_running_loop().run_in_executor(None, _join, plotting, deadline)
        async with self.lock:
            await self._mirror(self.epoch_config)
            await self._write_record()

    async def _final_sync(self) -> None:
        # The trainer is done with its weights: from now on the run directory is the truth.
        # Snapshots not started are dropped; those in flight finish first, so none of them
        # can land on top of the final (stripped) checkpoint.
        for staged in self.waiting.values():
            staged.unlink(missing_ok=True)
        self.waiting.clear()
        if self.uploading:
            await asyncio.gather(*self.uploading.values(), return_exceptions=True)
        async with self.lock:
            for attempt in range(FINAL_PASSES):
                await self._mirror(self.config)
                if not self.tally.unsent:
                    break
                if attempt + 1 < FINAL_PASSES:
                    await asyncio.sleep(1.0 + attempt)
            await self._write_record()

    async def _mirror(self, config: PushConfig) -> None:
        """One pass of push's own pipeline over the run directory."""
        await mirror(self.pipeline, config)
        self.problem = None  # a whole pass went through: the store is fine again

    async def _first_record(self) -> None:
        # Every write of the record holds the lock, so its versions land in order: under
        # --max-bandwidth, this first "running" could otherwise land after "finished".
        async with self.lock:
            await self._write_record()

    async def _write_record(self, **fields: Any) -> None:
        results = self.run_dir / "results.csv"
        if results.is_file():
            fields.update(read_results(results, self.run_dir))
        await self.record.write(**fields)

    def _readiness(self) -> tuple[bool, str]:
        # Words `health.PUBLIC_REASONS` knows, so a public address may say which part failed.
        if self.problem:
            return False, f"store unreachable: {self.problem}"
        return True, "ready"

    async def _finish(self, fields: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.training_ended(fields["status"])
        try:
            async with self.lock:
                await self._write_record(**fields)
        finally:
            await self._stages.aclose()
