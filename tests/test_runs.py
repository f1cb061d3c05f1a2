"""`asyncsync runs DEST`: every run under a prefix and how it stands, from the bucket alone.

The runs are made the ways asyncsync makes them: `asyncsync run` around a small script shaped
like an ultralytics training (test_runner's), `asyncsync push` of a run directory, and run
records written as attach() and a killed `run` leave them (with boto3, so that their times
can lie in the past). The pure parts (finding runs in a listing, results.csv, the status
rules) are unit-tested without a server.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from asyncsync.commands.runs import (
    STALE_AFTER,
    Record,
    Tree,
    find_runs,
    metric_summary,
    parse_results,
    planned_epochs,
    record_directory,
    status_of,
)
from asyncsync.stores.protocol import ObjectInfo

from .conftest import ASYNCSYNC, S3Server, run_cli
from .test_runner import FAST, train

# ultralytics pads its column names (and older versions its values) with spaces.
PADDED = (
    "                  epoch,                 time,      train/box_loss,   metrics/mAP50(B),"
    "  metrics/mAP50-95(B),              fitness\n"
    "                      1,                   30,              1.2000,               0.30,"
    "                 0.20,                 0.21\n"
    "                      2,                   60,              1.1000,               0.50,"
    "                 0.40,                 0.41\n"
    "                      3,                   90,              1.0000,               0.45,"
    "                 0.35,                 0.36\n"
)


def iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def tree_of(*keys: str) -> Tree:
    """The listing of these keys (relative to PREFIX ``team``), 10 bytes each."""
    tree = Tree()
    for key in keys:
        tree.add(key, ObjectInfo(f"team/{key}", 10, '"etag"'))
    return tree


# -- pure logic ----------------------------------------------------------------------------


def test_results_csv_padded_names_last_and_best() -> None:
    rows = parse_results(PADDED)
    assert rows[0]["metrics/mAP50(B)"] == "0.30"
    summary = metric_summary(rows)
    assert summary["metrics/mAP50-95(B)"] == {"last": 0.35, "best": 0.40, "best_epoch": 2}
    assert summary["metrics/mAP50(B)"] == {"last": 0.45, "best": 0.50, "best_epoch": 2}
    assert summary["fitness"]["best"] == 0.41
    assert metric_summary(parse_results("epoch,metrics/mAP50(B)\n")) == {}


def test_planned_epochs_from_args_yaml() -> None:
    assert planned_epochs("task: detect\nepochs: 100\npatience: 50\n") == 100
    assert planned_epochs("task: detect\n") is None
    assert planned_epochs(None) is None


def test_record_keys() -> None:
    assert record_directory("_asyncsync/run.json") == ""
    assert record_directory("detect/train/_asyncsync/run.json") == "detect/train"
    assert record_directory("x_asyncsync/run.json") is None
    assert record_directory("a/_asyncsync/run.json.tmp") is None
    assert record_directory("_asyncsync/history/a/_asyncsync/run.json") is None


def test_status_rules() -> None:
    now = 1_000_000.0
    assert status_of(None, None, None, now) == "pushed"
    assert status_of({"status": "finished"}, 0.0, None, now) == "finished"
    assert status_of({"status": "crashed"}, now, None, now) == "crashed"
    assert status_of({"status": "paused"}, now, None, now) == "unknown"
    assert status_of({"status": "running"}, now - 60, None, now) == "running"
    assert status_of({"status": "running"}, now - STALE_AFTER - 1, None, now) == "stale"
    # Epochs of an hour: quiet for 20 minutes is not stale yet, for 2 hours and more it is.
    assert status_of({"status": "running"}, now - 1200, 3600.0, now) == "running"
    assert status_of({"status": "running"}, now - 7300, 3600.0, now) == "stale"


def test_runs_found_at_run_depth_below_records_and_by_attach_records() -> None:
    tree = tree_of(
        "_asyncsync/run.json",  # `asyncsync run runs s3://b/team`
        "detect/train/results.csv", "detect/train/weights/last.pt", "detect/train2/args.yaml",
        "detect/notes.txt",  # above the runs at depth 2: in no run
        "extra/train/plot.png",  # at depth 2, but nothing marks it as a run
        "old/exp/_asyncsync/run.json", "old/exp/results.csv",  # attach()'s, deeper than 2
        "_asyncsync/history/detect/train/results.csv.1",  # asyncsync's own: in no run
        "lost/results.csv",  # too shallow for depth 2
    )
    assert tree.records == {"team/_asyncsync/run.json": "",
                            "team/old/exp/_asyncsync/run.json": "old/exp"}
    records = [Record("team/_asyncsync/run.json", "", {"status": "running", "program": "yolo"}),
               Record("team/old/exp/_asyncsync/run.json", "old/exp",
                      {"status": "finished", "run": "exp"})]
    runs, lost = find_runs(tree, records, 2)
    assert [run.path for run in runs] == ["detect/train", "detect/train2", "old/exp"]
    train, train2, old = runs
    assert (train.objects, train.bytes, train.weights) == (2, 20, True)
    assert train.results == "team/detect/train/results.csv"
    assert train2.args == "team/detect/train2/args.yaml"
    assert train.parent is records[0] and train.record is None
    assert old.record is records[1] and old.parent is records[0]
    assert lost == ["team/lost/results.csv"]


def test_runs_named_by_the_record_of_run_wherever_they_lie() -> None:
    """`asyncsync run` names its run directories by path: those are runs at any depth."""
    tree = tree_of(
        "a/_asyncsync/run.json", "a/detect/train/results.csv", "a/detect/train/weights/best.pt",
        "b/_asyncsync/run.json", "b/results.csv",  # `run` watched the run directory itself
    )
    records = [
        Record("a/_asyncsync/run.json", "a", {"program": "yolo", "runs": [
            {"path": "detect/train", "epochs": 3, "metrics": {}}]}),
        Record("b/_asyncsync/run.json", "b", {"program": "python", "runs": [
            {"path": ".", "epochs": 1, "metrics": {}}]}),
    ]
    runs, lost = find_runs(tree, records, 1)
    assert [(run.path, run.objects) for run in runs] == [("a/detect/train", 2), ("b", 1)]
    assert runs[0].parent is records[0] and runs[1].record is records[1]
    assert lost == []


def test_a_run_directory_pushed_to_the_prefix_itself_is_one_run() -> None:
    runs, lost = find_runs(tree_of("results.csv", "args.yaml", "weights/last.pt"), [], 1)
    assert [(run.path, run.objects, run.weights) for run in runs] == [("", 3, True)]
    # Files directly in a directory `run` watched belong to no run.
    watched = [Record("team/_asyncsync/run.json", "", {"program": "yolo"})]
    runs, lost = find_runs(tree_of("_asyncsync/run.json", "results.csv", "exp/args.yaml"),
                           watched, 1)
    assert [run.path for run in runs] == ["exp"] and lost == ["team/results.csv"]


# -- against the servers ---------------------------------------------------------------------


def put(client: Any, bucket: str, key: str, body: str | bytes) -> None:
    data = body.encode() if isinstance(body, str) else body
    client.put_object(Bucket=bucket, Key=key, Body=data)


def runs_at(server: S3Server, dest: str, now: float,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The runs as `runs --json` describes them, seen at ``now`` (in-process: a real store
    cannot be asked for objects stored in the past)."""
    import asyncio

    from asyncsync.commands.runs import list_runs, runs_config_from
    from asyncsync.options import from_mapping
    from asyncsync.stores.session import StoreSession, store_opener

    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    config = runs_config_from(from_mapping("runs", {"endpoint_url": server.endpoint,
                                                    "addressing_style": "path"}), dest)

    async def listed() -> list[dict[str, Any]]:
        session = StoreSession(store_opener(config.destination, config.store), 2)
        try:
            return await list_runs(config, await session.get(), now=now)
        finally:
            await session.close()

    return {run["run"]: run for run in asyncio.run(listed())}


def runs_json(server: S3Server, dest: str, *extra: str) -> dict[str, dict[str, Any]]:
    result = run_cli("runs", dest, "--json", *extra, env=server.env(), timeout=60)
    assert result.returncode == 0, result.stderr
    return {record["run"]: record for record in result.records}


@pytest.mark.s3
def test_runs_lists_finished_crashed_stale_running_attached_and_pushed_runs(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    team = f"s3://{bucket}/team"
    # Two trainings under `asyncsync run`, at once: one finishes, one exits 3 at epoch 2.
    trainings = []
    for name, crash in (("a", "none"), ("b", "exit")):
        where = tmp_path / name
        where.mkdir()
        trainings.append(subprocess.Popen(
            [ASYNCSYNC, "run", str(where / "runs"), f"{team}/{name}", "--state-dir",
             str(where / "state"), *FAST, "--", *train(where, 3, crash)],
            env=s3_server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    # A run pushed without a record, its results.csv stored gzip-encoded.
    pushed = tmp_path / "pushed" / "exp"
    pushed.mkdir(parents=True)
    (pushed / "args.yaml").write_text("task: detect\nepochs: 40\n")
    (pushed / "results.csv").write_text(PADDED + PADDED.split("\n", 1)[1] * 20)
    done = run_cli("push", pushed, f"{team}/e", "--state-dir", tmp_path / "pushed-state",
                   "--gzip", env=s3_server.env())
    assert done.returncode == 0, done.stderr
    client = s3_server.client()
    now = time.time()
    # What a `run` killed with SIGKILL leaves: a record that says running, two hours old.
    put(client, bucket, "team/c/_asyncsync/run.json", json.dumps({
        "status": "running", "host": "gpu-7", "program": "yolo", "pid": 4242,
        "started": iso(now - 7200), "runs": []}))
    put(client, bucket, "team/c/exp/results.csv", PADDED)
    # One running now: started a minute ago, its record written before the run directory
    # existed (no runs in it yet); its epochs planned come from args.yaml.
    put(client, bucket, "team/d/_asyncsync/run.json", json.dumps({
        "status": "running", "host": "gpu-8", "program": "yolo", "pid": 4343,
        "started": iso(now - 60)}))
    put(client, bucket, "team/d/exp/results.csv", PADDED)
    put(client, bucket, "team/d/exp/args.yaml", "epochs: 10\n")
    # attach()'s record of a run inside it: s3://bucket/team/f with run directory `train`.
    put(client, bucket, "team/f/train/_asyncsync/run.json", json.dumps({
        "status": "finished", "host": "gpu-9", "run": "train", "epochs_planned": 3,
        "epochs": 3, "metrics": {"metrics/mAP50(B)": "0.45"}, "started": iso(now - 500),
        "ended": iso(now - 400), "unsent": 0}))
    put(client, bucket, "team/f/train/results.csv", PADDED)
    put(client, bucket, "team/f/train/weights/best.pt", b"\0" * 1000)
    for training in trainings:
        _, stderr = training.communicate(timeout=120)
        assert training.returncode in (0, 3), stderr

    runs = runs_json(s3_server, team)
    assert sorted(runs) == ["a/exp", "b/exp", "c/exp", "d/exp", "e", "f/train"]
    finished, crashed, stale = runs["a/exp"], runs["b/exp"], runs["c/exp"]
    assert finished["status"] == "finished" and finished["exit_code"] == 0
    assert finished["epochs"] == 3 and finished["epochs_planned"] == 3  # from args.yaml
    assert finished["metrics"]["metrics/mAP50(B)"] == {"last": 0.3, "best": 0.3,
                                                      "best_epoch": 3}
    assert finished["host"] and finished["started"] and finished["ended"]
    assert finished["objects"] == 3 and finished["bytes"] > 400_000  # args, results, last.pt
    assert finished["record"] == "team/a/_asyncsync/run.json"
    assert finished["url"] == f"{team}/a/exp"
    assert crashed["status"] == "crashed" and crashed["exit_code"] == 3
    assert crashed["epochs"] == 2
    # Its record is two hours old, but its results.csv was stored a moment ago: alive.
    assert stale["status"] == "running" and stale["host"] == "gpu-7"
    assert stale["metrics"]["metrics/mAP50-95(B)"] == {"last": 0.35, "best": 0.4,
                                                      "best_epoch": 2}
    # Three hours on with nothing new in the bucket, it is stale (a finished run is not).
    later = runs_at(s3_server, team, time.time() + 3 * 3600, monkeypatch)
    assert later["c/exp"]["status"] == "stale" and later["c/exp"]["host"] == "gpu-7"
    assert later["a/exp"]["status"] == "finished"
    assert runs["d/exp"]["status"] == "running" and runs["d/exp"]["epochs_planned"] == 10
    assert runs["f/train"]["status"] == "finished"
    assert runs["f/train"]["epochs_planned"] == 3 and runs["f/train"]["objects"] == 2
    # The newest object's LastModified (stored just now), later than the record's end.
    assert runs["f/train"]["last_sync"] >= iso(now - 400)
    assert runs["e"]["status"] == "pushed" and runs["e"]["host"] is None
    assert runs["e"]["epochs"] == 63 and runs["e"]["epochs_planned"] == 40  # decoded gzip
    assert runs["e"]["metrics"]["fitness"]["best"] == 0.41

    # `asyncsync runs` of the prefix `run` wrote to: the run at depth 1 below it.
    assert list(runs_json(s3_server, f"{team}/a")) == ["exp"]
    # The table: one line per run, the metrics as last (best).
    table = run_cli("runs", team, env=s3_server.env(), timeout=60)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:6] == ["RUN", "STATUS", "HOST", "STARTED", "ENDED", "EPOCHS"]
    assert "mAP50-95 (best)" in header and "LAST SYNC" in header
    by_run = {line.split()[0]: line for line in lines}
    assert by_run["c/exp"].split()[1:3] == ["running", "gpu-7"]
    assert " 3/3 " in by_run["a/exp"] and " 0.350 (0.400) " in by_run["c/exp"]
    assert by_run["e"].split()[1:3] == ["pushed", "-"]


@pytest.mark.s3
def test_runs_of_a_prefix_with_nothing_and_of_a_missing_bucket(
    s3_server: S3Server, bucket: str
) -> None:
    empty = run_cli("runs", f"s3://{bucket}/nothing", env=s3_server.env(), timeout=60)
    assert empty.returncode == 0 and empty.stdout == ""
    assert "no runs under" in empty.stderr
    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    result = run_cli("runs", f"s3://{missing}/team", env=s3_server.env(), timeout=60)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and missing in result.stderr


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_run_depth_that_misses_the_runs_is_hinted(
    s3_server: S3Server, bucket: str
) -> None:
    client = s3_server.client()
    put(client, bucket, "p/detect/train/results.csv", PADDED)
    result = run_cli("runs", f"s3://{bucket}/p", "--json", env=s3_server.env(), timeout=60)
    assert result.returncode == 0 and result.records == []
    assert "see --run-depth" in result.stderr
    deeper = runs_json(s3_server, f"s3://{bucket}/p", "--run-depth", "2")
    assert deeper["detect/train"]["status"] == "pushed"
