"""`asyncsync pull` end to end: the real CLI against real servers (and a file:// store), the
bucket filled by push or, for what push would never write, by a plain boto client; faults
are real (a proxy that counts what it relays, SIGKILL in the middle of a download)."""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import json
import os
import re
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
from asyncsync.pipeline.budget import ByteBudget
from asyncsync.pipeline.place import TEMP_PREFIX, UnsafeKey, temp_name
from asyncsync.pipeline.restore import (
    RANGES_SUFFIX,
    ContentSink,
    DigestMismatch,
    RangeLog,
    Restorer,
    Status,
    Wanted,
    resume_name,
    target_for,
)
from asyncsync.stores.local import open_file_store
from asyncsync.stores.protocol import ObjectInfo

from .conftest import ASYNCSYNC, CliResult, S3Server, new_bucket, run_cli
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


def ranges_done(sidecar: Path) -> list[int]:
    """The ranges a ranged download's sidecar lists as on disk ([] before it is readable)."""
    try:
        return list(json.loads(sidecar.read_text())["done"])
    except (OSError, ValueError, KeyError):
        return []


def start_pull(server: S3Server, source: str, dest: Path, *extra: str,
               endpoint: str | None = None) -> subprocess.Popen[str]:
    env = server.env(AWS_ENDPOINT_URL=endpoint) if endpoint else server.env()
    return subprocess.Popen([ASYNCSYNC, "pull", source, str(dest), "--json", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_once_ranges_land(process: subprocess.Popen[str], sidecar: Path, more_than: int,
                               signum: int = signal.SIGINT, timeout: float = 60) -> int:
    """Send ``signum`` as soon as the sidecar lists more than ``more_than`` ranges (the other
    ranges of the window are landing then too); return the exit code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if len(ranges_done(sidecar)) > more_than:
            break
        time.sleep(0.0005)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err
    return process.returncode


class PeakBudget(ByteBudget):
    """A byte budget that remembers the most it ever had handed out at once."""

    peak = 0

    async def acquire(self, nbytes: int) -> int:
        grant = await super().acquire(nbytes)
        self.peak = max(self.peak, self.in_use)
        return grant

    def _wake(self) -> None:
        super()._wake()  # grants to waiters are handed out here
        self.peak = max(self.peak, self.in_use)


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
    if s3_server.counts_parts_in_etag:  # the 40 MB file went up in parts
        etag = client.head_object(Bucket=bucket, Key="team/runs/exp/weights/last.pt")["ETag"]
        parts = re.fullmatch(r'"[0-9a-f]{32}-(\d+)"', etag)
        assert parts is not None and int(parts[1]) >= 2, etag

    dest = tmp_path / "restored"
    assert not dest.exists()  # pull makes it
    with FaultProxy(s3_server.endpoint) as proxy:
        first = pull(s3_server, f"s3://{bucket}/team/runs", dest, endpoint=proxy.endpoint)
        assert first.returncode == 0, first.stderr
        assert tree(dest) == files
        assert temp_files(dest) == []
        summary = first.summary
        assert (summary["downloaded"], summary["skipped"], summary["failed"]) == (len(files), 0, 0)
        records = {r["path"]: r for r in first.records if r["type"] == "file"}
        assert {r["reason"] for r in records.values()} == {"new"}
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

    # A local copy that differs is replaced; the rest is left alone.
    write(dest / "exp" / "args.yaml", b"a stale local copy")
    stale = pull(s3_server, f"s3://{bucket}/team/runs", dest)
    assert stale.returncode == 0, stale.stderr
    assert [(r["path"], r["reason"]) for r in stale.records if r["type"] == "file"
            and r["status"] == "downloaded"] == [("exp/args.yaml", "changed")]
    assert stale.summary["skipped"] == len(files) - 1
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
    hostile = ["p/a/../../x", "p//abs/x", "p/a//../x", "p/..", "p/a\\..\\x", "p/link/evil",
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


@pytest.mark.s3
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_pull_exits_128_plus_the_signal_keeping_only_what_resumes(
    s3_server: S3Server, bucket: str, tmp_path: Path, signum: int, code: int
) -> None:
    size = 40 * MiB + 7
    content = os.urandom(size)
    put(s3_server.client(), bucket, "p/w/big.pt", content)
    dest = tmp_path / "dest"
    args = ["--part-size", "5MiB", "--part-concurrency", "2"]
    resume = f"w/{resume_name('p/w/big.pt')}"
    process = start_pull(s3_server, f"s3://{bucket}/p", dest, "--max-bandwidth", "10MiB/s",
                         *args)
    assert interrupt_once_ranges_land(process, dest / (resume + RANGES_SUFFIX), 0,
                                      signum) == code
    assert not (dest / "w" / "big.pt").exists()  # no partial file under the final name
    assert temp_files(dest) == [resume, resume + RANGES_SUFFIX]
    kept = ranges_done(dest / (resume + RANGES_SUFFIX))
    assert 1 <= len(kept) < 9

    again = pull(s3_server, f"s3://{bucket}/p", dest, *args)
    assert again.returncode == 0, again.stderr
    record = again.records[0]
    assert record["reason"] == "resumed" and record["resumed_ranges"] == len(kept)
    assert (dest / "w" / "big.pt").read_bytes() == content
    assert temp_files(dest) == []


@pytest.mark.s3
def test_repeated_sigint_during_a_ranged_pull_leaves_no_stray_temp_file(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Each SIGINT lands while ranges of the window are landing, their sidecar writes in
    worker threads: the cancelled download waits for them before it closes its descriptors,
    so nothing is left half-written beside the resumable file, run after run."""
    size = 100 * MiB + 3
    content = os.urandom(size)
    put(s3_server.client(), bucket, "p/exp/big.pt", content)
    dest = tmp_path / "dest"
    args = ["--part-size", "5MiB", "--part-concurrency", "8"]
    resume = f"exp/{resume_name('p/exp/big.pt')}"
    sidecar = dest / (resume + RANGES_SUFFIX)
    with FaultProxy(s3_server.endpoint) as proxy:
        interrupted = 0
        for _ in range(4):
            before = len(ranges_done(sidecar))
            process = start_pull(s3_server, f"s3://{bucket}/p", dest, "--max-bandwidth",
                                 "40MiB/s", *args, endpoint=proxy.endpoint)
            code = interrupt_once_ranges_land(process, sidecar, before)
            if code == 0:
                break  # it finished first
            assert code == 130
            interrupted += 1
            assert temp_files(dest) == [resume, resume + RANGES_SUFFIX]
            assert not (dest / "exp" / "big.pt").exists()
        assert interrupted >= 2
        done = pull(s3_server, f"s3://{bucket}/p", dest, *args, endpoint=proxy.endpoint)
    assert done.returncode == 0, done.stderr
    assert temp_files(dest) == []
    assert (dest / "exp" / "big.pt").read_bytes() == content


@pytest.mark.s3
def test_several_ranges_of_one_object_are_in_flight_at_once(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    content = os.urandom(40 * MiB)
    put(s3_server.client(), bucket, "p/big.pt", content)
    dest = tmp_path / "dest"
    with FaultProxy(s3_server.endpoint) as proxy:
        # Each range's GET is held a while at the proxy, so whatever the client keeps in
        # flight at once shows in the proxy's peak.
        proxy.inject("delay", 100, method="GET", path_contains="/p/big.pt", delay=0.3)
        done = pull(s3_server, f"s3://{bucket}/p", dest, "--workers", "1", "--part-size",
                    "5MiB", "--part-concurrency", "4", endpoint=proxy.endpoint)
        stats = proxy.stats
    assert done.returncode == 0, done.stderr
    assert done.records[0]["ranges"] == 8
    assert stats.faults_by_action["delay"] == 8  # one GET per range, no other
    assert 2 <= stats.peak_in_flight <= 4
    assert (dest / "big.pt").read_bytes() == content


@pytest.mark.s3
def test_workers_bounds_the_objects_fetched_at_once(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    client = s3_server.client()
    files = {f"exp/f{i:02d}.bin": os.urandom(1000 + i) for i in range(20)}
    for name, body in files.items():
        put(client, bucket, f"p/{name}", body)
    dest = tmp_path / "dest"  # empty: no HEAD of a local copy besides the GETs
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.inject("delay", 100, method="GET", path_contains="/p/", delay=0.2)
        done = pull(s3_server, f"s3://{bucket}/p", dest, "--workers", "3",
                    endpoint=proxy.endpoint)
        stats = proxy.stats
    assert done.returncode == 0, done.stderr
    assert stats.faults_by_action["delay"] == len(files)
    assert 2 <= stats.peak_in_flight <= 3
    assert tree(dest) == files


@pytest.mark.s3
@pytest.mark.servers("moto")  # SeaweedFS folds "//" and drops a leading "/" of a key
def test_a_leading_slash_key_at_the_bucket_root_never_writes_outside_dest(
    s3_server: S3Server, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    with new_bucket(s3_server) as bucket:
        client = s3_server.client()
        hostile = ["/abs/x", "p//abs/x", "//x"]
        for key in hostile:
            client.put_object(Bucket=bucket, Key=key, Body=b"evil")
        put(client, bucket, "p/ok.txt", b"fine")
        from .conftest import bucket_keys

        assert set(hostile) <= set(bucket_keys(client, bucket))
        result = pull(s3_server, f"s3://{bucket}", dest)
    assert result.returncode == 1, result.stderr
    failed = sorted(r["key"] for r in result.records if r["type"] == "file"
                    and r["status"] == "failed")
    assert failed == sorted(hostile)
    for key in hostile:
        assert f"asyncsync: error: {key}: refused: " in result.stderr
    assert tree(dest) == {"p/ok.txt": b"fine"}
    assert sorted(os.listdir(tmp_path)) == ["dest"]
    assert not Path("/abs/x").exists() and not Path("/x").exists()


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


def test_a_pull_removes_the_temp_files_a_killed_run_left_where_it_writes(tmp_path: Path) -> None:
    """A writer killed between creating a temp file and renaming it leaves the file behind;
    the next pull removes such files in the directories it writes to. Ranged downloads kept
    to resume, a temp file a live writer holds, and directories it does not write to stay."""
    store = tmp_path / "store"
    files = {"exp/results.csv": b"epoch\n1\n", "exp/weights/last.pt": os.urandom(5000),
             "top.txt": b"top"}
    for name, body in files.items():
        write(store / name, body)
    dest = tmp_path / "dest"
    stale = [f"exp/{temp_name()}", f"exp/weights/{temp_name()}", temp_name()]
    kept = [f"exp/{resume_name('exp/other.pt')}", f"exp/{resume_name('exp/other.pt')}.ranges",
            f"untouched/{temp_name()}", f"exp/{temp_name()}"]
    for name in stale + kept:
        write(dest / name, b"left behind")
    held = os.open(dest / kept[-1], os.O_RDONLY)  # a live writer's: it holds the lock
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = run_cli("pull", f"file://{store}", dest, "--json", "-v", env=local_env())
    finally:
        os.close(held)
    assert done.returncode == 0, done.stderr
    assert temp_files(dest) == sorted(kept)
    assert {k: v for k, v in tree(dest).items() if TEMP_PREFIX not in k} == files
    assert "exp: removed 1 temp file(s) an interrupted run left" in done.stderr


def test_the_byte_budget_bounds_what_a_pull_holds(tmp_path: Path) -> None:
    """A 2 MiB budget: a 40 MiB object in eight-wide windows of 5 MiB ranges and a gzip
    object, restored whole, never hold more than the budget at once, and give it all back."""
    src, store_dir = tmp_path / "runs", tmp_path / "store"
    files = {"exp/weights/last.pt": os.urandom(40 * MiB + 5),
             "exp/results.csv": b"".join(b"%d,%.6f\n" % (i, 1 / (i + 1)) for i in range(80000))}
    for name, body in files.items():
        write(src / name, body)
    store_dir.mkdir()
    pushed = run_cli("push", src, f"file://{store_dir}", "--state-dir", tmp_path / "state",
                     "--gzip", "-q", env=local_env())
    assert pushed.returncode == 0, pushed.stderr
    dest = tmp_path / "dest"
    dest.mkdir()
    limit = 2 * MiB

    async def main() -> tuple[list[Status], int, int]:
        store = await open_file_store(str(store_dir))
        try:
            budget = PeakBudget(limit)
            restorer = Restorer(store, str(dest), budget, range_size=5 * MiB,
                                part_concurrency=8)
            wanted = []
            async for info in store.list_objects(""):
                target = target_for(info.key, info.size, with_history=False)
                assert target is not None
                wanted.append(Wanted(info.key, target, info.size, info.etag))
            done = await asyncio.gather(*(restorer.restore(w) for w in wanted))
            return [r.status for r in done], budget.peak, budget.in_use
        finally:
            await store.close()

    statuses, peak, in_use = asyncio.run(main())
    assert statuses == [Status.DOWNLOADED] * 2
    assert MiB <= peak <= limit  # paid for, and never more than the budget
    assert in_use == 0
    assert tree(dest) == files
    assert gzip.decompress((store_dir / "exp" / "results.csv").read_bytes()) == files[
        "exp/results.csv"]  # it was stored gzip, restored decoded


def test_a_cancelled_ranged_download_waits_for_its_threads_before_closing_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while a range's sidecar is being written in a worker thread, the download
    ends only once that thread has returned: the directory and file descriptors it writes
    through are still open for it, so the sidecar is published whole and nothing is left
    half-written (a closed descriptor number would soon be another file's)."""
    import threading

    from asyncsync.pipeline import restore

    store_dir = tmp_path / "store"
    content = os.urandom(20 * MiB)
    write(store_dir / "big.pt", content)
    dest = tmp_path / "dest"
    dest.mkdir()
    entered, proceed = threading.Event(), threading.Event()
    calls: list[int] = []
    finished: list[bool] = []
    real = restore.write_atomically

    def held_write(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) != 2:  # the fresh download's sidecar is the first: hold the next
            return real(*args, **kwargs)
        entered.set()
        proceed.wait(10)
        try:
            return real(*args, **kwargs)
        finally:
            finished.append(True)

    async def main() -> bool:
        store = await open_file_store(str(store_dir))
        try:
            info = await store.head_object("big.pt")
            assert info is not None
            restorer = Restorer(store, str(dest), ByteBudget(16 * MiB), range_size=5 * MiB,
                                part_concurrency=2)
            target = target_for("big.pt", info.size, with_history=False)
            assert target is not None
            monkeypatch.setattr(restore, "write_atomically", held_write)
            task = asyncio.create_task(restorer.restore(Wanted("big.pt", target, info.size,
                                                               info.etag)))
            await asyncio.to_thread(entered.wait, 10)
            task.cancel()  # while the thread writes the sidecar listing the first range
            threading.Timer(0.3, proceed.set).start()
            with pytest.raises(asyncio.CancelledError):
                await task
            return bool(finished)
        finally:
            proceed.set()
            await store.close()

    assert asyncio.run(main()), "the download ended while its thread still wrote"
    resume = resume_name("big.pt")
    assert temp_files(dest) == [resume, resume + RANGES_SUFFIX]
    assert ranges_done(dest / (resume + RANGES_SUFFIX))  # published whole, the range listed


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
