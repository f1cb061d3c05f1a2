"""Metrics: every event moves its instrument, read back from the exposition text itself."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import asyncsync
from asyncsync.errors import BadDigest, FatalStoreError, TransientStoreError
from asyncsync.pipeline.digest import FileIdentity
from asyncsync.pipeline.events import Failure, FileOutcome, Status
from asyncsync.service.metrics import (
    FAILURE_REASONS,
    RETRY_REASONS,
    TIME_TO_DURABLE_BUCKETS,
    UPLOAD_SIZE_BUCKETS,
    Metrics,
)
from asyncsync.service.training import metric_name

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

RESULTS = (
    "                  epoch,         train/box_loss,      metrics/mAP50(B),"
    "   metrics/mAP50-95(B),                  time\n"
    "                      1,                 1.25,                 0.10,"
    "                 0.05,                 10.5\n"
    "                      2,                 1.00,                 0.20,"
    "                 0.12,                 22.0\n"
)


def samples(metrics: Metrics) -> Samples:
    """Every sample of the exposition, by (sample name, labels)."""
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def series(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples(metrics).items() if n == name}


def uploaded(relative: str, size: int, *, reason: str = "new", seconds: float = 0.01,
             parts: int = 0, resumed: int = 0, mtime: float | None = None) -> FileOutcome:
    identity = None if mtime is None else FileIdentity(size, int(mtime * 1e9), 1)
    return FileOutcome(relative, relative, Status.UPLOADED, reason, size, bytes_sent=size,
                       parts=parts, resumed_parts=resumed, seconds=seconds, identity=identity)


def failed(relative: str, failure: Failure, cause: str = "") -> FileOutcome:
    return FileOutcome(relative, relative, Status.FAILED, "new", 1, failure=failure, cause=cause)


def test_fresh_instance_exports_every_series_at_zero() -> None:
    m = Metrics()
    for name in (
        "asyncsync_bytes_sent_total", "asyncsync_files_unchanged_total",
        "asyncsync_parts_uploaded_total", "asyncsync_parts_resumed_total",
        "asyncsync_torn_reads_total", "asyncsync_history_copies_total",
        "asyncsync_files_deleted_total", "asyncsync_cleanup_failures_total",
        "asyncsync_queue_depth", "asyncsync_uploads_in_flight", "asyncsync_bytes_in_flight",
        "asyncsync_store_up", "asyncsync_scan_duration_seconds",
        "asyncsync_upload_duration_seconds_count", "asyncsync_upload_size_bytes_count",
        "asyncsync_time_to_durable_seconds_count",
    ):
        assert value(m, name) == 0, name
    for reason in FAILURE_REASONS:
        assert value(m, "asyncsync_upload_failures_total", reason=reason) == 0
    for reason in RETRY_REASONS:
        assert value(m, "asyncsync_retries_total", reason=reason) == 0
    for outcome in ("new", "changed", "resumed"):
        assert value(m, "asyncsync_files_uploaded_total", outcome=outcome) == 0
    assert value(m, "asyncsync_build_info", version=asyncsync.__version__) == 1
    # The process collector: what the dashboard's CPU and memory panels read.
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "process_open_fds") > 0
    # No run has synced yet: no series at all rather than a misleading 0 (1970).
    assert not series(m, "asyncsync_last_successful_sync_timestamp_seconds")


def test_uploads_by_outcome_with_duration_size_parts_and_run() -> None:
    m = Metrics(run_depth=2)
    before = time.time()
    m.outcome(uploaded("detect/train/args.yaml", 1000, seconds=0.003))
    m.outcome(uploaded("detect/train2/weights/last.pt", 24 << 20, reason="changed",
                       seconds=42.0, parts=3))
    m.outcome(uploaded("detect/train2/weights/best.pt", 40 << 20, reason="changed",
                       parts=5, resumed=2))
    m.outcome(uploaded("README.md", 5, seconds=0.0005))
    after = time.time()

    assert value(m, "asyncsync_files_uploaded_total", outcome="new") == 2
    assert value(m, "asyncsync_files_uploaded_total", outcome="changed") == 1
    assert value(m, "asyncsync_files_uploaded_total", outcome="resumed") == 1
    assert value(m, "asyncsync_bytes_uploaded_total", outcome="new") == 1005
    assert value(m, "asyncsync_bytes_uploaded_total", outcome="resumed") == 40 << 20
    assert value(m, "asyncsync_parts_uploaded_total") == 3 + 3
    assert value(m, "asyncsync_parts_resumed_total") == 2
    assert value(m, "asyncsync_upload_duration_seconds_count") == 4
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="0.001") == 1
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="30.0") == 3
    assert value(m, "asyncsync_upload_duration_seconds_bucket", le="60.0") == 4
    assert UPLOAD_SIZE_BUCKETS[0] == 1e3 and UPLOAD_SIZE_BUCKETS[-1] == 1e10
    assert value(m, "asyncsync_upload_size_bytes_bucket", le="1000.0") == 2
    assert value(m, "asyncsync_upload_size_bytes_bucket", le="1e+08") == 4
    assert value(m, "asyncsync_store_up") == 1
    assert before <= value(m, "asyncsync_last_store_success_timestamp_seconds") <= after
    stamps = {dict(labels)["run"]: v for labels, v in
              series(m, "asyncsync_last_successful_sync_timestamp_seconds").items()}
    # The run directory at --run-depth; a file above the runs makes no series.
    assert set(stamps) == {"detect/train", "detect/train2"}
    assert all(before <= t <= after for t in stamps.values())
    # push is no daemon: the age of an old file says nothing of how soon it went up.
    assert value(m, "asyncsync_time_to_durable_seconds_count") == 0


def test_time_to_durable_is_from_the_last_change_to_the_acknowledgement() -> None:
    m = Metrics(daemon=True)
    m.outcome(uploaded("run/results.csv", 10, mtime=time.time() - 7.0))
    assert value(m, "asyncsync_time_to_durable_seconds_count") == 1
    assert 7.0 <= value(m, "asyncsync_time_to_durable_seconds_sum") < 9.0
    assert value(m, "asyncsync_time_to_durable_seconds_bucket", le="5.0") == 0
    assert value(m, "asyncsync_time_to_durable_seconds_bucket", le="10.0") == 1
    assert TIME_TO_DURABLE_BUCKETS[-1] == 3600.0


def test_failures_and_retries_by_reason_class() -> None:
    m = Metrics()
    m.outcome(failed("a", Failure.STORE, "throttled"))
    m.outcome(failed("b", Failure.STORE, "network"))
    m.outcome(failed("c", Failure.READ))
    m.outcome(failed("d", Failure.CHANGED))
    m.outcome(failed("e", Failure.KEY))
    m.outcome(failed("f", Failure.STORE))  # a store failure of no known class
    for reason in ("throttled", "network", "read", "changed", "key", "other"):
        assert value(m, "asyncsync_upload_failures_total", reason=reason) == 1, reason
    assert value(m, "asyncsync_upload_failures_total", reason="auth") == 0

    retries = [
        TransientStoreError("503", code="SlowDown"),
        TransientStoreError("429", code="429"),
        TransientStoreError("500", code="InternalError"),
        TransientStoreError("503", code="503"),
        TransientStoreError("reset"),  # no answer at all
        BadDigest("ETag is not the MD5 sent", code="BadDigest"),
    ]
    for exc in retries:
        m.retried(exc, 1, 0.1)
    assert value(m, "asyncsync_retries_total", reason="throttled") == 2
    assert value(m, "asyncsync_retries_total", reason="server") == 2
    assert value(m, "asyncsync_retries_total", reason="network") == 1
    assert value(m, "asyncsync_retries_total", reason="integrity") == 1
    m.sent(100)
    m.sent(100)  # a body sent again counts again
    assert value(m, "asyncsync_bytes_sent_total") == 200


def test_store_cause_of_a_refused_credential_is_auth() -> None:
    from asyncsync.errors import store_cause

    assert store_cause(FatalStoreError("no", code="InvalidAccessKeyId")) == "auth"
    assert store_cause(FatalStoreError("no", code="AccessDenied")) == "auth"
    assert store_cause(FatalStoreError("no", code="NoSuchBucket")) == "other"


def test_torn_reads_unchanged_and_queue_depth_of_a_batch() -> None:
    m = Metrics()
    for _ in range(3):
        m.scanned(10)
    assert value(m, "asyncsync_queue_depth") == 3
    m.outcome(FileOutcome("a", "a", Status.UNCHANGED, "same content", 10))
    m.outcome(FileOutcome("b", "b", Status.UPLOADED, "new", 10, torn_reads=2))
    m.unchanged_files("d/", "p/d/", [("x", 1, 1, 1), ("y", 1, 1, 1)])  # type: ignore[list-item]
    assert value(m, "asyncsync_queue_depth") == 1
    assert value(m, "asyncsync_torn_reads_total") == 2
    assert value(m, "asyncsync_files_unchanged_total") == 3
    m.finished(1)
    assert value(m, "asyncsync_queue_depth") == 0
    assert value(m, "asyncsync_exit_code") == 1
    assert value(m, "asyncsync_completion_timestamp_seconds") > 0


def test_training_gauges_are_the_last_row_of_results_csv() -> None:
    m = Metrics(run_depth=2)
    m.training("detect/train2", RESULTS)
    metrics = {(dict(labels)["metric"], dict(labels)["column"]): v
               for labels, v in series(m, "asyncsync_training_metric").items()}
    assert metrics == {
        ("train_box_loss", "train/box_loss"): 1.0,
        ("metrics_mAP50_B", "metrics/mAP50(B)"): 0.2,
        ("metrics_mAP50_95_B", "metrics/mAP50-95(B)"): 0.12,
    }
    assert value(m, "asyncsync_training_epoch", run="detect/train2") == 2
    assert value(m, "asyncsync_training_epoch_duration_seconds",
                 run="detect/train2") == pytest.approx(11.5)
    # watch knows no status; `run` says its training is running, then how it ended.
    assert not series(m, "asyncsync_run_status")
    m.training_status = "running"
    m.training("detect/train3", RESULTS)
    assert value(m, "asyncsync_run_status", run="detect/train3", status="running") == 1
    m.training_ended("crashed")
    for run in ("detect/train2", "detect/train3"):
        assert value(m, "asyncsync_run_status", run=run, status="crashed") == 1
        assert value(m, "asyncsync_run_status", run=run, status="running") == 0


def test_metric_names_are_sanitised() -> None:
    assert metric_name("metrics/mAP50(B)") == "metrics_mAP50_B"
    assert metric_name("metrics/mAP50-95(B)") == "metrics_mAP50_95_B"
    assert metric_name("lr/pg0") == "lr_pg0"
    assert metric_name("50th percentile") == "_50th_percentile"
    assert metric_name("???") == "_"


def test_a_results_csv_is_read_when_it_is_uploaded(tmp_path: Path) -> None:
    run = tmp_path / "detect" / "train2"
    run.mkdir(parents=True)
    (run / "results.csv").write_text(RESULTS)
    m = Metrics(run_depth=2, source=str(tmp_path))
    m.outcome(uploaded("detect/train2/results.csv", len(RESULTS)))
    assert value(m, "asyncsync_training_epoch", run="detect/train2") == 2
    # A results.csv swapped for a symlink is not read: its target is not the run's.
    (tmp_path / "secret.csv").write_text("epoch,token\n1,12345\n")
    other = tmp_path / "detect" / "train3"
    other.mkdir()
    (other / "results.csv").symlink_to(tmp_path / "secret.csv")
    m.outcome(uploaded("detect/train3/results.csv", 10))
    assert ("asyncsync_training_epoch", frozenset({("run", "detect/train3")})) not in samples(m)
    assert "12345" not in m.exposition().decode()


def test_columns_per_run_are_capped_and_what_was_dropped_is_counted() -> None:
    m = Metrics(max_columns=2)
    m.training("train", RESULTS)
    assert len(series(m, "asyncsync_training_metric")) == 2
    assert value(m, "asyncsync_metrics_dropped_total", what="column") == 1
    m.training("train", RESULTS)  # the same columns again: kept, the extra dropped again
    assert len(series(m, "asyncsync_training_metric")) == 2


def test_five_hundred_runs_come_and_go_with_the_ttl_and_the_cap_holds() -> None:
    m = Metrics(run_ttl=3600, max_runs=400)
    for i in range(500):
        m.outcome(uploaded(f"train{i}/results.csv", 10))
        m.training(f"train{i}", RESULTS)
        m.run_pending(f"train{i}", 1, 10)
    assert m.runs == 400
    assert len(series(m, "asyncsync_last_successful_sync_timestamp_seconds")) == 400
    assert len(series(m, "asyncsync_training_epoch")) == 400
    # Each of the 100 refused runs was refused by its upload, its training and its pending.
    assert value(m, "asyncsync_metrics_dropped_total", what="run") == 300

    assert m.expire(time.time() + 1800) == 0  # quiet, but within the TTL
    assert m.expire(time.time() + 3700) == 400  # quiet for longer: gone
    for name in ("asyncsync_last_successful_sync_timestamp_seconds",
                 "asyncsync_training_epoch", "asyncsync_training_metric",
                 "asyncsync_training_epoch_duration_seconds", "asyncsync_run_files_pending",
                 "asyncsync_run_bytes_pending"):
        assert not series(m, name), name
    # Room again: a new run gets its series.
    m.outcome(uploaded("fresh/results.csv", 10))
    assert ("asyncsync_last_successful_sync_timestamp_seconds",
            frozenset({("run", "fresh")})) in samples(m)


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.outcome(uploaded("x", 1))
    assert value(a, "asyncsync_files_uploaded_total", outcome="new") == 1
    assert value(b, "asyncsync_files_uploaded_total", outcome="new") == 0


def test_textfile_is_written_whole(tmp_path: Path) -> None:
    m = Metrics()
    m.outcome(uploaded("x", 5))
    target = tmp_path / "asyncsync.prom"
    m.write_textfile(str(target))
    assert 'asyncsync_bytes_uploaded_total{outcome="new"} 5.0' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["asyncsync.prom"]  # no temp file left


def test_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (from Prometheus) is not on PATH; cannot lint the exposition")
    m = Metrics(daemon=True, run_depth=2)
    m.outcome(uploaded("detect/train/weights/last.pt", 10 << 20, parts=2, mtime=time.time()))
    m.outcome(failed("detect/train/a", Failure.READ))
    m.retried(TransientStoreError("x", code="SlowDown"), 1, 0.1)
    m.training("detect/train", RESULTS)
    m.set_run_status("detect/train", "running")
    m.run_pending("detect/train", 2, 100)
    m.set_in_flight(1, 100)
    m.scanned_tree(0.1)
    m.deleted()
    m.cleanup_failed()
    result = subprocess.run([promtool, "check", "metrics"], input=m.exposition(),
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
