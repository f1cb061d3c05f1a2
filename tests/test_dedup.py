"""Server-side copies of content the bucket already holds (pipeline/dedup.py): what reaches the
bucket, and what crosses the wire (counted at a real proxy in front of a real server)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import xxhash

from asyncsync.config import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, GiB, MiB
from asyncsync.errors import BadDigest
from asyncsync.pipeline import plan
from asyncsync.pipeline.events import FileOutcome, Status
from asyncsync.pipeline.manifest import MANIFEST_FILE, Manifest, ObjectRecord, Scope
from asyncsync.report import Reporter
from asyncsync.service.metrics import Metrics
from asyncsync.stores.integrity import copy_proven_by_etag

from .conftest import S3Server, open_uploads, read_object, run_cli
from .faultproxy import FaultProxy

SCOPE = Scope("http://127.0.0.1:9000", "bucket")


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def run_directory(root: Path, *, checkpoint: int = 12 * MiB) -> dict[str, bytes]:
    """A training's layout: best.pt a byte copy of last.pt, as Ultralytics writes them."""
    weights = os.urandom(checkpoint)
    files = {
        "weights/last.pt": weights,
        "weights/best.pt": weights,
        "results.csv": b"epoch,loss\n0,1.5\n1,1.2\n" + os.urandom(64).hex().encode(),
        "args.yaml": b"epochs: 2\nimgsz: 64\n" + os.urandom(32).hex().encode(),
        "confusion_matrix.png": os.urandom(300_000),
    }
    for name, data in files.items():
        write(root / name, data)
    return files


def push(server: S3Server, src: Path, dest: str, state: Path, *extra: str,
         endpoint: str | None = None) -> Any:
    result = run_cli("push", src, dest, "--state-dir", state, "--json",
                     "--multipart-threshold", "8MiB", *extra,
                     env=server.env(AWS_ENDPOINT_URL=endpoint or server.endpoint))
    assert result.returncode == 0, result.stderr
    return result


def by_path(result: Any) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in result.records if r["type"] == "file"}


# -- a copied run directory ----------------------------------------------------------------


@pytest.mark.s3
def test_a_copied_run_directory_is_copied_server_side_and_sends_no_body(
    s3_server: S3Server, bucket: str, tmp_path: Path,
) -> None:
    """push of a tree, then of a copy of one run under another name: every file of the copy
    is `copied`, no body byte crosses the proxy for them, and each object holds its file's
    bytes with its own metadata."""
    src, state = tmp_path / "runs", tmp_path / "state"
    files = run_directory(src / "train")
    # The manifest's scope is the endpoint: both pushes go through the proxy.
    with FaultProxy(s3_server.endpoint) as proxy:
        first = push(s3_server, src, f"s3://{bucket}/r", state, endpoint=proxy.endpoint)
        assert {r["status"] for r in by_path(first).values()} <= {"uploaded", "copied"}
        shutil.copytree(src / "train", src / "train-keep")
        proxy.reset_stats()
        second = push(s3_server, src, f"s3://{bucket}/r", state, endpoint=proxy.endpoint)
        stats = proxy.stats
        third = push(s3_server, src, f"s3://{bucket}/r", state, endpoint=proxy.endpoint)
    records = by_path(second)
    copies = {name: records[f"train-keep/{name}"] for name in files}
    assert {name: r["status"] for name, r in copies.items()} == dict.fromkeys(files, "copied")
    assert all(r["bytes"] == 0 and r["copied_from"].startswith("r/train/")
               for r in copies.values())
    assert second.summary["copied"] == len(files)
    assert second.summary["uploaded"] == len(files)  # a copy is an upload to every counter
    assert stats.body_bytes_upstream == 0
    assert not stats.requests_to("PUT", "partNumber")  # no part, no PUT body
    client = s3_server.client()
    for name, data in files.items():
        key = f"r/train-keep/{name}"
        assert read_object(client, bucket, key) == data
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["Metadata"]["xxh128"] == xxhash.xxh3_128_hexdigest(data)
        assert head["Metadata"]["asyncsync-size"] == str(len(data))
    # A re-run: everything unchanged, nothing copied again.
    assert third.summary["uploaded"] == 0 and third.summary["copied"] == 0


@pytest.mark.s3
@pytest.mark.servers("moto")  # SeaweedFS guesses a Content-Type from the key itself
def test_a_copy_carries_the_new_objects_own_metadata(
    s3_server: S3Server, bucket: str, tmp_path: Path,
) -> None:
    src, state = tmp_path / "src", tmp_path / "state"
    data = write(src / "a/table.txt", b"x,y\n" * 400)
    push(s3_server, src, f"s3://{bucket}/p", state)
    write(src / "b/table.csv", data)
    result = push(s3_server, src, f"s3://{bucket}/p", state)
    assert by_path(result)["b/table.csv"]["status"] == "copied"
    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key="p/b/table.csv")
    assert head["ContentType"] == "text/csv"
    assert client.head_object(Bucket=bucket, Key="p/a/table.txt")["ContentType"] == "text/plain"
    assert read_object(client, bucket, "p/b/table.csv") == data


# -- when there is nothing safe to copy from ----------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("behind_our_back", ["deleted", "overwritten"])
def test_a_source_gone_behind_the_manifests_back_means_a_normal_upload(
    s3_server: S3Server, bucket: str, tmp_path: Path, behind_our_back: str,
) -> None:
    """The manifest still has the row, the bucket no longer has that object: HEAD says so,
    the file is sent in full, and nothing fails."""
    src, state = tmp_path / "src", tmp_path / "state"
    data = write(src / "a/w.pt", os.urandom(3 * MiB))
    client = s3_server.client()
    with FaultProxy(s3_server.endpoint) as proxy:
        push(s3_server, src, f"s3://{bucket}/p", state, endpoint=proxy.endpoint)
        if behind_our_back == "deleted":
            client.delete_object(Bucket=bucket, Key="p/a/w.pt")
        else:  # same size, same metadata claim, other bytes: only the ETag tells
            client.put_object(Bucket=bucket, Key="p/a/w.pt", Body=os.urandom(3 * MiB),
                              Metadata={"xxh128": xxhash.xxh3_128_hexdigest(data),
                                        "asyncsync-size": str(len(data))})
        write(src / "b/w.pt", data)
        proxy.reset_stats()
        result = push(s3_server, src, f"s3://{bucket}/p", state, endpoint=proxy.endpoint)
        stats = proxy.stats
    assert by_path(result)["b/w.pt"]["status"] == "uploaded"
    assert result.summary["copied"] == 0 and result.summary["failed"] == 0
    assert stats.body_bytes_upstream >= len(data)
    assert not [r for r in stats.seen if "x-amz-copy-source" in r.headers]
    assert read_object(client, bucket, "p/b/w.pt") == data


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_no_dedup_sends_every_byte_and_asks_nothing_more(
    s3_server: S3Server, bucket: str, tmp_path: Path,
) -> None:
    src, state = tmp_path / "src", tmp_path / "state"
    files = run_directory(src / "train")
    with FaultProxy(s3_server.endpoint) as proxy:
        push(s3_server, src, f"s3://{bucket}/p", state, "--no-dedup", endpoint=proxy.endpoint)
        shutil.copytree(src / "train", src / "again")
        proxy.reset_stats()
        result = push(s3_server, src, f"s3://{bucket}/p", state, "--no-dedup",
                      endpoint=proxy.endpoint)
        stats = proxy.stats
    assert result.files("uploaded") == sorted(f"again/{name}" for name in files)
    assert stats.body_bytes_upstream >= sum(len(data) for data in files.values())
    assert [r.target for r in stats.requests_to("HEAD")] == [f"/{bucket}"]  # HeadBucket only
    assert not [r for r in stats.seen if "x-amz-copy-source" in r.headers]


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")
def test_objects_adopted_by_reconcile_are_never_copied_from(
    s3_server: S3Server, bucket: str, tmp_path: Path,
) -> None:
    """A manifest rebuilt with --reconcile knows those objects from their metadata alone:
    it sends a duplicate in full rather than trust bytes it never saw."""
    src = tmp_path / "src"
    data = write(src / "a/w.pt", os.urandom(2 * MiB))
    push(s3_server, src, f"s3://{bucket}/p", tmp_path / "lost-state")
    state = tmp_path / "rebuilt"
    adopted = push(s3_server, src, f"s3://{bucket}/p", state, "--reconcile")
    assert adopted.summary["uploaded"] == 0
    write(src / "b/w.pt", data)
    result = push(s3_server, src, f"s3://{bucket}/p", state)
    assert by_path(result)["b/w.pt"]["status"] == "uploaded"
    assert read_object(s3_server.client(), bucket, "p/b/w.pt") == data


# -- UploadPartCopy beyond CopyObject's 5 GiB ----------------------------------------------


@pytest.mark.s3
@pytest.mark.servers("seaweedfs", "moto")
def test_a_copy_larger_than_copy_objects_limit_goes_part_by_part(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    cli_main: Any,
) -> None:
    """The UploadPartCopy path for real, with CopyObject's limit lowered to 6 MiB (a 6 GiB
    file would cost the shared test machine 12 GiB of disk): a 17 MiB duplicate goes up as
    four copied parts, byte-identical, with no upload left open."""
    monkeypatch.setattr(plan, "MAX_COPY_OBJECT_SIZE", 6 * MiB)
    monkeypatch.setattr(plan, "COPY_PART_SIZE", MIN_PART_SIZE)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    src, state = tmp_path / "src", tmp_path / "state"
    data = write(src / "a/last.pt", os.urandom(17 * MiB))
    code, _, err = cli_main("push", src, f"s3://{bucket}/p", "--state-dir", state,
                            "--multipart-threshold", "8MiB")
    assert code == 0, err
    write(src / "a/best.pt", data)
    code, out, err = cli_main("push", src, f"s3://{bucket}/p", "--state-dir", state, "--json",
                              "--multipart-threshold", "8MiB")
    assert code == 0, err
    record = next(json.loads(line) for line in out.splitlines() if '"a/best.pt"' in line)
    assert record["status"] == "copied" and record["parts"] == 4 and record["bytes"] == 0
    client = s3_server.client()
    assert read_object(client, bucket, "p/a/best.pt") == data
    head = client.head_object(Bucket=bucket, Key="p/a/best.pt")
    assert head["Metadata"]["xxh128"] == xxhash.xxh3_128_hexdigest(data)
    assert open_uploads(client, bucket) == []
    with sqlite3.connect(state / MANIFEST_FILE) as db:
        assert db.execute("SELECT count(*) FROM uploads").fetchone() == (0,)


def test_copy_ranges_plan_a_6_gib_copy_within_s3s_part_limits() -> None:
    size = 6 * GiB
    assert plan.uses_part_copy(size) and not plan.uses_part_copy(5 * GiB)
    ranges = plan.copy_ranges(size)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert len(ranges) == 12 and {end - start for start, end in ranges} == {512 * MiB}
    for huge in (5 * 1024 * GiB, 5 * 1024 * GiB - 1, 6 * GiB + 1):
        ranges = plan.copy_ranges(huge)
        sizes = [end - start for start, end in ranges]
        assert len(ranges) <= MAX_PARTS and sum(sizes) == huge
        assert all(MIN_PART_SIZE <= s <= MAX_PART_SIZE for s in sizes[:-1])
        assert 0 < sizes[-1] <= MAX_PART_SIZE


# -- file:// ---------------------------------------------------------------------------------


@pytest.mark.parametrize("part_copy", [False, True], ids=["copy", "part-copy"])
def test_the_file_store_copies_files_on_its_side(
    tmp_path: Path, cli_main: Any, monkeypatch: pytest.MonkeyPatch, part_copy: bool,
) -> None:
    """file://: a copy is a file copy (a reflink where the filesystem shares extents), with
    the new object's own sidecar, and its bytes are the file's."""
    if part_copy:
        monkeypatch.setattr(plan, "MAX_COPY_OBJECT_SIZE", 6 * MiB)
        monkeypatch.setattr(plan, "COPY_PART_SIZE", MIN_PART_SIZE)
    src, dest, state = tmp_path / "src", tmp_path / "dest", tmp_path / "state"
    dest.mkdir()
    files = run_directory(src / "train")
    args = ("--state-dir", state, "--json", "--multipart-threshold", "8MiB")
    code, _, err = cli_main("push", src, f"file://{dest}", *args)
    assert code == 0, err
    shutil.copytree(src / "train", src / "copy")
    code, out, err = cli_main("push", src, f"file://{dest}", *args)
    assert code == 0, err
    records = {r["path"]: r for r in map(json.loads, out.splitlines()) if r["type"] == "file"}
    assert {records[f"copy/{name}"]["status"] for name in files} == {"copied"}
    for name, data in files.items():
        assert (dest / "copy" / name).read_bytes() == data
        sidecar = json.loads((dest / ".asyncsync-store/meta/copy" / f"{name}.json").read_text())
        assert sidecar["attributes"]["metadata"]["xxh128"] == xxhash.xxh3_128_hexdigest(data)
    big = records["copy/weights/best.pt"]
    assert big.get("parts", 0) == (3 if part_copy else 0)
    assert not list((dest / ".asyncsync-store/uploads").glob("*"))


# -- the manifest's digest index ---------------------------------------------------------------


def record(key: str, digest: str, size: int = 10, *, adopted: bool = False,
           uploaded_at: float = 1.0) -> ObjectRecord:
    return ObjectRecord(key, f"/src/{key}", size, 1, 2, digest, '"e"', size, None, uploaded_at,
                        adopted=adopted)


def test_copy_sources_are_this_scopes_uploads_of_the_same_content(tmp_path: Path) -> None:
    m = Manifest.open(tmp_path / "state")
    try:
        m.record_object(SCOPE, record("a", "d1", uploaded_at=1.0))
        m.record_object(SCOPE, record("b", "d1", uploaded_at=2.0))
        m.record_object(SCOPE, record("c", "d1", size=11))  # another size
        m.record_object(SCOPE, record("d", "d1", adopted=True))  # known from metadata only
        m.record_object(Scope(SCOPE.store, "other"), record("e", "d1"))  # another bucket
        m.record_object(SCOPE, record("f", "d2"))
        assert [r.key for r in m.copy_sources(SCOPE, "d1", 10, besides="x")] == ["b", "a"]
        assert [r.key for r in m.copy_sources(SCOPE, "d1", 10, besides="b")] == ["a"]
        assert m.copy_sources(SCOPE, "none", 10, besides="x") == []
        assert m.lookup(SCOPE, "d") == record("d", "d1", adopted=True)
        # A refreshed row keeps what it was adopted from.
        m.record_object(SCOPE, m.lookup(SCOPE, "d") or record("?", "?"))
        assert m.copy_sources(SCOPE, "d1", 10, besides="b")[0].key == "a"
    finally:
        m.close()


def test_the_no_match_lookup_is_one_query_on_the_digest_index(tmp_path: Path) -> None:
    m = Manifest.open(tmp_path / "state")
    try:
        for i in range(200):
            m.record_object(SCOPE, record(f"k{i}", f"digest-{i}"))
        m.commit()
        statements: list[str] = []
        m._db.set_trace_callback(statements.append)
        assert m.copy_sources(SCOPE, "no-such-digest", 10, besides="k1") == []
        m._db.set_trace_callback(None)
        assert len(statements) == 1
        plan_rows = m._db.execute("EXPLAIN QUERY PLAN " + statements[0]).fetchall()
        assert any("objects_by_digest" in str(row[-1]) for row in plan_rows), plan_rows
        assert not any(str(row[-1]).startswith("SCAN") for row in plan_rows), plan_rows
    finally:
        m.close()


def test_a_schema_3_manifest_gains_the_index_and_keeps_its_rows(tmp_path: Path) -> None:
    state = tmp_path / "state"
    m = Manifest.open(state)
    m.record_object(SCOPE, record("old", "d"))
    m.close()
    with sqlite3.connect(state / MANIFEST_FILE) as db:  # back to schema 3's shape
        db.execute("DROP INDEX objects_by_digest")
        db.execute("ALTER TABLE objects DROP COLUMN adopted")
        db.execute("PRAGMA user_version = 3")
    m = Manifest.open(state)
    try:
        assert [r.key for r in m.copy_sources(SCOPE, "d", 10, besides="new")] == ["old"]
    finally:
        m.close()
    with sqlite3.connect(state / MANIFEST_FILE) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4,)


# -- the outcome's sinks, and the proof of an answer -------------------------------------------


def copied(relative: str, size: int) -> FileOutcome:
    return FileOutcome(relative, f"p/{relative}", Status.UPLOADED, "new", size,
                       copied_from="p/a/last.pt")


def test_the_reporter_says_copied_in_json_logs_and_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(json_lines=True, out=out, err=err)
    with caplog.at_level(logging.INFO, logger="asyncsync"):
        reporter.outcome(copied("a/best.pt", 6_000_000))
    line = json.loads(out.getvalue())
    assert line["status"] == "copied" and line["copied_from"] == "p/a/last.pt"
    assert line["bytes"] == 0
    assert "copied a/best.pt -> p/a/best.pt" in caplog.text
    assert reporter.summary()["copied"] == 1 and reporter.summary()["uploaded"] == 1
    human = Reporter(out=io.StringIO(), err=io.StringIO())
    human.outcome(copied("a/best.pt", 6_000_000))
    human.finish()
    assert "1 uploaded (1 copied server-side, 6.0 MB not sent)" in human.err.getvalue()  # type: ignore[attr-defined]


def test_the_metrics_count_copies_and_the_bytes_they_saved() -> None:
    m = Metrics()
    m.outcome(copied("a/best.pt", 6_000_000))
    m.outcome(FileOutcome("a/x", "p/a/x", Status.UPLOADED, "new", 5, bytes_sent=5))
    value = m.registry.get_sample_value
    assert value("asyncsync_files_copied_total") == 1
    assert value("asyncsync_bytes_copied_total") == 6_000_000
    assert value("asyncsync_files_uploaded_total", {"outcome": "new"}) == 2


def test_a_copys_etag_proves_it_only_where_both_are_md5s() -> None:
    md5 = '"0123456789abcdef0123456789abcdef"'
    assert copy_proven_by_etag(md5, md5.strip('"'), where="w", key="k")
    assert not copy_proven_by_etag('"0123456789abcdef0123456789abcdef-3"', md5, where="w",
                                   key="k")
    with pytest.raises(BadDigest):
        copy_proven_by_etag(md5, '"ffffffffffffffffffffffffffffffff"', where="w", key="k")
