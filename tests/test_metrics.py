"""Metrics: every method moves its instrument, read back from the exposition text itself."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import asyncsync
from asyncsync.service.metrics import FAILURE_REASONS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, by (sample name, labels)."""
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def test_fresh_instance_exports_every_metric_at_zero() -> None:
    m = Metrics()
    for name in (
        "asyncsync_files_uploaded_total",
        "asyncsync_bytes_uploaded_total",
        "asyncsync_files_unchanged_total",
        "asyncsync_retries_total",
        "asyncsync_files_deleted_total",
        "asyncsync_queue_depth",
        "asyncsync_uploads_in_flight",
        "asyncsync_store_up",
        "asyncsync_scan_duration_seconds",
        "asyncsync_upload_duration_seconds_count",
    ):
        assert value(m, name) == 0, name
    for reason in FAILURE_REASONS:
        assert value(m, "asyncsync_upload_failures_total", reason=reason) == 0
    assert value(m, "asyncsync_build_info", version=asyncsync.__version__) == 1
    # No run has synced yet, so there is no series at all rather than a misleading 0 (1970).
    assert not any(
        name == "asyncsync_last_successful_sync_timestamp_seconds" for name, _ in samples(m)
    )


def test_uploaded_moves_counters_histogram_and_run_timestamp() -> None:
    m = Metrics()
    before = time.time()
    m.uploaded(1000, 0.003, "detect/train")
    m.uploaded(24 << 20, 42.0, "detect/train2")
    m.uploaded(5, 0.0005, None)
    after = time.time()

    assert value(m, "asyncsync_files_uploaded_total") == 3
    assert value(m, "asyncsync_bytes_uploaded_total") == 1000 + (24 << 20) + 5
    assert value(m, "asyncsync_upload_duration_seconds_count") == 3
    assert value(m, "asyncsync_upload_duration_seconds_sum") == pytest.approx(42.0035)
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="0.001") == 1
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="0.005") == 2
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="30.0") == 2
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="60.0") == 3
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="600.0") == 3

    stamps = {
        dict(labels)["run"]: v
        for (name, labels), v in samples(m).items()
        if name == "asyncsync_last_successful_sync_timestamp_seconds"
    }
    # A file outside any run directory moves no timestamp and adds no series.
    assert set(stamps) == {"detect/train", "detect/train2"}
    assert all(before <= t <= after for t in stamps.values())


def test_histogram_buckets_span_a_millisecond_to_ten_minutes() -> None:
    bounds = {
        float(dict(labels)["le"])
        for (name, labels), _ in samples(Metrics()).items()
        if name == "asyncsync_upload_duration_seconds_bucket"
    }
    assert min(bounds) == 0.001
    assert max(b for b in bounds if b != float("inf")) == 600.0
    assert float("inf") in bounds


def test_counters_and_gauges_follow_their_methods() -> None:
    m = Metrics()
    m.unchanged()
    m.unchanged()
    m.retried()
    m.deleted()
    m.deleted()
    m.deleted()
    m.set_queue_depth(17)
    m.set_in_flight(4)
    m.store_reachable(True)
    m.scanned(1.25)
    assert value(m, "asyncsync_files_unchanged_total") == 2
    assert value(m, "asyncsync_retries_total") == 1
    assert value(m, "asyncsync_files_deleted_total") == 3
    assert value(m, "asyncsync_queue_depth") == 17
    assert value(m, "asyncsync_uploads_in_flight") == 4
    assert value(m, "asyncsync_store_up") == 1
    assert value(m, "asyncsync_scan_duration_seconds") == 1.25

    m.set_queue_depth(0)
    m.set_in_flight(0)
    m.store_reachable(False)
    m.scanned(0.5)
    assert value(m, "asyncsync_queue_depth") == 0
    assert value(m, "asyncsync_uploads_in_flight") == 0
    assert value(m, "asyncsync_store_up") == 0
    assert value(m, "asyncsync_scan_duration_seconds") == 0.5


def test_failure_reasons_stay_a_fixed_set() -> None:
    m = Metrics()
    m.failed("store")
    m.failed("store")
    m.failed("read")
    m.failed("changed")
    m.failed("other")
    # Whatever a caller passes by mistake (an error text, a file name) lands in "other"
    # and never becomes a series of its own.
    m.failed("exp/weights/last.pt: Permission denied")
    assert value(m, "asyncsync_upload_failures_total", reason="store") == 2
    assert value(m, "asyncsync_upload_failures_total", reason="read") == 1
    assert value(m, "asyncsync_upload_failures_total", reason="changed") == 1
    assert value(m, "asyncsync_upload_failures_total", reason="other") == 2
    reasons = {
        dict(labels)["reason"]
        for (name, labels), _ in samples(m).items()
        if name == "asyncsync_upload_failures_total"
    }
    assert reasons == FAILURE_REASONS
    assert b"Permission denied" not in m.exposition()


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.uploaded(10, 0.1, "run-a")
    a.failed("store")
    a.set_queue_depth(3)
    assert value(a, "asyncsync_files_uploaded_total") == 1
    assert value(b, "asyncsync_files_uploaded_total") == 0
    assert value(b, "asyncsync_upload_failures_total", reason="store") == 0
    assert value(b, "asyncsync_queue_depth") == 0
    assert b"run-a" not in b.exposition()


def test_content_type_is_the_prometheus_text_format() -> None:
    assert Metrics.content_type.startswith("text/plain; version=")


def test_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (from Prometheus) is not on PATH; cannot lint the exposition")
    m = Metrics()
    m.uploaded(1000, 0.2, "detect/train")
    m.unchanged()
    m.failed("read")
    m.retried()
    m.deleted()
    m.set_queue_depth(2)
    m.set_in_flight(1)
    m.store_reachable(True)
    m.scanned(0.1)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=m.exposition(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
