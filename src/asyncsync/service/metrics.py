"""The Prometheus instruments of one asyncsync process, and the only place that names them.

`Metrics` owns a private `CollectorRegistry` (never prometheus_client's global one, so tests and
several instances in one process do not collide) holding every counter, gauge and histogram the
`watch` daemon exports, behind a handful of small methods the pipeline calls as files are
scanned, uploaded, skipped, retried or fail; `health.py` serves `exposition()` on /metrics.
Label values are deliberately few: a failure reason from a fixed set and the run directory's
relative path, never an object key, a file name, an error message or anything credential-like,
so the number of series stays bounded whatever the tree holds.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .. import __version__

FAILURE_REASONS: frozenset[str] = frozenset({"store", "read", "changed", "other"})
"""The values of the ``reason`` label of ``asyncsync_upload_failures_total``."""

# From a 1 ms PUT on loopback to a 10 min multipart upload of a multi-GiB checkpoint: roughly
# 1-2.5-5 per decade below a minute, then the minutes an operator reasons in.
UPLOAD_DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


class Metrics:
    """Every instrument of one asyncsync process, in its own registry."""

    content_type: str = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.files_uploaded = Counter(
            "asyncsync_files_uploaded_total", "Files uploaded to the store.", registry=r
        )
        self.bytes_uploaded = Counter(
            "asyncsync_bytes_uploaded_total",
            "Bytes of file content uploaded to the store.",
            registry=r,
        )
        self.files_unchanged = Counter(
            "asyncsync_files_unchanged_total",
            "Files found identical to what the store already holds, so not sent.",
            registry=r,
        )
        self.upload_failures = Counter(
            "asyncsync_upload_failures_total",
            "Uploads that failed, by reason (store, read, changed, other).",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "asyncsync_retries_total",
            "Store requests retried after a transient error.",
            registry=r,
        )
        self.files_deleted = Counter(
            "asyncsync_files_deleted_total",
            "Local files deleted by cleanup after they were safely uploaded.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "asyncsync_queue_depth", "Files waiting to be uploaded.", registry=r
        )
        self.uploads_in_flight = Gauge(
            "asyncsync_uploads_in_flight", "Files being uploaded right now.", registry=r
        )
        self.store_up = Gauge(
            "asyncsync_store_up",
            "1 if the last request to the store succeeded, else 0.",
            registry=r,
        )
        self.last_successful_sync = Gauge(
            "asyncsync_last_successful_sync_timestamp_seconds",
            "Unix time of the last successful upload of a file of each run directory.",
            ["run"],
            registry=r,
        )
        self.scan_duration = Gauge(
            "asyncsync_scan_duration_seconds",
            "How long the last scan of the source tree took.",
            registry=r,
        )
        self.upload_duration = Histogram(
            "asyncsync_upload_duration_seconds",
            "Time to upload one file, from the first read to the store's acknowledgement.",
            buckets=UPLOAD_DURATION_BUCKETS,
            registry=r,
        )
        build_info = Gauge(
            "asyncsync_build_info",
            "Always 1; the version label says which asyncsync is running.",
            ["version"],
            registry=r,
        )
        build_info.labels(version=__version__).set(1)
        # Every reason exists from the start at 0, so rate() and absent() see a series
        # before the first failure rather than nothing at all.
        for reason in sorted(FAILURE_REASONS):
            self.upload_failures.labels(reason=reason)

    def uploaded(self, nbytes: int, seconds: float, run: str | None) -> None:
        """One file uploaded: ``nbytes`` sent in ``seconds``, belonging to run directory ``run``.

        ``run`` is the run directory's path relative to the source (``detect/train2``), or None
        for a file that belongs to no run directory, which then moves no timestamp.
        """
        self.files_uploaded.inc()
        self.bytes_uploaded.inc(nbytes)
        self.upload_duration.observe(seconds)
        if run is not None:
            self.last_successful_sync.labels(run=run).set(time.time())

    def unchanged(self) -> None:
        self.files_unchanged.inc()

    def failed(self, reason: str) -> None:
        """One upload failed; ``reason`` is one of `FAILURE_REASONS`.

        Anything else is counted as "other" instead of raising: a metric must never be what
        brings the daemon down, and an unexpected value must not become a new series.
        """
        self.upload_failures.labels(reason=reason if reason in FAILURE_REASONS else "other").inc()

    def retried(self) -> None:
        self.retries.inc()

    def deleted(self) -> None:
        self.files_deleted.inc()

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_in_flight(self, n: int) -> None:
        self.uploads_in_flight.set(n)

    def store_reachable(self, ok: bool) -> None:
        self.store_up.set(1 if ok else 0)

    def scanned(self, seconds: float) -> None:
        self.scan_duration.set(seconds)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format, as served on /metrics."""
        return generate_latest(self.registry)
