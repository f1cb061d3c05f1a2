"""The Prometheus instruments of one asyncsync process, and the only place that names them.

`Metrics` owns a private `CollectorRegistry` (never prometheus_client's global one, so tests and
several instances in one process do not collide). It is an `Events` sink, so every command
feeds it the same way: push through its reporter's fan-out, watch and run through the daemon,
which also sets the gauges of its state snapshot (queue, in flight, per-run pending). watch and
run serve it on ``--metrics-addr``; push, a batch job, writes it to ``--metrics-textfile`` (the
node_exporter textfile format) and/or sends it to ``--pushgateway`` when it ends.

Cardinality is bounded by construction: labels hold a failure class from a fixed set, a run
directory (``--run-depth`` deep, e.g. ``detect/train2``), or a results.csv column; never an
object key, a file name, an error message, an endpoint or anything credential-like. Per-run
series exist only for runs seen within ``run_ttl`` seconds (removed afterwards), for at most
``max_runs`` runs and ``max_columns`` training columns per run; what a cap refused is counted
in ``asyncsync_metrics_dropped_total``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    write_to_textfile,
)

from .. import __version__
from ..errors import SourceNotRegular, SourceVanished, store_cause
from ..pipeline.events import FileOutcome, Status
from . import training
from .daemon import ABOVE_RUNS, run_of

if TYPE_CHECKING:
    from ..errors import TransientStoreError
    from ..pipeline.scan import FileStat, ScanIssue
    from ..pipeline.session import Pipeline

log = logging.getLogger("asyncsync")

FAILURE_REASONS = ("throttled", "server", "network", "auth", "integrity", "read", "changed",
                   "key", "other")
"""The values of the ``reason`` label of ``asyncsync_upload_failures_total``."""
RETRY_REASONS = ("throttled", "server", "network", "integrity", "other")
UPLOAD_OUTCOMES = ("new", "changed", "resumed")
RUN_STATUSES = ("running", "finished", "crashed")

# From a 1 ms PUT on loopback to an hour-long multipart upload of a 10 GB checkpoint.
UPLOAD_DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
# 1 KB ... 10 GB objects, a bucket per decade: a plot's size to a large checkpoint's.
UPLOAD_SIZE_BUCKETS: tuple[float, ...] = tuple(10.0 ** n for n in range(3, 11))
# A file settles for --settle seconds (3 by default) before it goes up: from there to an hour.
TIME_TO_DURABLE_BUCKETS: tuple[float, ...] = (
    0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

DEFAULT_RUN_TTL = 24 * 3600.0
DEFAULT_MAX_RUNS = 1000
DEFAULT_MAX_COLUMNS = 64
RESULTS_NAME = "results.csv"
# The most of a results.csv read for the gauges: a thousand epochs is a few hundred KB.
_MAX_RESULTS_BYTES = 16 * 1024 * 1024
# The manifest's row count is a full count: asked at most this often.
_ROWS_EVERY = 30.0


def _outcome_label(outcome: FileOutcome) -> str:
    if outcome.resumed_parts:
        return "resumed"
    return "new" if outcome.reason == "new" else "changed"


class Metrics:
    """Every instrument of one asyncsync process, in its own registry; an `Events` sink."""

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(
        self, *, run_depth: int = 1, daemon: bool = False, run_ttl: float = DEFAULT_RUN_TTL,
        max_runs: int = DEFAULT_MAX_RUNS, max_columns: int = DEFAULT_MAX_COLUMNS,
        source: str | None = None, run: str | None = None,
    ) -> None:
        """``run_depth``: what the ``run`` label names. ``daemon``: files go up soon after
        they settle (watch, run), so the time-to-durable histogram means something.
        ``source``: the tree whose results.csv files feed the training gauges. ``run``:
        every file belongs to this one run (attach(), whose source is the run itself)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.run_depth = run_depth
        self.daemon = daemon
        self.run_ttl = run_ttl
        self.max_runs = max_runs
        self.max_columns = max_columns
        self.source = source
        self.fixed_run = run
        # The status a run gets when its training gauges first appear (`run` knows its
        # training is running; watch knows nothing of it), and then at the training's end.
        self.training_status: str | None = None
        r = self.registry
        ProcessCollector(registry=r)
        # -- transfers ----------------------------------------------------------------------
        self.files_uploaded = Counter(
            "asyncsync_files_uploaded_total",
            "Files uploaded to the store, by outcome (new, changed, resumed).",
            ["outcome"], registry=r,
        )
        self.bytes_uploaded = Counter(
            "asyncsync_bytes_uploaded_total",
            "Bytes of file content uploaded to the store, by outcome.", ["outcome"], registry=r,
        )
        # Of those uploaded: the files whose object was made by a server-side copy (dedup).
        self.files_copied = Counter(
            "asyncsync_files_copied_total",
            "Files uploaded by a server-side copy of an object with the same content (also"
            " counted as uploaded).", registry=r,
        )
        self.bytes_copied = Counter(
            "asyncsync_bytes_copied_total",
            "Bytes of file content uploaded by server-side copies: bytes not sent.", registry=r,
        )
        self.bytes_sent = Counter(
            "asyncsync_bytes_sent_total",
            "Body bytes that reached the store, every attempt (a body sent again counts again).",
            registry=r,
        )
        self.files_unchanged = Counter(
            "asyncsync_files_unchanged_total",
            "Files found identical to what the store already holds, so not sent.", registry=r,
        )
        self.upload_failures = Counter(
            "asyncsync_upload_failures_total",
            "Files whose upload failed, by reason (throttled, server, network, auth, "
            "integrity, read, changed, key, other).", ["reason"], registry=r,
        )
        self.retries = Counter(
            "asyncsync_retries_total",
            "Store requests retried after a transient error, by reason.", ["reason"],
            registry=r,
        )
        self.parts_uploaded = Counter(
            "asyncsync_parts_uploaded_total", "Multipart parts sent.", registry=r)
        self.parts_resumed = Counter(
            "asyncsync_parts_resumed_total",
            "Multipart parts already in the store when an interrupted upload resumed.",
            registry=r,
        )
        self.torn_reads = Counter(
            "asyncsync_torn_reads_total",
            "Reads refused because the file changed while it was read (never published).",
            registry=r,
        )
        self.history_copies = Counter(
            "asyncsync_history_copies_total",
            "Previous versions of append-only files kept under _asyncsync/history.", registry=r,
        )
        self.files_deleted = Counter(
            "asyncsync_files_deleted_total",
            "Local files deleted by cleanup after they were safely uploaded.", registry=r,
        )
        self.cleanup_failures = Counter(
            "asyncsync_cleanup_failures_total",
            "Local deletions by cleanup that failed.", registry=r,
        )
        self.dropped = Counter(
            "asyncsync_metrics_dropped_total",
            "Per-run series not created because a cap was reached (what: run, column).",
            ["what"], registry=r,
        )
        # -- the pipeline ---------------------------------------------------------------------
        self.queue_depth = Gauge(
            "asyncsync_queue_depth", "Files waiting to be uploaded.", registry=r)
        self.uploads_in_flight = Gauge(
            "asyncsync_uploads_in_flight", "Files being uploaded right now.", registry=r)
        self.bytes_in_flight = Gauge(
            "asyncsync_bytes_in_flight", "Bytes of the files being uploaded right now.",
            registry=r,
        )
        self.budget_used = Gauge(
            "asyncsync_budget_used_bytes", "Bytes of file bodies held in memory now.",
            registry=r,
        )
        self.budget_limit = Gauge(
            "asyncsync_budget_limit_bytes", "The byte budget for bodies in memory (--max-memory).",
            registry=r,
        )
        self.manifest_rows = Gauge(
            "asyncsync_manifest_rows", "Objects the manifest knows.", registry=r)
        self.scan_duration = Gauge(
            "asyncsync_scan_duration_seconds", "How long the last scan of the source took.",
            registry=r,
        )
        self.last_scan = Gauge(
            "asyncsync_last_scan_timestamp_seconds", "Unix time the last scan ended.",
            registry=r,
        )
        self.store_up = Gauge(
            "asyncsync_store_up", "1 if the last request to the store succeeded, else 0.",
            registry=r,
        )
        self.last_store_success = Gauge(
            "asyncsync_last_store_success_timestamp_seconds",
            "Unix time of the last successful upload to the store.", registry=r,
        )
        # -- latency --------------------------------------------------------------------------
        self.upload_duration = Histogram(
            "asyncsync_upload_duration_seconds",
            "Time to upload one file, from the first read to the store's acknowledgement.",
            buckets=UPLOAD_DURATION_BUCKETS, registry=r,
        )
        self.upload_size = Histogram(
            "asyncsync_upload_size_bytes", "Size of each uploaded file.",
            buckets=UPLOAD_SIZE_BUCKETS, registry=r,
        )
        self.time_to_durable = Histogram(
            "asyncsync_time_to_durable_seconds",
            "From a file's last change (it settled) to the store's acknowledgement of it.",
            buckets=TIME_TO_DURABLE_BUCKETS, registry=r,
        )
        # -- runs ----------------------------------------------------------------------------
        self.last_successful_sync = Gauge(
            "asyncsync_last_successful_sync_timestamp_seconds",
            "Unix time of the last successful upload of a file of each run directory.",
            ["run"], registry=r,
        )
        self.run_files_pending = Gauge(
            "asyncsync_run_files_pending", "Files of the run out of sync with the bucket.",
            ["run"], registry=r,
        )
        self.run_bytes_pending = Gauge(
            "asyncsync_run_bytes_pending", "Bytes of the run's files out of sync.", ["run"],
            registry=r,
        )
        self.run_status = Gauge(
            "asyncsync_run_status",
            "1 for the run's status from its run record (running, finished, crashed), else 0.",
            ["run", "status"], registry=r,
        )
        self.training_metric = Gauge(
            "asyncsync_training_metric",
            "The latest value of each numeric column of the run's results.csv (metric: the "
            "column's name made a metric name, column: as written).",
            ["run", "metric", "column"], registry=r,
        )
        self.training_epoch = Gauge(
            "asyncsync_training_epoch", "Epochs done, from the run's results.csv.", ["run"],
            registry=r,
        )
        self.training_epoch_duration = Gauge(
            "asyncsync_training_epoch_duration_seconds",
            "Wall time of the run's last epoch, from results.csv's time column.", ["run"],
            registry=r,
        )
        # -- the process ---------------------------------------------------------------------
        self.completion = Gauge(
            "asyncsync_completion_timestamp_seconds",
            "Unix time the batch job (push) ended.", registry=r,
        )
        self.exit_code = Gauge(
            "asyncsync_exit_code", "The batch job's exit status (0 done, 1 some files failed).",
            registry=r,
        )
        build_info = Gauge(
            "asyncsync_build_info",
            "Always 1; the version label says which asyncsync is running.", ["version"],
            registry=r,
        )
        build_info.labels(version=__version__).set(1)
        # Every label value exists from the start at 0, so rate() and absent() see a series
        # before the first failure rather than nothing at all.
        for reason in FAILURE_REASONS:
            self.upload_failures.labels(reason=reason)
        for reason in RETRY_REASONS:
            self.retries.labels(reason=reason)
        for outcome in UPLOAD_OUTCOMES:
            self.files_uploaded.labels(outcome=outcome)
            self.bytes_uploaded.labels(outcome=outcome)
        for what in ("run", "column"):
            self.dropped.labels(what=what)
        # Per run: when it was last seen, and the label sets created for it.
        self._runs: dict[str, float] = {}
        self._columns: dict[str, set[tuple[str, str]]] = {}
        self._statuses: set[str] = set()
        self._queued = 0
        self._rows_at = -_ROWS_EVERY
        self._next_expiry = 0.0

    # -- Events --------------------------------------------------------------------------------

    def scanned(self, size: int) -> None:
        self._queued += 1
        self.queue_depth.set(self._queued)

    def unchanged_files(self, prefix: str, key_prefix: str, files: list[FileStat]) -> None:
        self.files_unchanged.inc(len(files))

    def scan_finished(self) -> None:
        self.last_scan.set(time.time())

    def issue(self, issue: ScanIssue) -> None:
        pass

    def outcome(self, outcome: FileOutcome) -> None:
        if self._queued:
            self._queued -= 1
            self.queue_depth.set(self._queued)
        if outcome.torn_reads:
            self.torn_reads.inc(outcome.torn_reads)
        status = outcome.status
        if status is Status.UPLOADED:
            label = _outcome_label(outcome)
            self.files_uploaded.labels(outcome=label).inc()
            self.bytes_uploaded.labels(outcome=label).inc(outcome.size)
            self.upload_duration.observe(outcome.seconds)
            self.upload_size.observe(outcome.size)
            if outcome.copied:
                self.files_copied.inc()
                self.bytes_copied.inc(outcome.size)
            elif outcome.parts:
                self.parts_uploaded.inc(outcome.parts - outcome.resumed_parts)
                self.parts_resumed.inc(outcome.resumed_parts)
            now = time.time()
            self.store_up.set(1)
            self.last_store_success.set(now)
            if self.daemon and outcome.identity is not None:
                self.time_to_durable.observe(max(0.0, now - outcome.identity.mtime_ns / 1e9))
            run = self.fixed_run or run_of(outcome.relative, self.run_depth)
            if run != ABOVE_RUNS and self._touch(run, now):
                self.last_successful_sync.labels(run=run).set(now)
                if outcome.relative.rsplit("/", 1)[-1] == RESULTS_NAME:
                    self._read_training(run, outcome.relative)
        elif status is Status.UNCHANGED:
            self.files_unchanged.inc()
        elif status is Status.FAILED:
            self.upload_failures.labels(reason=outcome.failure_reason).inc()

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        reason = store_cause(exc)
        self.retries.labels(reason=reason if reason in RETRY_REASONS else "other").inc()

    def sent(self, nbytes: int) -> None:
        self.bytes_sent.inc(nbytes)

    # -- what only the daemon (or cleanup) knows ------------------------------------------------

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_in_flight(self, files: int, nbytes: int) -> None:
        self.uploads_in_flight.set(files)
        self.bytes_in_flight.set(nbytes)

    def store_reachable(self, ok: bool) -> None:
        self.store_up.set(1 if ok else 0)

    def scanned_tree(self, seconds: float) -> None:
        """A full scan took ``seconds`` and has just ended."""
        self.scan_duration.set(seconds)
        self.last_scan.set(time.time())

    def history_copied(self) -> None:
        self.history_copies.inc()

    def deleted(self) -> None:
        self.files_deleted.inc()

    def cleanup_failed(self) -> None:
        self.cleanup_failures.inc()

    def run_pending(self, run: str, files: int, nbytes: int) -> None:
        if run == ABOVE_RUNS or not self._touch(run, time.time()):
            return
        self.run_files_pending.labels(run=run).set(files)
        self.run_bytes_pending.labels(run=run).set(nbytes)

    def run_synced(self, run: str, when: float) -> None:
        if run != ABOVE_RUNS and self._touch(run, time.time()):
            self.last_successful_sync.labels(run=run).set(when)

    def set_run_status(self, run: str, status: str) -> None:
        """The run's status as its run record says (`RUN_STATUSES`): a state set, the
        status given at 1 and the others at 0."""
        if status not in RUN_STATUSES or run == ABOVE_RUNS or not self._touch(run, time.time()):
            return
        self._statuses.add(run)
        for each in RUN_STATUSES:
            self.run_status.labels(run=run, status=each).set(1 if each == status else 0)

    def training(self, run: str, text: str) -> None:
        """Set the training gauges of ``run`` from its results.csv's text."""
        epochs = training.epochs_of(text)
        if not epochs or not self._touch(run, time.time()):
            return
        last = epochs[-1]
        columns = self._columns.setdefault(run, set())
        for column, value in last.values.items():
            labels = (training.metric_name(column), column)
            if labels not in columns:
                if len(columns) >= self.max_columns:
                    self.dropped.labels(what="column").inc()
                    continue
                columns.add(labels)
            self.training_metric.labels(run=run, metric=labels[0], column=column).set(value)
        self.training_epoch.labels(run=run).set(last.epoch)
        seconds = training.epoch_seconds(epochs)
        if seconds is not None:
            self.training_epoch_duration.labels(run=run).set(seconds)
        if self.training_status is not None and run not in self._statuses:
            self.set_run_status(run, self.training_status)

    def training_ended(self, status: str) -> None:
        """The training (`run`'s command) ended: every run it wrote now has ``status``."""
        self.training_status = status
        for run in set(self._columns) | self._statuses:
            self.set_run_status(run, status)

    def watch_pipeline(self, pipeline: Pipeline) -> None:
        """Read the byte budget and the manifest's size from ``pipeline`` at each scrape."""
        budget = pipeline.uploader.budget
        self.budget_used.set_function(lambda: budget.in_use)
        self.budget_limit.set(budget.capacity)
        manifest = pipeline.manifest
        rows = self._throttled(manifest.count_objects)
        self.manifest_rows.set_function(rows)

    def finished(self, exit_code: int) -> None:
        """The batch job ended with ``exit_code`` (for its textfile or push gateway)."""
        self.queue_depth.set(0)
        self.completion.set(time.time())
        self.exit_code.set(exit_code)

    # -- per-run series: bounded in number and in time -------------------------------------

    def _touch(self, run: str, now: float) -> bool:
        """Whether ``run`` may have series (and note it was seen now)."""
        if run not in self._runs and len(self._runs) >= self.max_runs:
            self.dropped.labels(what="run").inc()
            return False
        self._runs[run] = now
        return True

    def expire(self, now: float | None = None) -> int:
        """Remove the series of runs not seen for ``run_ttl`` seconds; how many runs went.
        Cheap to call often: the map is looked at once a minute at most."""
        now = time.time() if now is None else now
        if now < self._next_expiry:
            return 0
        self._next_expiry = now + min(60.0, self.run_ttl / 4)
        quiet = [run for run, seen in self._runs.items() if now - seen > self.run_ttl]
        for run in quiet:
            self.forget_run(run)
        return len(quiet)

    def forget_run(self, run: str) -> None:
        self._runs.pop(run, None)
        for gauge in (self.last_successful_sync, self.run_files_pending, self.run_bytes_pending,
                      self.training_epoch, self.training_epoch_duration):
            _remove(gauge, run)
        if run in self._statuses:
            self._statuses.discard(run)
            for status in RUN_STATUSES:
                _remove(self.run_status, run, status)
        for metric, column in self._columns.pop(run, set()):
            _remove(self.training_metric, run, metric, column)

    @property
    def runs(self) -> int:
        """Runs that have series now."""
        return len(self._runs)

    # -- output -----------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as served on /metrics."""
        return generate_latest(self.registry)

    def write_textfile(self, path: str) -> None:
        """The registry in node_exporter's textfile-collector format, written atomically
        (a temp file beside ``path``, then a rename: the collector never reads half)."""
        write_to_textfile(path, self.registry)

    def push_to_gateway(self, url: str, job: str, instance: str) -> None:
        from prometheus_client import push_to_gateway

        push_to_gateway(url, job=job, registry=self.registry, grouping_key={"instance": instance},
                        timeout=10)

    # -- helpers --------------------------------------------------------------------------

    def _read_training(self, run: str, relative: str) -> None:
        if self.source is None:
            return
        from ..pipeline.source import read_beneath

        path = os.path.join(self.source, relative)
        try:
            if os.stat(path, follow_symlinks=False).st_size > _MAX_RESULTS_BYTES:
                return
            text = read_beneath(path, self.source).decode(errors="replace")
        except (OSError, SourceNotRegular, SourceVanished) as exc:
            log.debug("%s: training metrics not read: %s", relative, exc)
            return
        self.training(run, text)

    def _throttled(self, count: Callable[[], int]) -> Callable[[], float]:
        last = [0.0]

        def rows() -> float:
            now = time.monotonic()
            if now - self._rows_at >= _ROWS_EVERY:
                self._rows_at = now
                try:
                    last[0] = float(count())
                except Exception as exc:  # noqa: BLE001 - a scrape must not fail over it
                    log.debug("manifest rows not counted: %s", exc)
            return last[0]

        return rows


def _remove(metric: Gauge, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
