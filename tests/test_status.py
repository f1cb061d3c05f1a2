"""`asyncsync status`: what the local manifest knows, compared with the disk, with no network.

The manifest is filled by real pushes (and a real watch daemon, which holds it open while
status reads it); status itself never talks to the store, so these run on SeaweedFS only.
The pure parts (telling a row's source root and prefix apart) are unit-tested.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from asyncsync.commands.status import Pair, StatusConfig, collect, split_row
from asyncsync.pipeline.manifest import Manifest, ObjectRecord, PendingUpload, Scope

from .conftest import S3Server, bucket_keys, run_cli
from .test_watch import Daemon, daemons, wait_for  # noqa: F401 - daemons is a fixture

# -- pure logic ----------------------------------------------------------------------------


def test_a_row_splits_where_its_path_and_key_stop_sharing_segments() -> None:
    assert split_row("/data/runs/detect/train/results.csv", "team/detect/train/results.csv") \
        == ("/data/runs", "team", "detect/train/results.csv")
    assert split_row("/data/x.txt", "x.txt") == ("/data", "", "x.txt")
    assert split_row("/x.txt", "p/x.txt") == ("/", "p", "x.txt")
    # attach()'s checkpoint snapshots are sent from a staged copy: not the key's name.
    assert split_row("/tmp/stage/000001-last.pt", "team/train/weights/last.pt") is None


def test_a_pair_is_shown_from_the_deepest_directory_holding_its_rows() -> None:
    """runs -> s3://b/runs and its parent -> s3://b give the same rows: either is shown from
    the deepest directory that holds every row, never from below a run directory."""
    pair = Pair("aws", "b", "/data", "")
    for run in ("train", "train2"):
        pair.counts(f"runs/detect/{run}/weights")
        pair.note(f"runs/detect/{run}/weights", {"last.pt"})
    pair.rebase()
    assert (pair.root, pair.prefix, pair.destination) == (
        "/data/runs/detect", "runs/detect", "s3://b/runs/detect")
    assert pair.runs == {"train", "train2"}
    assert set(pair.directories) == {"train/weights", "train2/weights"}
    single = Pair("aws", "b", "/data/runs", "team")
    single.counts("detect/train/weights")
    single.note("detect/train/weights", {"best.pt"})
    single.rebase()
    assert (single.root, single.prefix, single.runs) == (
        "/data/runs/detect/train", "team/detect/train", {""})
    top = Pair("aws", "b", "/data/runs", "team")
    top.counts("")
    top.counts("detect/train")
    top.rebase()
    assert (top.root, top.prefix) == ("/data/runs", "team")


def test_staged_snapshots_and_uploads_in_progress_belong_to_their_run(tmp_path: Path) -> None:
    """attach() sends checkpoints from staged copies (the row's path is the copy's) until its
    final flush; a killed multipart upload stays in the manifest until it resumes."""
    run, state = tmp_path / "runs" / "train", tmp_path / "state"
    (run / "weights").mkdir(parents=True)
    files = {"results.csv": b"epoch\n1\n", "args.yaml": b"epochs: 1\n",
             "weights/last.pt": b"w" * 100, "weights/best.pt": b"b" * 100}
    for name, body in files.items():
        (run / name).write_bytes(body)
    scope = Scope("http://store", "b")
    manifest = Manifest.open(state)
    for name in ("results.csv", "args.yaml"):
        st = (run / name).stat()
        manifest.record_object(scope, ObjectRecord(
            f"team/train/{name}", str(run / name), st.st_size, st.st_mtime_ns, st.st_ino,
            "d", '"e"', st.st_size, None, 1_700_000_000.0))
    manifest.record_object(scope, ObjectRecord(
        "team/train/weights/last.pt", str(tmp_path / "stage" / "000001-last.pt"), 100, 1, 1,
        "d", '"e"', 100, None, 1_700_000_100.0))
    manifest.begin_upload(scope, PendingUpload(
        "team/train/weights/best.pt", "upload-1", str(run / "weights" / "best.pt"), 100, 1, 1,
        "d", 5 * 1024 * 1024, None, 1_700_000_200.0))
    manifest.close()
    (run / os.fsdecode(b"plot-\xff.png")).write_bytes(b"not UTF-8: never recorded")

    (pair,) = collect(StatusConfig(state))["destinations"]
    assert (pair["source"], pair["destination"]) == (str(run), "s3://b/team/train")
    assert (pair["files"], pair["uploaded"], pair["in_sync"], pair["modified"], pair["new"],
            pair["resumable"]) == (5, 3, 2, 1, 2, 1)
    assert [entry["run"] for entry in pair["runs"]] == [""]  # the root is the run
    assert pair["last_sync"] == "2023-11-14T22:15:00Z"


# -- after real pushes ---------------------------------------------------------------------


def make_runs(root: Path) -> None:
    for run in ("train", "train2"):
        directory = root / "detect" / run
        (directory / "weights").mkdir(parents=True)
        (directory / "args.yaml").write_text("epochs: 3\n")
        (directory / "results.csv").write_text("epoch,metrics/mAP50(B)\n1,0.1\n")
        (directory / "weights" / "last.pt").write_bytes(os.urandom(5000))
    (root / "notes.txt").write_text("outside any run\n")


def status(state: Path, *extra: str) -> dict[str, Any]:
    result = run_cli("status", "--state-dir", state, "--json", *extra, env=offline_env())
    assert result.returncode == 0, result.stderr
    assert len(result.records) == 1
    return result.records[0]


def offline_env() -> dict[str, str]:
    """No endpoint, no credentials: status must not need any."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def by_run(pair: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["run"]: run for run in pair["runs"]}


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_status_after_a_push_then_changes(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    make_runs(src)
    pushed = run_cli("push", src, f"s3://{bucket}/team", "--state-dir", state,
                     env=s3_server.env())
    assert pushed.returncode == 0, pushed.stderr
    before = time.time()

    state_now = status(state)
    assert state_now["manifest"] == str(state / "manifest.db")
    (pair,) = state_now["destinations"]
    assert pair["destination"] == f"s3://{bucket}/team" and pair["source"] == str(src)
    assert pair["store"] == s3_server.endpoint and pair["bucket"] == bucket
    assert (pair["files"], pair["uploaded"], pair["in_sync"], pair["pending"],
            pair["gone"], pair["failed"]) == (7, 7, 7, 0, 0, 0)
    assert pair["bytes"] == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert pair["last_sync"] <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before))
    runs = by_run(pair)
    assert sorted(runs) == ["detect/train", "detect/train2"]
    assert runs["detect/train"]["path"] == str(src / "detect" / "train")
    assert (runs["detect/train"]["files"], runs["detect/train"]["uploaded"]) == (3, 3)
    assert pair["outside_runs"]["files"] == 1  # notes.txt

    # One file changed, one new, one deleted: pending 2, gone 1, in train2 alone.
    train2 = src / "detect" / "train2"
    with open(train2 / "results.csv", "a") as results:
        results.write("2,0.2\n")
    (train2 / "weights" / "best.pt").write_bytes(b"best")
    (train2 / "args.yaml").unlink()
    (pair,) = status(state)["destinations"]
    assert (pair["files"], pair["uploaded"], pair["in_sync"], pair["modified"], pair["new"],
            pair["pending"], pair["gone"]) == (8, 7, 5, 1, 1, 2, 1)
    changed = by_run(pair)["detect/train2"]
    assert (changed["modified"], changed["new"], changed["gone"]) == (1, 1, 1)
    assert changed["pending_bytes"] == (train2 / "results.csv").stat().st_size + 4
    assert by_run(pair)["detect/train"]["pending"] == 0

    text = run_cli("status", "--state-dir", state, env=offline_env())
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{src} -> s3://{bucket}/team (store {s3_server.endpoint})"
    assert "8 files: 7 uploaded" in lines[1] and "2 pending (1 modified, 1 new" in lines[1]
    assert lines[2].split() == ["RUN", "FILES", "UPLOADED", "PENDING", "FAILED", "GONE", "BYTES",
                                "LAST", "SYNC"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["detect/train2"][1:6] == ["4", "3", "2", "0", "1"]
    assert rows["(outside"][2:6] == ["1", "1", "0", "0"]


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_status_reads_the_manifest_a_watch_daemon_holds(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    make_runs(src)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/w", state, "--settle", "0.2",
                    "--interval", "0.5")
    daemons.append(daemon)
    client = s3_server.client()
    wait_for(lambda: len(bucket_keys(client, bucket, "w/")) == 7, what="the first sync")

    def in_sync() -> dict[str, Any] | None:
        (pair,) = status(state)["destinations"] or [None]
        return pair if pair is not None and pair["in_sync"] == 7 else None

    pair = wait_for(in_sync, what="status to see every upload")
    assert pair["destination"] == f"s3://{bucket}/w" and pair["pending"] == 0
    (src / "detect" / "train" / "weights" / "epoch1.pt").write_bytes(b"x" * 100)
    assert daemon.process.poll() is None, daemon.log  # still running, manifest still held
    assert daemon.stop() == 0, daemon.log
    assert status(state)["destinations"][0]["uploaded"] == 8


def test_status_without_a_manifest_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("status", "--state-dir", tmp_path / "nothing-here", env=offline_env())
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "no manifest at" in line and "nothing-here" in line


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")  # status reads the manifest alone; the push needs a store
def test_a_failed_upload_is_counted_until_it_succeeds(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    from .faultproxy import FaultProxy

    src, state = tmp_path / "runs", tmp_path / "state"
    run = src / "exp"
    run.mkdir(parents=True)
    (run / "results.csv").write_text("epoch\n1\n")
    (run / "args.yaml").write_text("epochs: 1\n")
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.inject("503", 100, method="PUT", path_contains="results.csv")
        failed = run_cli("push", src, f"s3://{bucket}/f", "--state-dir", state, "--retries",
                         "1", env=s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint))
        assert failed.returncode == 1, failed.stderr
        (pair,) = status(state)["destinations"]
        assert (pair["uploaded"], pair["failed"]) == (1, 1)
        assert [run["failed"] for run in pair["runs"]] == [1]
        proxy.clear_rules()
        again = run_cli("push", src, f"s3://{bucket}/f", "--state-dir", state,
                        env=s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint))
        assert again.returncode == 0, again.stderr
    (pair,) = status(state)["destinations"]
    assert (pair["uploaded"], pair["failed"]) == (2, 0)
