"""`asyncsync metrics export SRC`: runs' results.csv as OpenMetrics, one sample per epoch.

The output is checked as text (the exact lines of a known tree, the timestamp rules, label
escaping) and as what it is for: the export of runs in a real bucket is turned into TSDB
blocks by the real `promtool`, a real `prometheus` serves them, and its query API must give
back every epoch of every run at the time the rule says, with the value of the CSV.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from asyncsync.commands.metrics_export import (
    EPOCHS_APART,
    Undatable,
    epoch_ends,
    label_value,
    record_times,
    seconds_text,
)
from asyncsync.commands.runs import Record, Run
from asyncsync.service.training import epochs_of, metric_name

from .conftest import ASYNCSYNC, S3Server, run_cli
from .prometheus import Prometheus, needs_prometheus

# ultralytics pads its names and values; the second epoch has no mAP50-95 (an empty cell).
RESULTS = (
    "                  epoch,                 time,      train/box_loss,   metrics/mAP50(B),"
    "  metrics/mAP50-95(B),               lr/pg0\n"
    "                      1,                 30.5,                 1.2,                0.3,"
    "                0.123,                 0.01\n"
    "                      2,                   61,                 1.1,                0.5,"
    "                     ,                0.009\n"
)
STARTED = "2024-12-05T12:00:00Z"  # 1733400000
# A run directory name holding a quote, a backslash-n (two characters) and a newline.
ODD = 'odd"q\\n\nx'

EXPECTED = """\
# TYPE asyncsync_training_metric gauge
# HELP asyncsync_training_metric A numeric column of a run's results.csv at the end of each \
epoch (metric: its sanitised name, column: as written).
asyncsync_training_metric{run="detect/odd\\"q\\\\n\\nx",metric="train_box_loss",\
column="train/box_loss"} 0.9 1733499880.25
asyncsync_training_metric{run="detect/odd\\"q\\\\n\\nx",metric="train_box_loss",\
column="train/box_loss"} 0.8 1733499940.25
asyncsync_training_metric{run="detect/odd\\"q\\\\n\\nx",metric="train_box_loss",\
column="train/box_loss"} 0.7 1733500000.25
asyncsync_training_metric{run="detect/train2",metric="train_box_loss",column="train/box_loss"} \
1.2 1733400030.5
asyncsync_training_metric{run="detect/train2",metric="train_box_loss",column="train/box_loss"} \
1.1 1733400061
asyncsync_training_metric{run="detect/train2",metric="metrics_mAP50_B",\
column="metrics/mAP50(B)"} 0.3 1733400030.5
asyncsync_training_metric{run="detect/train2",metric="metrics_mAP50_B",\
column="metrics/mAP50(B)"} 0.5 1733400061
asyncsync_training_metric{run="detect/train2",metric="metrics_mAP50_95_B",\
column="metrics/mAP50-95(B)"} 0.123 1733400030.5
asyncsync_training_metric{run="detect/train2",metric="lr_pg0",column="lr/pg0"} \
0.01 1733400030.5
asyncsync_training_metric{run="detect/train2",metric="lr_pg0",column="lr/pg0"} \
0.009 1733400061
# TYPE asyncsync_training_epoch gauge
# HELP asyncsync_training_epoch The epoch of a run's results.csv that ended at this time.
asyncsync_training_epoch{run="detect/odd\\"q\\\\n\\nx"} 1 1733499880.25
asyncsync_training_epoch{run="detect/odd\\"q\\\\n\\nx"} 2 1733499940.25
asyncsync_training_epoch{run="detect/odd\\"q\\\\n\\nx"} 3 1733500000.25
asyncsync_training_epoch{run="detect/train2"} 1 1733400030.5
asyncsync_training_epoch{run="detect/train2"} 2 1733400061
# TYPE asyncsync_training_epoch_duration_seconds gauge
# UNIT asyncsync_training_epoch_duration_seconds seconds
# HELP asyncsync_training_epoch_duration_seconds The wall time of the epoch that ended at this \
time (results.csv's time column).
asyncsync_training_epoch_duration_seconds{run="detect/train2"} 30.5 1733400030.5
asyncsync_training_epoch_duration_seconds{run="detect/train2"} 30.5 1733400061
# EOF
"""


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def record_json(**fields: Any) -> str:
    return json.dumps({"status": "finished", "host": "gpu-1", "asyncsync": "0.1.0", **fields})


@pytest.fixture
def export(cli_main: Any) -> Any:
    """`asyncsync metrics export ARGS...` in-process: (exit code, stdout, stderr)."""
    return lambda *args: cli_main("metrics", "export", *args)


def known_tree(root: Path) -> Path:
    """A runs tree at depth 2: detect/train2 with its record and a `time` column, and a run
    with an odd name, no record and no `time`, its results.csv last written at a known time."""
    write(root / "detect/train2/results.csv", RESULTS)
    write(root / "detect/train2/_asyncsync/run.json",
          record_json(run="train2", started=STARTED, ended="2024-12-05T12:05:00Z"))
    write(root / "detect/train2/weights/last.pt", "weights")
    odd = write(root / "detect" / ODD / "results.csv",
                "epoch,train/box_loss\n1,0.9\n2,0.8\n3,0.7\n")
    os.utime(odd, ns=(1_733_500_000_250_000_000, 1_733_500_000_250_000_000))
    return root


# -- the text --------------------------------------------------------------------------------


def test_known_tree_gives_exactly_the_expected_openmetrics(export: Any, tmp_path: Path) -> None:
    code, out, err = export(known_tree(tmp_path / "runs"), "--run-depth", "2")
    assert (code, err) == (0, "")
    assert out == EXPECTED


def test_metric_names_label_values_and_timestamps_as_written() -> None:
    assert metric_name("metrics/mAP50(B)") == "metrics_mAP50_B"
    assert metric_name("metrics/mAP50-95(B)") == "metrics_mAP50_95_B"
    assert metric_name("train/box_loss") == "train_box_loss"
    assert metric_name("1st") == "_1st" and metric_name("()") == "_"
    assert label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert label_value("caf\xe9") == "caf\xe9"  # UTF-8, unescaped
    assert label_value("bad\udcff") == "bad\ufffd"  # an undecodable file name's byte
    assert seconds_text(1_733_400_000_500) == "1733400000.5"
    assert seconds_text(1_733_400_030_000) == "1733400030"
    assert seconds_text(1_733_400_000_120) == "1733400000.12"
    assert seconds_text(1_733_400_000_007) == "1733400000.007"
    assert seconds_text(-1500) == "-1.5"


def test_timestamp_rules() -> None:
    timed = epochs_of("epoch,time,loss\n1,10,0.5\n2,25,0.4\n3,45.0004,0.3\n")
    untimed = epochs_of("epoch,loss\n1,0.5\n2,0.4\n3,0.3\n")
    # 1. The record's start plus `time` (rounded to the millisecond).
    assert epoch_ends(timed, 1000.0, 2000.0, 3000.0) == [1_010_000, 1_025_000, 1_045_000]
    # 2. A start and no `time`: spread evenly up to the record's end, else LastModified.
    assert epoch_ends(untimed, 1000.0, 1300.0, 5000.0) == [1_100_000, 1_200_000, 1_300_000]
    assert epoch_ends(untimed, 1000.0, None, 1600.0) == [1_200_000, 1_400_000, 1_600_000]
    # 3. No start: the last epoch at LastModified, the others `time` apart before it...
    assert epoch_ends(timed, None, None, 5000.0) == [4_965_000, 4_980_000, 5_000_000]
    # ... or 60 s apart.
    assert EPOCHS_APART == 60.0
    assert epoch_ends(untimed, None, None, 5000.0) == [4_880_000, 4_940_000, 5_000_000]
    # Not increasing: a `time` that starts over (a resume), a record ending before its start,
    # nothing to date them from.
    resumed = epochs_of("epoch,time,loss\n1,10,0.5\n2,20,0.4\n3,5,0.3\n")
    with pytest.raises(Undatable, match="epoch 3 .*time column"):
        epoch_ends(resumed, 1000.0, None, 3000.0)
    with pytest.raises(Undatable, match="ends before it started"):
        epoch_ends(untimed, 1000.0, 900.0, 3000.0)
    with pytest.raises(Undatable, match="no record"):
        epoch_ends(untimed, None, None, None)


def test_a_record_started_after_results_csv_was_written_is_another_trainings() -> None:
    """`asyncsync run` of the same directory again overwrites its record: the earlier run
    under it keeps its results.csv, which the new record's start does not date."""
    record = Record("team/_asyncsync/run.json", "", {
        "program": "yolo", "started": "2024-12-05T12:00:00Z", "updated": "2024-12-05T13:00:00Z"})
    before = Run("detect/train", parent=record, results="team/detect/train/results.csv",
                 results_modified=1_733_300_000.0)
    after = Run("detect/train2", parent=record, results="team/detect/train2/results.csv",
                results_modified=1_733_403_000.0)
    assert record_times(before) == (None, None)
    assert record_times(after) == (1_733_400_000.0, 1_733_403_600.0)  # ended: else updated
    assert record_times(Run("x", results_modified=1.0)) == (None, None)


# -- a local tree ----------------------------------------------------------------------------


def test_local_runs_filtered_written_atomically_and_a_bad_run_fails_alone(
    export: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    write(runs / "train/results.csv", "epoch,time,loss\n1,10,0.5\n2,20,0.4\n")
    write(runs / "train/_asyncsync/run.json", record_json(started=STARTED))
    write(runs / "val/results.csv", "epoch,time,loss\n1,5,0.9\n")
    write(runs / "val/_asyncsync/run.json", record_json(started=STARTED))
    output = write(tmp_path / "out" / "runs.om", "an older export\n")

    code, out, err = export(runs, "-o", output, "--run", "tr*")
    assert (code, out, err) == (0, "", "")
    text = output.read_text()
    assert 'run="train"' in text and 'run="val"' not in text
    assert text.count("\nasyncsync_training_epoch{") == 2 and text.endswith("\n# EOF\n")
    assert sorted(p.name for p in output.parent.iterdir()) == ["runs.om"]  # no temp left

    # A results.csv replaced by a symlink is refused, never followed: a warning, exit 1,
    # and the other runs still exported.
    secret = write(tmp_path / "secret.csv", "epoch,password\n1,12345\n")
    (runs / "val/results.csv").unlink()
    (runs / "val/results.csv").symlink_to(secret)
    write(runs / "resumed/results.csv", "epoch,time,loss\n1,10,0.5\n2,3,0.4\n")
    write(runs / "resumed/_asyncsync/run.json", record_json(started=STARTED))
    code, out, err = export(runs)
    assert code == 1
    assert "12345" not in out and 'run="val"' not in out and 'run="resumed"' not in out
    assert out.count('asyncsync_training_epoch{run="train"}') == 2
    warnings = err.splitlines()
    assert len(warnings) == 2, err
    assert warnings[0].startswith("asyncsync: warning: resumed: not exported: epoch 2 ")
    assert warnings[1].startswith("asyncsync: warning: val: not exported: its results.csv: ")
    assert "symlink" in warnings[1]

    # Nothing matches: a warning, exit 0, and a valid (empty) export.
    code, out, err = export(runs, "--run", "nothing*")
    assert code == 0 and out.endswith("# EOF\n") and "\nasyncsync_" not in out
    assert "no run with a results.csv matching 'nothing*'" in err


@pytest.mark.parametrize("source", ["nowhere", "http://example.com/x", "s3://x"])
def test_a_bad_source_is_one_line_and_exit_2(export: Any, tmp_path: Path, source: str) -> None:
    code, out, err = export(tmp_path / source if source == "nowhere" else source)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith("asyncsync: error: source ")


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    rows = "".join(f"{epoch},{epoch * 10},0.5,0.25\n" for epoch in range(1, 2001))
    write(runs / "train/results.csv", "epoch,time,loss,map\n" + rows)
    process = subprocess.Popen([ASYNCSYNC, "metrics", "export", str(runs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.close()  # `| head -0`: gone before the first line
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141  # 128 + SIGPIPE, as the shells say
    assert err == ""


# -- a bucket, promtool and prometheus --------------------------------------------------------


def raw_samples(prom: Prometheus, selector: str, at: float) -> dict[tuple[str, ...], list[Any]]:
    """Every stored sample of the series of ``selector`` in the 30 days before ``at``, by
    their labels (sorted, the name left out): [(timestamp, value as float)...]."""
    return {
        tuple(f"{k}={v}" for k, v in sorted(series["metric"].items()) if k != "__name__"):
        [(stamp, float(value)) for stamp, value in series["values"]]
        for series in prom.query(f"{selector}[30d]", at=round(at, 3))
    }


@needs_prometheus
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.servers("seaweedfs")  # the backfill is the test; one real server will do
def test_runs_in_a_bucket_backfill_prometheus_one_sample_per_epoch(
    s3_server: S3Server, bucket: str, tmp_path: Path, export: Any,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three finished trainings, a few days ago, pushed from a local tree; their records as
    # attach() leaves them (written with boto: their times lie in the past).
    now = time.time()
    names = ["detect/train", "detect/train2", "segment/exp"]
    columns = ["train/box_loss", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
    elapsed = [30.125, 61.25, 92.5, 123.0]
    started = {name: float(int(now) - (4 - index) * 86400) for index, name in enumerate(names)}
    values = {name: [[round(0.1 * (index + 1) + epoch / 7 + column / 3, 6)
                      for column in range(len(columns))] for epoch in range(len(elapsed))]
              for index, name in enumerate(names)}
    local = tmp_path / "runs"
    for name in names:
        rows = "".join(f"{epoch + 1},{seconds},{','.join(map(str, values[name][epoch]))}\n"
                       for epoch, seconds in enumerate(elapsed))
        write(local / name / "results.csv", f"epoch,time,{','.join(columns)}\n{rows}")
        write(local / name / "weights/best.pt", "weights")
    pushed = run_cli("push", local, f"s3://{bucket}/team", "--state-dir", tmp_path / "state",
                     env=s3_server.env(), timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    client = s3_server.client()
    for name in names:
        client.put_object(Bucket=bucket, Key=f"team/{name}/_asyncsync/run.json",
                          Body=record_json(run=name.rpartition("/")[2],
                                           started=iso(started[name]),
                                           ended=iso(started[name] + 130), epochs=4).encode())

    for variable, value in s3_server.env().items():
        monkeypatch.setenv(variable, value)
    output = tmp_path / "runs.om"
    code, out, err = export(f"s3://{bucket}/team", "-o", output)
    assert (code, out, err) == (0, "", "")

    data = tmp_path / "data"
    blocks = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics",
                             str(output), str(data)], capture_output=True, text=True,
                            timeout=120)
    assert blocks.returncode == 0, blocks.stdout + blocks.stderr

    # Nothing scraped: it only serves the blocks, kept however old they are.
    with Prometheus("global:\n  scrape_interval: 1h\n", data,
                    "--storage.tsdb.retention.time=3650d") as prom:
        metrics = raw_samples(prom, "asyncsync_training_metric", now)
        epochs = raw_samples(prom, "asyncsync_training_epoch", now)
        durations = raw_samples(prom, "asyncsync_training_epoch_duration_seconds", now)

    ends = {name: [started[name] + seconds for seconds in elapsed] for name in names}
    assert metrics == {
        (f"column={column}", f"metric={metric_name(column)}", f"run={name}"):
        [(end, values[name][epoch][index]) for epoch, end in enumerate(ends[name])]
        for name in names for index, column in enumerate(columns)
    }
    assert epochs == {(f"run={name}",): [(end, float(epoch + 1))
                                         for epoch, end in enumerate(ends[name])]
                      for name in names}
    walls = [30.125, 31.125, 31.25, 30.5]
    assert durations == {(f"run={name}",): list(zip(ends[name], walls, strict=True))
                         for name in names}


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_a_run_unreadable_in_the_bucket_fails_alone_and_a_missing_bucket_is_exit_2(
    s3_server: S3Server, bucket: str, export: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="p/good/results.csv",
                      Body=b"epoch,time,loss\n1,10,0.5\n")
    client.put_object(Bucket=bucket, Key="p/good/_asyncsync/run.json",
                      Body=record_json(started=STARTED).encode())
    # Said to be gzip, and not: its body does not decode.
    client.put_object(Bucket=bucket, Key="p/bad/results.csv", Body=b"epoch,loss\n1,0.5\n",
                      ContentEncoding="gzip")
    for variable, value in s3_server.env().items():
        monkeypatch.setenv(variable, value)

    code, out, err = export(f"s3://{bucket}/p")
    assert code == 1
    assert out.splitlines()[2:3] == [
        'asyncsync_training_metric{run="good",metric="loss",column="loss"} 0.5 1733400010']
    assert 'run="bad"' not in out
    assert err.startswith("asyncsync: warning: bad: not exported: its results.csv: ")
    assert "gzip" in err and len(err.splitlines()) == 1

    code, out, err = export(f"s3://{bucket}-missing/p")
    assert (code, out) == (2, "") and len(err.splitlines()) == 1
