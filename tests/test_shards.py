"""The completion reports of a sharded push, and `asyncsync shards DEST` that reads them.

Reports are written as push writes them, by `ShardReport` through a real store session, and
read back by `asyncsync shards` run in-process. One real server will do: the store's
behaviour is what the other tests check, not what this one is about. The pure parts (keys,
the grouping of a listing, the states) are tested without a server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from asyncsync import __version__
from asyncsync.commands.shards import (
    ShardReport,
    manifest_key,
    report_key,
    sharded_pushes,
    shards_config_from,
    state_of,
)
from asyncsync.options import from_mapping
from asyncsync.pipeline.shard import Shard
from asyncsync.stores.protocol import ObjectInfo
from asyncsync.stores.session import StoreSession, store_opener

from .conftest import S3Server, read_object, run_cli

FOLDER = "team/_asyncsync/shards"


def summary_of(uploaded: int, skipped: int = 0, failed: int = 0,
               sent: int = 0, scanned: int | None = None) -> dict[str, Any]:
    """What `Reporter.summary` returns for a shard's push."""
    return {"type": "summary", "uploaded": uploaded, "skipped": skipped, "would_upload": 0,
            "failed": failed, "ignored": 0, "bytes": sent, "retries": 0, "resumed_parts": 0,
            "seconds": 1.0,
            "scanned": uploaded + skipped + failed if scanned is None else scanned}


# -- pure logic ----------------------------------------------------------------------------


def test_report_and_manifest_keys_with_and_without_prefix() -> None:
    shard = Shard(2, 8)
    assert report_key("team/exp", shard) == "team/exp/_asyncsync/shards/8/2.json"
    assert manifest_key("team/exp", shard) == "team/exp/_asyncsync/shards/8/2.db.gz"
    assert report_key("", shard) == "_asyncsync/shards/8/2.json"
    assert manifest_key("", Shard(0, 1)) == "_asyncsync/shards/1/0.db.gz"


def test_listing_groups_by_count_newest_first_and_leaves_out_strays(
    caplog: pytest.LogCaptureFixture
) -> None:
    def info(name: str, modified: float | None) -> ObjectInfo:
        return ObjectInfo(f"{FOLDER}/{name}", 10, '"etag"', last_modified=modified)

    listed = [info("8/0.json", 100.0), info("8/7.db.gz", 150.0), info("2/1.json", 200.0),
              info("2/0.db.gz", 190.0), info("2/5.json", 300.0), info("2/notes.txt", 400.0),
              info("x/0.json", 500.0), info("0/0.json", 500.0), info("3/01.json", 500.0)]
    with caplog.at_level(logging.WARNING, "asyncsync"):
        pushes = sharded_pushes(listed, FOLDER)
    # N=2 is newer (its stray 5.json, no shard of 2, does not count), though N=8 is larger.
    assert [push.count for push in pushes] == [2, 8]
    assert pushes[0].reports == {1: f"{FOLDER}/2/1.json"}
    assert pushes[0].manifests == {0: f"{FOLDER}/2/0.db.gz"}
    assert pushes[0].newest == 200.0
    assert pushes[1].reports == {0: f"{FOLDER}/8/0.json"}
    assert pushes[1].manifests == {7: f"{FOLDER}/8/7.db.gz"}
    assert "2/5.json: no shard of 2" in caplog.text
    # Without times in the listing, the larger N comes first.
    assert [push.count for push in sharded_pushes(
        [info("2/0.json", None), info("4/0.json", None)], FOLDER)] == [4, 2]


def test_states_of_reports() -> None:
    assert state_of({"status": "running"}) == "running"
    assert state_of({"status": "done", "failed": 0, "exit_code": 0}) == "done"
    assert state_of({"status": "failed", "failed": 0, "exit_code": 1}) == "failed"
    # A report that says done but counts failures is not taken at its word.
    assert state_of({"status": "done", "failed": 2, "exit_code": 0}) == "failed"
    assert state_of({"status": "paused"}) == "unknown"
    assert state_of(None) == "unknown"


# -- against a real store ------------------------------------------------------------------


@pytest.fixture
def server_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, reached through the environment by the in-process sessions and CLI."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def shards(cli_main: Any) -> Any:
    """`asyncsync shards ARGS...` in-process: (exit code, stdout, stderr)."""
    return lambda *args: cli_main("shards", *args)


def write_reports(dest: str, count: int,
                  ends: dict[int, tuple[dict[str, Any], int] | None]) -> None:
    """Shard I of N's report as push writes it: started, and finished with ``ends[I]``
    (summary, exit code) unless that is None (still running). Shards not in ``ends`` write
    nothing."""
    config = shards_config_from(from_mapping("shards", {}), dest)

    async def push_all() -> None:
        session = StoreSession(store_opener(config.destination, config.store), 2)
        try:
            for index, end in ends.items():
                report = ShardReport(session, config.destination.prefix, Shard(index, count))
                await report.start()
                if end is not None:
                    await report.finish(*end)
        finally:
            await session.close()

    asyncio.run(push_all())


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_four_shards_done_exit_0_with_totals(server_env: S3Server, bucket: str,
                                               shards: Any) -> None:
    dest = f"s3://{bucket}/team"
    write_reports(dest, 4, {index: (summary_of(10 + index, 5, sent=1000 * (index + 1)), 0)
                            for index in range(4)})
    # The object, as a dashboard or `aws s3 cp` would read it.
    client = server_env.client()
    key = f"{FOLDER}/4/2.json"
    report = json.loads(read_object(client, bucket, key))
    assert client.head_object(Bucket=bucket, Key=key)["ContentType"] == "application/json"
    assert {name: report[name] for name in (
        "status", "shard", "shards", "by", "run_depth", "files", "uploaded", "unchanged",
        "failed", "bytes", "scanned", "exit_code", "asyncsync")} == {
        "status": "done", "shard": 2, "shards": 4, "by": "run", "run_depth": 1, "files": 17,
        "uploaded": 12, "unchanged": 5, "failed": 0, "bytes": 3000, "scanned": 17,
        "exit_code": 0, "asyncsync": __version__}
    assert report["started"] <= report["ended"] and report["seconds"] >= 0
    assert report["host"] and isinstance(report["pid"], int)

    code, out, err = shards(dest)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SHARD", "STATUS", "HOST", "STARTED", "DURATION", "FILES",
                                "SIZE", "FAILED", "RATE"]
    assert [line.split()[:2] for line in lines[1:5]] == [[f"{i}/4", "done"] for i in range(4)]
    assert lines[5].startswith("total") and " 66 " in lines[5] and "10.0 KB" in lines[5]
    assert lines[-1] == "4/4 done, 0 running, 0 missing, 0 failed"
    assert err == ""


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_running_and_missing_shards_exit_1_and_json_records(
    server_env: S3Server, bucket: str, shards: Any
) -> None:
    dest = f"s3://{bucket}/team"
    write_reports(dest, 4, {0: (summary_of(3, sent=300), 0), 1: (summary_of(2, sent=200), 0),
                            2: None})
    code, out, err = shards(dest)
    assert code == 1, err
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:5]}
    assert states == {"0/4": "done", "1/4": "done", "2/4": "running", "3/4": "missing"}
    assert out.splitlines()[-1] == "2/4 done, 1 running, 1 missing, 0 failed"

    code, out, err = shards(dest, "--json")
    assert code == 1, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["type"] for record in records] == ["shard"] * 4 + ["summary"]
    running, missing = records[2], records[3]
    assert running["status"] == "running" and running["started"] and running["host"]
    assert running["ended"] is None and running["files"] is None
    assert running["report"] == f"{FOLDER}/4/2.json" and running["manifest"] is None
    assert missing == {**missing, "status": "missing", "report": None, "host": None}
    assert records[0]["files"] == 3 and records[0]["bytes"] == 300
    summary = records[-1]
    assert {name: summary[name] for name in (
        "shards", "judged", "done", "running", "missing", "failed", "unknown", "complete")} == {
        "shards": 4, "judged": True, "done": 2, "running": 1, "missing": 1, "failed": 0,
        "unknown": 0, "complete": False}
    assert summary["totals"]["files"] == 5 and summary["totals"]["bytes"] == 500


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_failed_shard_exit_1(server_env: S3Server, bucket: str, shards: Any) -> None:
    dest = f"s3://{bucket}"  # the bucket's root: reports under _asyncsync/shards/
    write_reports(dest, 3, {0: (summary_of(4), 0), 1: (summary_of(4, failed=2), 1),
                            2: (summary_of(0), 130)})
    keys = [obj["Key"] for obj in server_env.client().list_objects_v2(
        Bucket=bucket)["Contents"]]
    assert sorted(keys) == [f"_asyncsync/shards/3/{index}.json" for index in range(3)]
    code, out, err = shards(dest, "--json")
    assert code == 1, err
    records = [json.loads(line) for line in out.splitlines()]
    # A failed file, and an interrupted shard (no file failed, a non-zero exit), are failed.
    assert [(r["status"], r["failed"], r["exit_code"]) for r in records[:3]] == [
        ("done", 0, 0), ("failed", 2, 1), ("failed", 0, 130)]
    assert records[-1]["failed"] == 2 and records[-1]["totals"]["failed"] == 2
    code, out, _ = shards(dest)
    assert code == 1 and out.splitlines()[-1] == "1/3 done, 0 running, 0 missing, 2 failed"


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_several_pushes_judged_by_the_newest(server_env: S3Server, bucket: str,
                                             shards: Any) -> None:
    dest = f"s3://{bucket}/team"
    write_reports(dest, 2, {0: (summary_of(1), 0), 1: (summary_of(1), 0)})  # all done
    write_reports(dest, 4, {0: (summary_of(1), 0)})  # the newer push, 3 shards missing
    code, out, err = shards(dest)
    assert code == 1
    assert "2 sharded pushes under" in err and "judged by the newest, N = 4" in err
    titles = [line for line in out.splitlines() if line.startswith("push --shard")]
    assert titles == ["push --shard I/4 (the newest: judged)", "push --shard I/2"]
    counts = [line for line in out.splitlines() if " done, " in line]
    assert counts == ["1/4 done, 0 running, 3 missing, 0 failed",
                      "2/2 done, 0 running, 0 missing, 0 failed"]


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_no_sharded_push_and_bad_destinations(server_env: S3Server, bucket: str,
                                              shards: Any) -> None:
    server_env.client().put_object(Bucket=bucket, Key="team/run/results.csv", Body=b"epoch\n")
    code, out, err = shards(f"s3://{bucket}/team")
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"asyncsync: error: no sharded push found under "
                                f"s3://{bucket}/team (no _asyncsync/shards/)"]
    for bad in ("team/run", "s3://Bad_Bucket/team"):
        code, out, err = shards(bad)
        assert (code, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and "destination" in err
    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    code, out, err = shards(f"s3://{missing}/team")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and missing in err


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_report_not_written_is_one_warning_never_an_error(
    server_env: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    dest = f"s3://no-such-bucket-{uuid.uuid4().hex[:12]}/team"
    with caplog.at_level(logging.WARNING, "asyncsync"):
        write_reports(dest, 2, {1: (summary_of(1), 0)})  # start and finish: neither raises
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("shard report team/_asyncsync/shards/2/1.json not written")


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_push_shards_report_themselves(server_env: S3Server, bucket: str, tmp_path: Path,
                                       shards: Any) -> None:
    source = tmp_path / "runs"
    for run in range(6):
        (source / f"train{run}").mkdir(parents=True)
        (source / f"train{run}" / "results.csv").write_text("epoch\n1\n")
    dest = f"s3://{bucket}/team"
    for index in range(2):
        pushed = run_cli("push", source, dest, "--shard", f"{index}/2",
                         "--state-dir", tmp_path / "state", env=server_env.env(), timeout=60)
        assert pushed.returncode == 0, pushed.stderr
    code, out, err = shards(dest, "--json")
    assert code == 0, err
    *records, summary = [json.loads(line) for line in out.splitlines()]
    assert [(r["shard"], r["status"]) for r in records] == [(0, "done"), (1, "done")]
    assert all(r["manifest"] for r in records)  # the checkpoint beside each report
    # Together the two shards took and uploaded every file once.
    assert summary["totals"]["files"] == summary["totals"]["scanned"] == 6
    assert summary["complete"] is True
