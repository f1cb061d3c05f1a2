"""`asyncsync verify` end to end: the real CLI against real servers (and a file:// store),
with the bucket tampered with by a plain boto client behind asyncsync's back."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest
import xxhash

from asyncsync.commands.verify import (
    Listed,
    Tally,
    Verifier,
    range_size_for,
    verify_config_from,
)
from asyncsync.errors import ObjectChanged
from asyncsync.options import from_mapping
from asyncsync.pipeline.digest import md5_b64
from asyncsync.stores.local import open_file_store
from asyncsync.stores.protocol import ObjectAttributes

from .conftest import CliResult, S3Server, bucket_keys, read_object, run_cli
from .faultproxy import FaultProxy
from .test_pull import PeakBudget
from .test_watch import FAST, Daemon, object_or_none, wait_for

MiB = 1024 * 1024


def make_tree(src: Path) -> dict[str, bytes]:
    """A small run directory: gzip-able text (train.log still over one --deep range once
    compressed, at --max-memory 5MiB), weights over one range, a few small files."""
    files = {
        "exp/results.csv": b"".join(b"%d,%.4f\n" % (i, 1 / (i + 1)) for i in range(400)),
        "exp/train.log": os.urandom(2 * MiB).hex().encode(),
        "exp/args.yaml": b"epochs: 3\nimgsz: 64\n",
        "exp/weights/last.pt": os.urandom(3 * MiB + 12345),
        "exp/weights/best.pt": os.urandom(4096),
        "exp/empty.txt": b"",
    }
    for relative, body in files.items():
        path = src / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return files


def verify(s3_server: S3Server, src: Path, dest: str, state: Path, *extra: str) -> CliResult:
    return run_cli("verify", src, dest, "--state-dir", state, *extra, env=s3_server.env(),
                   timeout=120)


def problems(result: CliResult) -> dict[str, str]:
    """path -> kind, from --json output (which must parse, and end in the summary)."""
    records = result.records
    assert records and records[-1]["type"] == "summary", result.stdout
    found = {r["path"]: r["kind"] for r in records[:-1]}
    assert all(r["type"] == "problem" for r in records[:-1]), records
    assert len(found) == len(records) - 1, records  # one problem per path
    return found


@pytest.mark.s3
def test_intact_bucket_verifies_with_and_without_the_manifest(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    files = make_tree(src)
    state = src / ".state"  # inside SRC: never uploaded, so never "missing" either
    dest = f"s3://{bucket}/team"
    pushed = run_cli("push", src, dest, "--state-dir", state, "--gzip", env=s3_server.env())
    assert pushed.returncode == 0, pushed.stderr
    client = s3_server.client()
    for key in ("team/exp/results.csv", "team/exp/train.log"):
        # The listed size is the compressed one.
        assert client.head_object(Bucket=bucket, Key=key).get("ContentEncoding") == "gzip"
    assert client.head_object(Bucket=bucket, Key="team/exp/train.log")["ContentLength"] > MiB

    done = verify(s3_server, src, dest, state, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.summary
    assert problems(done) == {}
    assert summary["files"] == summary["matched"] == len(files)
    # Every file's stat is the manifest's and every ETag the recorded one: nothing asked.
    assert summary["heads"] == summary["hashed"] == 0
    # Text mode: nothing on stdout, the summary on stderr.
    text = verify(s3_server, src, dest, state)
    assert (text.returncode, text.stdout) == (0, "")
    assert "everything matches" in text.stderr

    # No manifest: every object HEADed, every file hashed, gzip sizes from the metadata.
    # (src/.state is then plain data, as push would see it: left out here.)
    fresh = verify(s3_server, src, dest, tmp_path / "fresh-state", "--json",
                   "--exclude", ".state/*")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert fresh.summary["heads"] == fresh.summary["hashed"] == len(files)
    assert not (tmp_path / "fresh-state").exists()  # read-only: nothing created

    # --deep reads every object back; last.pt (3 MiB) in 1 MiB ranges at this budget.
    deep = verify(s3_server, src, dest, state, "--deep", "--max-memory", "5MiB", "--json")
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert deep.summary["matched"] == len(files)
    assert deep.summary["downloaded_bytes"] >= len(files["exp/weights/last.pt"])


@pytest.mark.s3
def test_tampered_bucket_is_reported_and_never_repaired(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    make_tree(src)
    for name, size in (("deleted.bin", 100), ("same-size.bin", 5000), ("other-size.bin", 300),
                       ("no-digest.bin", 200), ("recopied.bin", 200), ("meta-digest.bin", 700)):
        (src / name).write_bytes(os.urandom(size))
    state = tmp_path / "state"
    dest = f"s3://{bucket}/p"
    assert run_cli("push", src, dest, "--state-dir", state, env=s3_server.env()).returncode == 0
    client = s3_server.client()

    def metadata(key: str) -> dict[str, str]:
        return dict(client.head_object(Bucket=bucket, Key=key)["Metadata"])

    client.delete_object(Bucket=bucket, Key="p/deleted.bin")
    # Other bytes, same size, the original metadata kept: only reading it back can tell.
    client.put_object(Bucket=bucket, Key="p/same-size.bin", Body=os.urandom(5000),
                      Metadata=metadata("p/same-size.bin"))
    client.put_object(Bucket=bucket, Key="p/other-size.bin", Body=os.urandom(301),
                      Metadata=metadata("p/other-size.bin"))
    # Without metadata (another tool's upload): other bytes, then the file's own bytes,
    # whose MD5 ETag is the one the manifest recorded, so only --deep looks at it again.
    client.put_object(Bucket=bucket, Key="p/no-digest.bin", Body=os.urandom(200))
    client.put_object(Bucket=bucket, Key="p/recopied.bin",
                      Body=(src / "recopied.bin").read_bytes())
    # Other bytes of the same size, and metadata naming another digest: the file is
    # untouched, so its side of the comparison is the digest the manifest recorded.
    planted = xxhash.xxh3_128_hexdigest(b"some other content")
    client.put_object(Bucket=bucket, Key="p/meta-digest.bin", Body=os.urandom(700),
                      Metadata={**metadata("p/meta-digest.bin"), "xxh128": planted})
    client.put_object(Bucket=bucket, Key="p/exp/extra.txt", Body=b"not from SRC")
    # asyncsync's own records are not compared.
    client.put_object(Bucket=bucket, Key="p/_asyncsync/run.json", Body=b"{}")

    done = verify(s3_server, src, dest, state, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert problems(done) == {
        "deleted.bin": "missing", "other-size.bin": "size", "no-digest.bin": "no-digest",
        "meta-digest.bin": "digest", "exp/extra.txt": "extra",
    }
    by_path = {r["path"]: r for r in done.records[:-1]}
    assert by_path["other-size.bin"]["local"] == 300
    assert by_path["other-size.bin"]["remote"] == 301
    assert by_path["exp/extra.txt"]["key"] == "p/exp/extra.txt"
    assert by_path["meta-digest.bin"]["local"] == xxhash.xxh3_128_hexdigest(
        (src / "meta-digest.bin").read_bytes())
    assert by_path["meta-digest.bin"]["remote"] == planted
    assert done.summary["ok"] is False
    # Only the objects whose ETag is not the manifest's were asked about; no file was read:
    # every one is as the manifest recorded it, so its digest is the manifest's.
    assert done.summary["heads"] == 4
    assert done.summary["hashed"] == 0

    deep = verify(s3_server, src, dest, state, "--deep", "--max-memory", "5MiB", "--json")
    assert deep.returncode == 1, deep.stdout + deep.stderr
    assert problems(deep) == {
        "deleted.bin": "missing", "same-size.bin": "digest", "other-size.bin": "size",
        "no-digest.bin": "digest", "recopied.bin": "no-digest", "meta-digest.bin": "digest",
        "exp/extra.txt": "extra",
    }
    # Text: one line per problem on stdout, the summary on stderr.
    text = verify(s3_server, src, dest, state)
    assert text.returncode == 1
    lines = sorted(text.stdout.splitlines())
    assert lines == sorted([
        "missing: deleted.bin: no object p/deleted.bin",
        "size: other-size.bin: the file has 300 bytes, the object 301",
        "no-digest: no-digest.bin: the object has no xxh128 metadata: not written by"
        " asyncsync push? (--deep compares its content)",
        "extra: exp/extra.txt: an object with no local file (not deleted)",
        f"digest: meta-digest.bin: the file's xxh128 is {by_path['meta-digest.bin']['local']},"
        f" its xxh128 metadata {planted}",
    ]), text.stdout
    assert "1 missing, 1 size, 1 digest, 1 no-digest, 1 extra" in text.stderr
    # Reported, never deleted nor repaired.
    assert read_object(client, bucket, "p/exp/extra.txt") == b"not from SRC"
    assert "p/deleted.bin" not in bucket_keys(client, bucket, "p/")


@pytest.mark.s3
def test_locally_modified_files_are_hashed_afresh(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    make_tree(src)
    state = tmp_path / "state"
    dest = f"s3://{bucket}/m"
    assert run_cli("push", src, dest, "--state-dir", state, env=s3_server.env()).returncode == 0
    best = src / "exp/weights/best.pt"
    best.write_bytes(os.urandom(4096))  # the same size, other bytes
    stat = best.stat()
    os.utime(best, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    with open(src / "exp/results.csv", "ab") as csv:
        csv.write(b"400,0.0025\n")
    (src / "exp/args.yaml").touch()  # stat changed, content the same: not a problem

    done = verify(s3_server, src, dest, state, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert problems(done) == {"exp/weights/best.pt": "digest", "exp/results.csv": "size"}
    record = next(r for r in done.records if r["path"] == "exp/weights/best.pt")
    assert record["local"] == xxhash.xxh3_128_hexdigest(best.read_bytes())
    # Every object is still the version the manifest recorded: no HEAD, only hashes.
    assert done.summary["heads"] == 0
    assert done.summary["hashed"] == 2  # best.pt and args.yaml; results.csv's size told


@pytest.mark.s3
def test_include_and_exclude_narrow_the_comparison(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    make_tree(src)
    state = tmp_path / "state"
    dest = f"s3://{bucket}/f"
    assert run_cli("push", src, dest, "--state-dir", state, env=s3_server.env()).returncode == 0
    client = s3_server.client()
    client.delete_object(Bucket=bucket, Key="f/exp/results.csv")
    client.delete_object(Bucket=bucket, Key="f/exp/weights/best.pt")
    client.put_object(Bucket=bucket, Key="f/exp/weights/epoch3.pt", Body=b"stray")

    only_pt = verify(s3_server, src, dest, state, "--include", "*.pt", "--json")
    assert problems(only_pt) == {"exp/weights/best.pt": "missing",
                                 "exp/weights/epoch3.pt": "extra"}
    assert only_pt.summary["files"] == 2
    no_pt = verify(s3_server, src, dest, state, "--exclude", "*.pt", "--json")
    assert problems(no_pt) == {"exp/results.csv": "missing"}
    assert no_pt.returncode == 1
    clean = verify(s3_server, src, dest, state, "--include", "exp/*.yaml", "--json")
    assert (clean.returncode, problems(clean)) == (0, {})


@pytest.mark.s3
def test_missing_bucket_exits_2_with_one_line(s3_server: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "runs"
    make_tree(src)
    done = verify(s3_server, src, "s3://asyncsync-no-such-bucket-7f3a/p", tmp_path / "state")
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "asyncsync: error: bucket s3://asyncsync-no-such-bucket-7f3a does not exist"]


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    missing = run_cli("verify", tmp_path / "nope", "s3://bucket/p", env=env, timeout=60)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    bad = run_cli("verify", tmp_path, "s3://Bad_Bucket/p", env=env, timeout=60)
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1 and "invalid bucket name" in bad.stderr


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")  # the manifest's read-only opening is the same on every store
def test_verify_beside_a_watch_daemon_holding_the_manifest(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    make_tree(src)
    state = tmp_path / "state"
    dest = f"s3://{bucket}/w"
    assert run_cli("push", src, dest, "--state-dir", state, env=s3_server.env()).returncode == 0
    daemon = Daemon(s3_server, src, dest, state, *FAST)
    try:
        (src / "exp/epoch1.txt").write_bytes(b"written while the daemon runs\n")
        client = s3_server.client()
        wait_for(lambda: object_or_none(client, bucket, "w/exp/epoch1.txt") is not None, 30,
                 "the daemon's upload")

        done = verify(s3_server, src, dest, state, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.summary["matched"] == done.summary["files"] == 7
        assert daemon.process.poll() is None  # still running beside the reader
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log
    assert "Traceback" not in daemon.log


# -- a file:// store: no server needed -------------------------------------------------------


def test_deep_reads_back_a_damaged_large_object_in_ranges(tmp_path: Path) -> None:
    src, store = tmp_path / "runs", tmp_path / "store"
    files = make_tree(src)
    store.mkdir()
    state = tmp_path / "state"
    env = dict(os.environ)
    dest = f"file://{store}"
    assert run_cli("push", src, dest, "--state-dir", state, "--gzip", env=env).returncode == 0
    # Bit rot: one byte flipped in the middle of the stored body, its size, inode and mtime
    # kept, so the store's own records (and the ETag) still vouch for it.
    # train.log is stored as gzip: its damaged body no longer decodes (or fails its CRC).
    for relative in ("exp/weights/last.pt", "exp/train.log"):
        stored = store / relative
        before = stored.stat()
        with open(stored, "r+b") as body:
            body.seek(MiB + 7)
            byte = body.read(1)
            body.seek(MiB + 7)
            body.write(bytes([byte[0] ^ 0xFF]))
        os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))
    shallow = run_cli("verify", src, dest, "--state-dir", state, "--json", env=env)
    assert (shallow.returncode, problems(shallow)) == (0, {})  # the metadata still agrees
    deep = run_cli("verify", src, dest, "--state-dir", state, "--deep", "--max-memory", "5MiB",
                   "--json", env=env)
    assert deep.returncode == 1, deep.stdout + deep.stderr
    assert problems(deep) == {"exp/weights/last.pt": "digest", "exp/train.log": "digest"}
    record = next(r for r in deep.records if r["path"] == "exp/weights/last.pt")
    assert record["local"] == xxhash.xxh3_128_hexdigest(files["exp/weights/last.pt"])
    assert record["remote"] != record["local"]


@pytest.mark.s3
def test_deep_reads_ranges_of_one_object_in_parallel(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    (src / "w").mkdir(parents=True)
    (src / "w" / "big.pt").write_bytes(os.urandom(40 * MiB))
    state = tmp_path / "state"
    dest = f"s3://{bucket}/d"
    assert run_cli("push", src, dest, "--state-dir", state, env=s3_server.env()).returncode == 0
    with FaultProxy(s3_server.endpoint) as proxy:
        # Each range's GET is held a while, so the ranges the client keeps in flight show.
        proxy.inject("delay", 100, method="GET", path_contains="/d/w/big.pt", delay=0.2)
        done = run_cli("verify", src, dest, "--state-dir", state, "--deep", "--max-memory",
                       "8MiB", "--json", env=s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint),
                       timeout=120)
        stats = proxy.stats
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.summary["matched"] == 1
    assert stats.faults_by_action["delay"] == 20  # 2 MiB ranges at this budget
    assert stats.peak_in_flight >= 2


def test_deep_holds_no_more_than_max_memory(tmp_path: Path) -> None:
    src, store_dir = tmp_path / "runs", tmp_path / "store"
    src.mkdir()
    store_dir.mkdir()
    config = verify_config_from(from_mapping("verify", {"max_memory": "8MiB", "deep": True}),
                                src, f"file://{store_dir}")
    body = os.urandom(40 * MiB)

    async def main() -> tuple[int, int]:
        store = await open_file_store(str(store_dir))
        try:
            etag = await store.put_object(
                "big.bin", body, md5_b64=md5_b64(body),
                attributes=ObjectAttributes.of_content("0" * 32, len(body), None))
            verifier = Verifier(config, store, Tally(config, io.StringIO(), io.StringIO()))
            budget = verifier.budget = PeakBudget(config.max_memory)
            digest, size, _ = await verifier.read_back("big.bin", Listed(len(body), etag))
            assert (digest, size) == (xxhash.xxh3_128_hexdigest(body), len(body))
            return budget.peak, budget.in_use
        finally:
            await store.close()

    peak, in_use = asyncio.run(main())
    assert 2 * MiB < peak <= 8 * MiB  # more than one 2 MiB range at once, within the limit
    assert in_use == 0


def test_range_size_fits_the_budget() -> None:
    assert range_size_for(64 * MiB) == 8 * MiB
    assert range_size_for(16 * MiB) == 4 * MiB
    assert range_size_for(5 * MiB) == 1 * MiB




def test_an_object_replaced_after_the_listing_is_never_spliced_and_frees_the_budget(
    tmp_path: Path,
) -> None:
    """--deep pins every range to the listed ETag: an object replaced since the listing
    fails its first range (no bytes of two versions are hashed together), and what the
    ranges in flight held of the byte budget is given back."""
    src, store_dir = tmp_path / "runs", tmp_path / "store"
    src.mkdir()
    store_dir.mkdir()
    config = verify_config_from(from_mapping("verify", {"max_memory": "5MiB", "deep": True}),
                                src, f"file://{store_dir}")
    body = os.urandom(3 * MiB)  # three 1 MiB ranges at this budget

    async def main() -> None:
        store = await open_file_store(str(store_dir))
        try:
            etag = await store.put_object(
                "big.bin", body, md5_b64=md5_b64(body),
                attributes=ObjectAttributes.of_content("0" * 32, len(body), None))
            verifier = Verifier(config, store, Tally(config, io.StringIO(), io.StringIO()))
            with pytest.raises(ObjectChanged):
                await verifier.read_back("big.bin", Listed(len(body), f'"{"f" * 32}"'))
            assert verifier.budget.in_use == 0
            digest, size, _ = await verifier.read_back("big.bin", Listed(len(body), etag))
            assert (digest, size) == (xxhash.xxh3_128_hexdigest(body), len(body))
            assert verifier.budget.in_use == 0
        finally:
            await store.close()

    asyncio.run(main())
