"""`asyncsync pull` end to end: the real CLI against real servers (and a file:// store), the
bucket filled by push or, for what push would never write, by a plain boto client; faults
are real (a proxy that counts what it relays, SIGKILL in the middle of a download)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import xxhash

from asyncsync.commands.pull import history_bases, parse_source
from asyncsync.config import Destination
from asyncsync.pipeline.place import TEMP_PREFIX, UnsafeKey
from asyncsync.pipeline.restore import (
    RANGES_SUFFIX,
    ContentSink,
    DigestMismatch,
    RangeLog,
    resume_name,
    target_for,
)
from asyncsync.stores.protocol import ObjectInfo

from .conftest import ASYNCSYNC, CliResult, S3Server, run_cli
from .faultproxy import FaultProxy

MiB = 1024 * 1024


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file beneath ``root`` (symlinks not followed), by relative path."""
    found: dict[str, bytes] = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def temp_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(f"{TEMP_PREFIX}*"))


def pull(server: S3Server, source: str, dest: Path, *extra: str, endpoint: str | None = None,
         timeout: float = 120) -> CliResult:
    env = server.env(AWS_ENDPOINT_URL=endpoint) if endpoint else server.env()
    return run_cli("pull", source, dest, "--json", *extra, env=env, timeout=timeout)


def put(client: Any, bucket: str, key: str, body: bytes, **extra: Any) -> None:
    """An object as push writes it: its digest and size in the metadata."""
    metadata = {"xxh128": xxhash.xxh3_128_hexdigest(body), "asyncsync-size": str(len(body))}
    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=metadata, **extra)


def local_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


# -- against every server of the matrix --------------------------------------------------------


@pytest.mark.s3
def test_round_trip_is_byte_identical_and_a_second_pull_transfers_nothing(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    files = {
        "exp/args.yaml": b"epochs: 2\nimgsz: 64\n",
        "exp/results.csv": b"".join(b"%d,%.5f,%.5f\n" % (i, 1 / (i + 1), i / 7)
                                    for i in range(3000)),
        "exp/empty.txt": b"",
        "exp/ünïcødé 日本/spaces and +#%&=.txt": b"odd name",
        "exp/it's (1) [a] {b} ~!@$^.txt": b"punctuation",
        "exp/weights/last.pt": os.urandom(40 * MiB + 123),
        "exp/weights/best.pt": os.urandom(3 * MiB),
    }
    for name, data in files.items():
        write(src / name, data)
    pushed = run_cli("push", src, f"s3://{bucket}/team/runs", "--state-dir", tmp_path / "state",
                     "--gzip", "-q", env=s3_server.env())
    assert pushed.returncode == 0, pushed.stderr
    client = s3_server.client()
    head = client.head_object(Bucket=bucket, Key="team/runs/exp/results.csv")
    assert head.get("ContentEncoding") == "gzip"  # restored decoded, below
    assert head["ContentLength"] < len(files["exp/results.csv"])

    dest = tmp_path / "restored"
    write(dest / "exp" / "args.yaml", b"a stale local copy")  # replaced: it differs
    with FaultProxy(s3_server.endpoint) as proxy:
        first = pull(s3_server, f"s3://{bucket}/team/runs", dest, endpoint=proxy.endpoint)
        assert first.returncode == 0, first.stderr
        assert tree(dest) == files
        assert temp_files(dest) == []
        summary = first.summary
        assert (summary["downloaded"], summary["skipped"], summary["failed"]) == (len(files), 0, 0)
        records = {r["path"]: r for r in first.records if r["type"] == "file"}
        assert records["exp/args.yaml"]["reason"] == "changed"
        assert records["exp/weights/last.pt"]["ranges"] == 6  # 8 MiB ranges
        assert records["exp/results.csv"]["bytes"] == head["ContentLength"]

        proxy.reset_stats()
        again = pull(s3_server, f"s3://{bucket}/team/runs", dest, endpoint=proxy.endpoint)
        relayed = proxy.stats.body_bytes_downstream
    assert again.returncode == 0, again.stderr
    assert again.summary["downloaded"] == 0 and again.summary["skipped"] == len(files)
    assert again.summary["bytes"] == 0
    assert relayed < 64 * 1024  # the listing and nothing else: no body came
    assert tree(dest) == files


@pytest.mark.s3
def test_sigkill_mid_download_resumes_without_fetching_finished_ranges(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    size, part = 40 * MiB + 7, 5 * MiB
    content = os.urandom(size)
    client = s3_server.client()
    put(client, bucket, "p/w/big.pt", content)
    dest = tmp_path / "dest"
    args = ["--part-size", "5MiB", "--part-concurrency", "2"]
    process = subprocess.Popen(
        [ASYNCSYNC, "pull", f"s3://{bucket}/p", str(dest), "--max-bandwidth", "10MiB/s", *args],
        env=s3_server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sidecar = dest / "w" / (resume_name("p/w/big.pt") + RANGES_SUFFIX)
    done: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and len(done) < 3:
            time.sleep(0.02)
            try:
                done = json.loads(sidecar.read_text())["done"]
            except (OSError, ValueError):
                continue
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert len(done) >= 3, "the download never got going"
    # Killed half-way: nothing under the final name, the ranges so far kept beside it.
    assert not (dest / "w" / "big.pt").exists()
    assert (dest / "w" / resume_name("p/w/big.pt")).stat().st_size == size

    with FaultProxy(s3_server.endpoint) as proxy:
        resumed = pull(s3_server, f"s3://{bucket}/p", dest, *args, endpoint=proxy.endpoint)
        relayed = proxy.stats.body_bytes_downstream
    assert resumed.returncode == 0, resumed.stderr
    record = resumed.records[0]
    assert record["status"] == "downloaded" and record["reason"] == "resumed"
    assert record["resumed_ranges"] >= len(done) and record["ranges"] == 9
    assert resumed.summary["bytes"] <= size - len(done) * part
    assert relayed <= size - len(done) * part + 64 * 1024
    assert (dest / "w" / "big.pt").read_bytes() == content
    assert temp_files(dest) == []


@pytest.mark.s3
def test_an_object_replaced_mid_download_is_never_spliced(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Ranges are pinned to the ETag: once the object is replaced, the next range is refused
    and the file starts again from the new version; what is placed is one version whole."""
    client = s3_server.client()
    old, new = os.urandom(20 * MiB), os.urandom(20 * MiB)
    put(client, bucket, "p/w.pt", old)
    dest = tmp_path / "dest"
    process = subprocess.Popen(
        [ASYNCSYNC, "pull", f"s3://{bucket}/p", str(dest), "--json", "--max-bandwidth",
         "10MiB/s", "--part-size", "5MiB", "--part-concurrency", "1", "-v"],
        env=s3_server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sidecar = dest / (resume_name("p/w.pt") + RANGES_SUFFIX)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            if json.loads(sidecar.read_text())["done"]:
                break
        except (OSError, ValueError):
            continue
    put(client, bucket, "p/w.pt", new)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert (dest / "w.pt").read_bytes() == new
    assert json.loads(out.splitlines()[0])["status"] == "downloaded"
    assert "p/w.pt: replaced while it was downloaded; starting it again" in err
    assert temp_files(dest) == []


@pytest.mark.s3
def test_a_corrupted_object_is_never_placed(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Objects overwritten behind asyncsync's back with other bytes of the same size and the
    metadata of the old ones: neither is placed, the old local file stays as it was."""
    client = s3_server.client()
    small, large = os.urandom(MiB), os.urandom(20 * MiB)
    put(client, bucket, "p/w.bin", small)
    put(client, bucket, "p/big.bin", large)
    for key, body in (("p/w.bin", small), ("p/big.bin", large)):
        metadata = client.head_object(Bucket=bucket, Key=key)["Metadata"]
        client.put_object(Bucket=bucket, Key=key, Body=bytes(reversed(body)), Metadata=metadata)
    dest = tmp_path / "dest"
    old = write(dest / "w.bin", b"an older local copy")
    result = pull(s3_server, f"s3://{bucket}/p", dest)
    assert result.returncode == 1, result.stderr
    assert result.files("failed") == ["big.bin", "w.bin"]
    errors = {r["path"]: r["error"] for r in result.records if r["type"] == "file"}
    assert all("xxh128" in error and "not placed" in error for error in errors.values())
    assert (dest / "w.bin").read_bytes() == old
    assert not (dest / "big.bin").exists()
    assert temp_files(dest) == []  # a damaged ranged download is not kept for resuming
    assert "asyncsync: error: p/big.bin: " in result.stderr


@pytest.mark.s3
def test_include_exclude_and_dry_run(s3_server: S3Server, bucket: str, tmp_path: Path) -> None:
    client = s3_server.client()
    files = {"exp/results.csv": b"epoch\n1\n", "exp/weights/best.pt": b"best",
             "exp/weights/last.pt": b"last", "exp/plot.png": b"png", "other/results.csv": b"x"}
    for name, body in files.items():
        put(client, bucket, f"p/{name}", body)
    dest = tmp_path / "dest"
    dry = pull(s3_server, f"s3://{bucket}/p", dest, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.files("would-download") == sorted(files)
    assert dry.summary["would_download"] == len(files) and dry.summary["bytes"] == 0
    assert not dest.exists()  # nothing written, not even DEST
    text = run_cli("pull", f"s3://{bucket}/p", dest, "--dry-run", env=s3_server.env())
    assert "would download exp/plot.png (new, 3 B)" in text.stdout.splitlines()

    some = pull(s3_server, f"s3://{bucket}/p", dest, "--include", "*.csv",
                "--include", "*/weights/*", "--exclude", "best*", "--exclude", "other/*")
    assert some.returncode == 0, some.stderr
    assert tree(dest) == {name: files[name] for name in
                          ("exp/results.csv", "exp/weights/last.pt")}


@pytest.mark.s3
def test_asyncsync_records_stay_behind_unless_history_is_asked_for(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    stamp = "20240101T000000Z"
    objects = {
        "p/exp/results.csv": b"epoch\n1\n2\n3\n",
        "p/exp/weights/last.pt": b"weights",
        "p/_asyncsync/run.json": b"{}",
        "p/exp/_asyncsync/run.json": b"{}",
        f"p/_asyncsync/history/exp/results.csv/{stamp}": b"epoch\n1\n2\n3\n4\n5\n",
        f"p/_asyncsync/history/exp/weights/last.pt/{stamp}": b"old weights",
    }
    for key, body in objects.items():
        put(client, bucket, key, body)
    plain = pull(s3_server, f"s3://{bucket}/p", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    assert sorted(tree(tmp_path / "plain")) == ["exp/results.csv", "exp/weights/last.pt"]

    history = f"_asyncsync/history/exp/results.csv/{stamp}"
    full = pull(s3_server, f"s3://{bucket}/p", tmp_path / "full", "--with-history",
                "--include", "*.csv")
    assert full.returncode == 0, full.stderr
    assert tree(tmp_path / "full") == {
        "exp/results.csv": objects["p/exp/results.csv"],
        history: objects[f"p/{history}"],
    }
    # One run of the prefix: its files' history copies kept under the prefix come along.
    run = pull(s3_server, f"s3://{bucket}/p/exp", tmp_path / "run", "--with-history")
    assert run.returncode == 0, run.stderr
    assert tree(tmp_path / "run") == {
        "results.csv": objects["p/exp/results.csv"],
        "weights/last.pt": b"weights",
        f"_asyncsync/history/results.csv/{stamp}": objects[f"p/{history}"],
        f"_asyncsync/history/weights/last.pt/{stamp}": b"old weights",
    }


@pytest.mark.s3
def test_a_missing_bucket_exits_2_with_one_line(s3_server: S3Server, tmp_path: Path) -> None:
    done = pull(s3_server, "s3://asyncsync-no-such-bucket-7f3a/p", tmp_path / "dest")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "asyncsync: error: bucket s3://asyncsync-no-such-bucket-7f3a does not exist"]
    assert not (tmp_path / "dest").exists()


@pytest.mark.s3
@pytest.mark.servers("moto")  # SeaweedFS refuses such keys; s3rver stores them as paths
def test_hostile_keys_never_write_outside_dest(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    outside = tmp_path / "outside"
    write(outside / "target.txt", b"not yours")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "link")  # planted: a directory on the way out
    os.symlink(outside / "target.txt", dest / "victim")  # planted: the final name itself
    hostile = ["p/a/../../x", "p//abs", "p/a//../x", "p/..", "p/a\\..\\x", "p/link/evil",
               "p/link/deeper/evil", "p/./dot", f"p/{TEMP_PREFIX}x"]
    for key in hostile:
        client.put_object(Bucket=bucket, Key=key, Body=b"evil")
    honest = {"ok.txt": b"fine", "sub/deeper/ok.bin": b"also fine", "victim": b"replaced"}
    for name, body in honest.items():
        put(client, bucket, f"p/{name}", body)
    from .conftest import bucket_keys

    assert set(hostile) <= set(bucket_keys(client, bucket))  # the store kept them as written

    result = pull(s3_server, f"s3://{bucket}/p", dest)
    assert result.returncode == 1, result.stderr
    failed = {r["key"]: r for r in result.records if r["type"] == "file" and
              r["status"] == "failed"}
    assert sorted(failed) == sorted(hostile)
    assert all(r["error"].startswith("refused: ") for r in failed.values())
    assert result.summary["failed"] == len(hostile)
    assert result.summary["downloaded"] == len(honest)
    for key in hostile:  # each named on stderr by its key
        assert f"asyncsync: error: {key}: refused: " in result.stderr
    assert tree(dest) == honest  # the planted link replaced by the file, never written through
    assert (dest / "link").is_symlink()
    assert tree(outside) == {"target.txt": b"not yours"}
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]


# -- a file:// store, and the pieces, without a server -----------------------------------------


def test_pull_from_a_file_store_decodes_gzip_and_resumes_nothing_twice(tmp_path: Path) -> None:
    """file:// works through the same Protocol; a path below the store's root is a prefix of
    that store, so the objects' metadata (digests, gzip encoding) is found."""
    src = tmp_path / "runs"
    files = {"exp/results.csv": b"".join(b"%d,%d\n" % (i, i * i) for i in range(2000)),
             "exp/weights/last.pt": os.urandom(17 * MiB), "exp/empty": b""}
    for name, data in files.items():
        write(src / name, data)
    store = tmp_path / "store"
    store.mkdir()
    pushed = run_cli("push", src, f"file://{store}", "--state-dir", tmp_path / "state",
                     "--gzip", "-q", env=local_env())
    assert pushed.returncode == 0, pushed.stderr
    assert gzip.decompress((store / "exp" / "results.csv").read_bytes()) == files[
        "exp/results.csv"]
    dest = tmp_path / "dest"
    first = run_cli("pull", f"file://{store}/exp", dest, "--json", env=local_env())
    assert first.returncode == 0, first.stderr
    assert tree(dest) == {name.removeprefix("exp/"): data for name, data in files.items()}
    assert first.summary["downloaded"] == 3
    again = run_cli("pull", f"file://{store}/exp", dest, "--json", env=local_env())
    assert again.summary["skipped"] == 3 and again.summary["bytes"] == 0
    inside = run_cli("pull", f"file://{store}", store / "exp", env=local_env())
    assert inside.returncode == 2 and "overlaps" in inside.stderr


def test_progress_line_on_a_terminal_only(tmp_path: Path) -> None:
    import pty

    store = tmp_path / "store"
    for i in range(5):
        write(store / "exp" / f"p{i}.png", os.urandom(5000))
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([ASYNCSYNC, "pull", f"file://{store}", str(tmp_path / "d")],
                              env=local_env(), stderr=follower, stdout=subprocess.DEVNULL,
                              timeout=60)
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    terminal = b"".join(chunks).decode()
    assert done.returncode == 0
    assert "\r" in terminal and "files" in terminal and "received" in terminal
    assert "5 downloaded" in terminal
    plain = run_cli("pull", f"file://{store}", tmp_path / "d2", env=local_env())
    assert plain.returncode == 0 and "\r" not in plain.stderr
    assert plain.stderr.startswith("asyncsync: pull file://") and "5 downloaded" in plain.stderr


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    env = {**local_env(), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    scheme = run_cli("pull", "http://example.com/p", tmp_path / "d", env=env, timeout=60)
    assert scheme.returncode == 2
    assert scheme.stderr.splitlines() == [
        "asyncsync: error: source 'http://example.com/p': expected s3://BUCKET[/PREFIX]"
        " (or file:///PATH)"]
    bad = run_cli("pull", "s3://Bad_Bucket/p", tmp_path / "d", env=env, timeout=60)
    assert bad.returncode == 2 and "invalid bucket name" in bad.stderr
    write(tmp_path / "file", b"")
    not_dir = run_cli("pull", "s3://bucket/p", tmp_path / "file", env=env, timeout=60)
    assert not_dir.returncode == 2 and "is not a directory" in not_dir.stderr


@pytest.mark.parametrize("relative", [
    "../x", "a/../../x", "/abs", "a//x", "a/./x", ".", "..", "a\\..\\x", "a\x00b",
    f"a/{TEMP_PREFIX}1", "a/", "x/../",
])
def test_keys_that_could_land_outside_are_refused(relative: str) -> None:
    size = 0 if relative in ("x/../",) else 1
    with pytest.raises(UnsafeKey):
        target_for(relative, size, with_history=True)


def test_targets_of_keys() -> None:
    plain = target_for("exp/w/last.pt", 5, with_history=False)
    assert plain is not None and plain.segments == ("exp", "w", "last.pt")
    assert target_for("", 0, with_history=False) is None  # the prefix's own marker
    assert target_for("exp/", 0, with_history=False) is None  # a folder marker
    assert target_for("_asyncsync/run.json", 2, with_history=True) is None
    assert target_for("exp/_asyncsync/run.json", 2, with_history=True) is None
    copy = "exp/_asyncsync/history/results.csv/20240101T000000Z"
    assert target_for(copy, 2, with_history=False) is None
    found = target_for(copy, 2, with_history=True)
    assert found is not None and found.relative == copy
    assert found.filtered_as == "exp/results.csv"  # --include '*.csv' keeps its history
    assert target_for("_asyncsync/history/stamp-only", 2, with_history=True) is None
    with pytest.raises(UnsafeKey):
        target_for("a\\b", 1, with_history=False)


def test_history_bases_of_a_run_prefix() -> None:
    assert history_bases("") == []
    assert history_bases("team/runs/exp") == [
        ("_asyncsync/history/team/runs/exp/", "_asyncsync/history/"),
        ("team/_asyncsync/history/runs/exp/", "_asyncsync/history/"),
        ("team/runs/_asyncsync/history/exp/", "_asyncsync/history/"),
    ]


def test_a_file_source_below_a_store_root_is_a_prefix_of_it(tmp_path: Path) -> None:
    (tmp_path / "store" / ".asyncsync-store").mkdir(parents=True)
    assert parse_source(f"file://{tmp_path}/store/a/b") == Destination(
        "file", str(tmp_path / "store"), "a/b")
    assert parse_source(f"file://{tmp_path}/store") == Destination(
        "file", str(tmp_path / "store"), "")
    assert parse_source(f"file://{tmp_path}/plain/dir") == Destination(
        "file", str(tmp_path / "plain" / "dir"), "")


def test_the_range_log_trusts_only_what_it_can_read(tmp_path: Path) -> None:
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        log = RangeLog("k", '"e"', 12 * MiB, 5 * MiB, {0, 2})
        assert log.count == 3 and log.bounds(2) == (10 * MiB, 12 * MiB)
        log.write(directory, "r")
        assert RangeLog.read(directory, "r") == log
        record = json.loads((tmp_path / "r").read_text())
        for damage in ({"done": [3]}, {"range_size": 1}, {"format": "other"}, {"size": "12"}):
            (tmp_path / "r").write_text(json.dumps({**record, **damage}))
            assert RangeLog.read(directory, "r") is None, damage
        (tmp_path / "r").write_text("{not json")
        assert RangeLog.read(directory, "r") is None
        assert RangeLog.read(directory, "missing") is None
    finally:
        os.close(directory)


def test_the_content_sink_decodes_in_pieces_and_refuses_a_body_larger_than_declared(
    tmp_path: Path,
) -> None:
    data = os.urandom(512).hex().encode() * 2000  # 2 MB that compress 2000-fold
    body = gzip.compress(data)
    info = ObjectInfo("k", len(body), '"e"', {"asyncsync-size": str(len(data))}, "gzip")
    with open(tmp_path / "out", "wb") as out:
        sink = ContentSink(out.fileno(), info)
        for at in range(0, len(body), 1000):
            sink.write(body[at:at + 1000])
        assert sink.finish() == (len(data), xxhash.xxh3_128_hexdigest(data))
    assert (tmp_path / "out").read_bytes() == data
    small = ObjectInfo("k", len(body), '"e"', {"asyncsync-size": "100"}, "gzip")
    with open(tmp_path / "out2", "wb") as out, pytest.raises(DigestMismatch):
        ContentSink(out.fileno(), small).write(body)
    assert (tmp_path / "out2").stat().st_size <= 100
    with open(tmp_path / "out3", "wb") as out, pytest.raises(zlib.error):
        cut = ContentSink(out.fileno(), info)
        cut.write(body[: len(body) // 2])
        cut.finish()
