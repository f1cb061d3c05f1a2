"""`push --shard I/N`: N processes that never talk upload every file once, each walking only
its own run directories; a shard replaced on an empty disk resumes from its manifest copy."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from asyncsync.config import StoreConfig
from asyncsync.errors import ConfigError
from asyncsync.pipeline.manifest import MANIFEST_FILE, Manifest, ObjectRecord, Scope
from asyncsync.pipeline.manifest_copy import checkpoint_manifest, restore_manifest
from asyncsync.pipeline.scan import ScannedFile, ScanOptions, scan_listings
from asyncsync.pipeline.shard import BY_FILE, BY_RUN, Shard, parse_shard

from .conftest import ASYNCSYNC, S3Server, read_object, recorded_parts, run_cli

MiB = 1024 * 1024


def yolo_tree(root: Path, runs: int = 12, big: dict[str, int] | None = None) -> dict[str, bytes]:
    """runs/detect/trainK shaped like ultralytics' (and files above the run directories);
    ``big``: run name -> size of its weights/last.pt. Returns relative path -> content."""
    files: dict[str, bytes] = {"README.md": b"runs of the week\n",
                               "detect/notes.txt": b"above the runs\n"}
    for k in range(runs):
        run = f"detect/train{k}"
        files[f"{run}/args.yaml"] = f"epochs: 3\nname: train{k}\n".encode()
        files[f"{run}/results.csv"] = b"epoch,metrics/mAP50(B)\n1,0.1\n2,0.2\n"
        files[f"{run}/results.png"] = os.urandom(3000 + k)
        files[f"{run}/weights/best.pt"] = os.urandom(20_000 + k)
        files[f"{run}/weights/last.pt"] = os.urandom((big or {}).get(f"train{k}", 30_000 + k))
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def scanned_by(root: Path, shard: Shard | None) -> set[str]:
    async def walk() -> set[str]:
        found: set[str] = set()
        async for listing in scan_listings(str(root), ScanOptions(shard=shard)):
            found.update(item.relative for item in listing.items
                         if isinstance(item, ScannedFile))
        return found

    return asyncio.run(walk())


@pytest.mark.parametrize("by", [BY_RUN, BY_FILE])
def test_shards_are_disjoint_and_cover_the_tree(tmp_path: Path, by: str) -> None:
    tree = set(yolo_tree(tmp_path, runs=30))
    assert scanned_by(tmp_path, None) == tree
    for count in range(1, 9):
        parts = [scanned_by(tmp_path, Shard(i, count, by, run_depth=2)) for i in range(count)]
        assert sum(len(p) for p in parts) == len(tree), count  # disjoint...
        assert set().union(*parts) == tree, count  # ...and together the tree
        for i, part in enumerate(parts):
            assert all(Shard(i, count, by, run_depth=2).owns_file(rel) for rel in part)
    if by == BY_RUN:
        # A run directory is never split, and what lies above the runs is shard 0's.
        parts = [scanned_by(tmp_path, Shard(i, 4, by, run_depth=2)) for i in range(4)]
        for k in range(30):
            owners = {i for i, part in enumerate(parts) if f"detect/train{k}/args.yaml" in part}
            assert len(owners) == 1
            assert all(f"detect/train{k}/weights/best.pt" in parts[i] for i in owners)
        assert {"README.md", "detect/notes.txt"} <= parts[0]


def test_the_partition_is_stable() -> None:
    # The same on every machine and every release: a shard replaced by a newer image must
    # own what its predecessor owned (xxh3_64 of the run's path, modulo N).
    assert [Shard(0, 8).owner(f"detect/train{k}") for k in range(8)] == [
        Shard(0, 8).owner(f"detect/train{k}") for k in range(8)]
    assert Shard(0, 7, run_depth=2).owner("detect/train2") == Shard(3, 7, run_depth=2).owner(
        "detect/train2")
    import xxhash

    assert Shard(0, 5).owner("exp") == xxhash.xxh3_64_intdigest(b"exp") % 5


def test_shard_values() -> None:
    assert parse_shard("2/8") == Shard(2, 8)
    assert parse_shard("auto/4", environ={"JOB_COMPLETION_INDEX": "3"}) == Shard(3, 4)
    for bad, message in (
        ("8/8", "the index must be below N (8): 0 to 7"),
        ("2", "expected I/N"),
        ("x/4", "the index must be a whole number or auto"),
        ("1/0", "expected I/N"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_shard(bad)
    with pytest.raises(ConfigError, match=r"auto needs \$JOB_COMPLETION_INDEX.*unset"):
        parse_shard("auto/4", environ={})


def test_a_bad_shard_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    done = run_cli("push", tmp_path, "s3://bucket-a/p", "--shard", "auto/4", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "asyncsync: error: --shard 'auto/4': auto needs $JOB_COMPLETION_INDEX (an Indexed "
        "Job's pod index), which is unset"]
    # `asyncsync config` refuses what push would refuse: a pod whose index is past N.
    done = run_cli("config", "push", "--shard", "auto/8", env=env | {"JOB_COMPLETION_INDEX": "9"})
    assert done.returncode == 2
    assert "the index must be below N (8)" in done.stderr


# -- real processes against a real store --------------------------------------------------


def summary_of(stdout: str) -> dict[str, Any]:
    last = json.loads(stdout.strip().splitlines()[-1])
    assert last["type"] == "summary", last
    return dict(last)


def uploaded_keys(stdout: str) -> list[str]:
    return [r["key"] for r in map(json.loads, stdout.strip().splitlines())
            if r.get("type") == "file" and r["status"] in ("uploaded", "copied")]


def push_shard(server: S3Server, src: Path, dest: str, state: Path, index: int, count: int,
               *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [ASYNCSYNC, "push", str(src), dest, "--state-dir", str(state), "--run-depth", "2",
         "--shard", f"{index}/{count}", "--json", *extra],
        env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")  # the partition is the test; one real server will do
def test_four_concurrent_shards_upload_the_tree_exactly_once(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    tree = yolo_tree(src)
    dest = f"s3://{bucket}/archive"
    shards = [push_shard(s3_server, src, dest, tmp_path / "state", i, 4) for i in range(4)]
    outputs = [shard.communicate(timeout=180) for shard in shards]
    for shard, (_, err) in zip(shards, outputs, strict=True):
        assert shard.returncode == 0, err
    keys = [key for out, _ in outputs for key in uploaded_keys(out)]
    assert sorted(keys) == sorted(f"archive/{rel}" for rel in tree)  # each once, all
    # Each file stat-ed by one shard only: the shards' counts add up to the tree.
    assert sum(summary_of(out)["scanned"] for out, _ in outputs) == len(tree)
    client = s3_server.client()
    for rel, data in tree.items():
        assert read_object(client, bucket, f"archive/{rel}") == data
    # Every shard reported; `asyncsync shards` says all are done.
    done = run_cli("shards", dest, env=s3_server.env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4/4 done" in done.stdout + done.stderr
    # A second pass of each shard finds nothing to do.
    again = [push_shard(s3_server, src, dest, tmp_path / "state", i, 4) for i in range(4)]
    for shard in again:
        out, err = shard.communicate(timeout=120)
        assert shard.returncode == 0, err
        assert uploaded_keys(out) == []


@pytest.mark.s3
@pytest.mark.servers("seaweedfs", "moto")  # s3rver has no ListParts: no resume to test
def test_a_shard_replaced_on_an_empty_disk_resumes_from_its_manifest_copy(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    # A run directory that shard 2 of 4 owns holds a large checkpoint.
    big_run = next(f"train{k}" for k in range(100)
                   if Shard(2, 4, run_depth=2).owns(f"detect/train{k}"))
    src = tmp_path / "runs"
    tree = yolo_tree(src, runs=max(12, int(big_run[5:]) + 1), big={big_run: 120 * MiB})
    share = sum(len(data) for rel, data in tree.items()
                if Shard(2, 4, run_depth=2).owns_file(rel))
    dest = f"s3://{bucket}/archive"
    others = [push_shard(s3_server, src, dest, tmp_path / f"node{i}", i, 4) for i in (0, 1, 3)]
    state = tmp_path / "node2"
    shard_state = state / "shards" / "4-2"
    slow = ("--max-bandwidth", "15MB/s", "--part-size", "5MiB", "--checkpoint-manifest", "0.5")
    first = push_shard(s3_server, src, dest, state, 2, 4, *slow)
    deadline = time.monotonic() + 60
    while recorded_parts(shard_state) < 12:  # of 24: half of the checkpoint is up
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # a copy of the manifest or two since (a part takes about 0.35 s)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    # The pod is gone, and its disk with it: the replacement starts from nothing local.
    import shutil

    shutil.rmtree(state)
    # The same command line (a replacement pod runs the pod's template): the same part size.
    second = push_shard(s3_server, src, dest, state, 2, 4, "-v", "--part-size", "5MiB")
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err
    assert "restored the shard's manifest" in err
    summary = summary_of(out)
    assert summary["bytes"] < 0.6 * share, (summary, share)
    assert summary["uploaded"] >= 1 and summary["resumed_parts"] >= 10, summary
    for other in others:
        _, err = other.communicate(timeout=180)
        assert other.returncode == 0, err
    client = s3_server.client()
    listed = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="archive/") for o in page.get("Contents", [])
        if "/_asyncsync/" not in o["Key"]]
    assert sorted(listed) == sorted(f"archive/{rel}" for rel in tree)
    assert read_object(client, bucket, f"archive/detect/{big_run}/weights/last.pt") == \
        tree[f"detect/{big_run}/weights/last.pt"]
    shards = run_cli("shards", dest, env=s3_server.env())
    assert shards.returncode == 0, shards.stdout + shards.stderr
    assert "4/4 done" in shards.stdout + shards.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.s3
def test_a_manifest_copy_is_private_on_the_way_out_and_once_restored_on_an_empty_disk(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the usual umask 022: the backup the copy is made from is 0600 (it holds what
    the manifest holds), and on an empty disk the restored copy comes first, so the state
    directory it makes is 0700 and the manifest 0600, as a first open would make them."""
    from asyncsync.stores.s3 import open_s3_store

    for name, value in s3_server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    scope = Scope(s3_server.endpoint, bucket)
    entry = ObjectRecord(key="archive/detect/train0/weights/last.pt",
                         source=str(tmp_path / "runs/detect/train0/weights/last.pt"), size=5,
                         mtime_ns=1, inode=2, digest="ab" * 16, etag='"e"', object_size=5,
                         content_encoding=None, uploaded_at=1.0)
    key = "archive/_asyncsync/shards/4/1.db.gz"
    restored_state = tmp_path / "node1" / "shards" / "4-1"
    backups: list[int] = []

    async def main() -> bool:
        store = await open_s3_store(bucket, StoreConfig(
            endpoint_url=s3_server.endpoint, region="us-east-1", addressing_style="path",
            max_attempts=2))
        manifest = Manifest.open(tmp_path / "node0" / "shards" / "4-1")
        try:
            manifest.record_object(scope, entry)
            real_backup = manifest.backup_to

            def recording_backup(path: Path) -> None:
                real_backup(path)
                backups.append(mode(path))

            monkeypatch.setattr(manifest, "backup_to", recording_backup)
            assert await checkpoint_manifest(manifest, store, key)
            return await restore_manifest(store, key, restored_state)
        finally:
            manifest.close()
            await store.close()

    old_umask = os.umask(0o022)
    try:
        assert asyncio.run(main())
    finally:
        os.umask(old_umask)
    assert backups == [0o600]
    assert not list((tmp_path / "node0" / "shards" / "4-1").glob(".*"))  # no copy left
    assert (mode(restored_state), mode(restored_state / MANIFEST_FILE)) == (0o700, 0o600)
    assert mode(restored_state.parent) == 0o755  # parents: the umask's, as a first open's
    restored = Manifest.open(restored_state)
    try:
        assert restored.lookup(scope, entry.key) == entry
    finally:
        restored.close()
    assert mode(restored_state) == 0o700
