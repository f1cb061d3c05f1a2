"""asyncsync.commands.cleanup: local files of quiet runs are deleted only when provably in
the bucket.

Files go up the real way (the installed `asyncsync push` against SeaweedFS); cleanup then runs
against the manifest that push wrote and a real S3 store wrapped so that anything but HEAD
fails the test. Files are aged with os.utime *before* the push (so the manifest records the
aged mtime), never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from asyncsync.commands.cleanup import (
    CleanupDecision,
    CleanupPolicy,
    clean_quiet_runs,
    parse_duration,
)
from asyncsync.config import StoreConfig
from asyncsync.errors import ConfigError
from asyncsync.pipeline.manifest import Manifest, Scope
from asyncsync.stores.protocol import ObjectInfo, ObjectStore

from .conftest import S3Server, bucket_keys, read_object, run_cli

MiB = 1024 * 1024
DAY = 86400.0
PREFIX = "team/runs"
OLD = time.time() - 3 * DAY  # older than the one-day policy below


def run_files(multipart: bool = False) -> dict[str, bytes]:
    """A YOLOv8-shaped run directory."""
    files = {
        "args.yaml": b"epochs: 3\nimgsz: 64\n",
        "results.csv": b"epoch,train/box_loss,metrics/mAP50(B)\n" + b"1,0.91,0.12\n" * 200,
        "train_batch0.jpg": os.urandom(3000),
        "weights/best.pt": os.urandom(4096),
        "weights/last.pt": os.urandom(6 * MiB if multipart else 8192),
    }
    return files


def write_tree(root: Path, files: dict[str, bytes], mtime: float | None = OLD) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))


def push(server: S3Server, src: Path, bucket: str, state: Path, *extra: str) -> None:
    result = run_cli("push", src, f"s3://{bucket}/{PREFIX}", "--state-dir", state, "--json",
                     *extra, env=server.env())
    assert result.returncode == 0, result.stderr


class HeadOnlyStore:
    """The real store, reachable only through head_object: cleanup must never write."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.heads: list[str] = []

    async def head_object(self, key: str) -> ObjectInfo | None:
        self.heads.append(key)
        return await self.inner.head_object(key)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"cleanup called store.{name}")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def clean(
    server: S3Server, bucket: str, src: Path, state: Path, policy: CleanupPolicy, *,
    endpoint: str | None = None, now: float | None = None,
    store_class: type[HeadOnlyStore] = HeadOnlyStore,
) -> tuple[list[CleanupDecision], list[str]]:
    """Run clean_quiet_runs against the real store; return its decisions and HEADed keys."""
    from asyncsync.stores.s3 import open_s3_store

    async def main() -> tuple[list[CleanupDecision], list[str]]:
        config = StoreConfig(endpoint_url=endpoint or server.endpoint, region="us-east-1",
                             addressing_style="path", max_attempts=2)
        store = store_class(await open_s3_store(bucket, config))
        manifest = Manifest.open(state)
        try:
            decisions = await clean_quiet_runs(
                source=src, prefix=PREFIX, manifest=manifest,
                scope=Scope(server.endpoint.rstrip("/"), bucket),
                store=store,  # type: ignore[arg-type]
                policy=policy, now=now,
            )
        finally:
            manifest.close()
            await store.inner.close()
        return decisions, store.heads

    return asyncio.run(main())


def policy(*keep: str, dry_run: bool = False, run_depth: int = 1) -> CleanupPolicy:
    return CleanupPolicy(delete_after=DAY, keep=keep, dry_run=dry_run, run_depth=run_depth)


def by_action(decisions: list[CleanupDecision]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for decision in decisions:
        grouped.setdefault(decision.action, []).append(decision.path)
    return {action: sorted(paths) for action, paths in grouped.items()}


def reasons(decisions: list[CleanupDecision]) -> dict[str, str]:
    return {d.path: d.reason for d in decisions}


def snapshot(server: S3Server, bucket: str) -> dict[str, bytes]:
    client = server.client()
    return {key: read_object(client, bucket, key) for key in bucket_keys(client, bucket)}


@pytest.mark.s3
def test_quiet_uploaded_runs_are_deleted_and_the_bucket_is_untouched(
    s3_env: S3Server, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    exp, exp2 = run_files(multipart=True), run_files()
    write_tree(src / "exp", exp)
    write_tree(src / "exp2", exp2)
    write_tree(src, {"notes.txt": b"not inside any run"})
    # gzip: the csv/yaml objects are smaller than the files (size checked from metadata);
    # a 5 MiB threshold sends last.pt as a multipart upload.
    push(s3_env, src, bucket, state, "--gzip", "--multipart-threshold", "5MiB")
    before = snapshot(s3_env, bucket)
    client = s3_env.client()
    assert client.head_object(Bucket=bucket, Key=f"{PREFIX}/exp/results.csv")[
        "ContentEncoding"] == "gzip"
    if s3_env.counts_parts_in_etag:  # a multipart object (s3rver names it by a plain MD5)
        assert "-" in client.head_object(Bucket=bucket, Key=f"{PREFIX}/exp/weights/last.pt")[
            "ETag"]

    with caplog.at_level(logging.INFO, logger="asyncsync"):
        decisions, heads = clean(s3_env, bucket, src, state, policy())

    expected = sorted([f"exp/{n}" for n in exp] + [f"exp2/{n}" for n in exp2])
    assert by_action(decisions) == {"deleted": expected}, reasons(decisions)
    assert sorted(heads) == [f"{PREFIX}/{p}" for p in expected]
    assert not (src / "exp").exists() and not (src / "exp2").exists()  # empty dirs removed
    assert (src / "notes.txt").read_bytes() == b"not inside any run"
    assert snapshot(s3_env, bucket) == before
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cleanup: ")]
    assert sorted(logged) == [f"cleanup: {p}: deleted (verified in bucket)" for p in expected]
    # A second pass finds nothing left to decide.
    assert clean(s3_env, bucket, src, state, policy()) == ([], [])


@pytest.mark.s3
def test_a_run_with_a_recent_file_is_left_alone(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    write_tree(src / "active", run_files())
    write_tree(src / "done", run_files())
    push(s3_env, src, bucket, state)
    # Training is still writing "active": one new checkpoint, everything else old.
    write_tree(src / "active", {"weights/epoch3.pt": b"fresh"}, mtime=None)

    decisions, heads = clean(s3_env, bucket, src, state, policy())

    assert {d.path.split("/")[0] for d in decisions} == {"done"}
    assert all(d.action == "deleted" for d in decisions)
    assert not any(key.startswith(f"{PREFIX}/active/") for key in heads)
    assert sorted(p.name for p in (src / "active").rglob("*") if p.is_file()) == sorted(
        ["args.yaml", "results.csv", "train_batch0.jpg", "best.pt", "last.pt", "epoch3.pt"]
    )
    # The same run, judged from a day later, is quiet (epoch3.pt was never uploaded: kept).
    later, _ = clean(s3_env, bucket, src, state, policy(), now=time.time() + 2 * DAY)
    assert by_action(later)["kept"] == ["active/weights/epoch3.pt"]
    assert reasons(later)["active/weights/epoch3.pt"] == "not uploaded"


@pytest.mark.s3
@pytest.mark.parametrize(
    ("keep", "kept"),
    [
        (("weights/best.pt",), ["exp/weights/best.pt"]),  # relative to the run
        (("best.pt",), ["exp/weights/best.pt"]),  # a file name, anywhere
        (("exp/args.yaml", "*.jpg"), ["exp/args.yaml", "exp/train_batch0.jpg"]),  # source root
    ],
)
def test_keep_globs_are_kept(
    s3_env: S3Server, bucket: str, tmp_path: Path, keep: tuple[str, ...], kept: list[str]
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    files = run_files()
    write_tree(src / "exp", files)
    push(s3_env, src, bucket, state)

    decisions, _ = clean(s3_env, bucket, src, state, policy(*keep))

    assert by_action(decisions)["kept"] == kept
    assert all(reasons(decisions)[path] == "--keep" for path in kept)
    assert len(by_action(decisions)["deleted"]) == len(files) - len(kept)
    remaining = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    assert remaining == kept
    assert (src / "exp").is_dir()  # still holds a kept file


@pytest.mark.s3
def test_modified_replaced_and_never_uploaded_files_are_kept(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    write_tree(src / "exp", run_files())
    push(s3_env, src, bucket, state)

    # Same size, same mtime_ns, same inode, other bytes: only the digest can tell.
    best = src / "exp/weights/best.pt"
    st = best.stat()
    with open(best, "r+b") as f:
        f.write(b"X" * 16)
    os.utime(best, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Appended to, then aged back past the policy.
    csv = src / "exp/results.csv"
    with open(csv, "ab") as f:
        f.write(b"2,0.85,0.2\n")
    os.utime(csv, (OLD - 10, OLD - 10))
    # Same content, but a new file renamed over it (a new inode: both exist at once, so the
    # old number cannot be reused): not the file that was uploaded.
    yaml = src / "exp/args.yaml"
    write_tree(src / "exp", {"args.yaml.tmp": yaml.read_bytes()})
    os.replace(src / "exp/args.yaml.tmp", yaml)
    write_tree(src / "exp", {"confusion_matrix.png": b"never pushed"})

    decisions, _ = clean(s3_env, bucket, src, state, policy())

    assert reasons(decisions) == {
        "exp/args.yaml": "modified after upload",
        "exp/confusion_matrix.png": "not uploaded",
        "exp/results.csv": "modified after upload",
        "exp/train_batch0.jpg": "verified in bucket",
        "exp/weights/best.pt": "modified after upload (content differs)",
        "exp/weights/last.pt": "verified in bucket",
    }
    assert by_action(decisions)["deleted"] == ["exp/train_batch0.jpg", "exp/weights/last.pt"]
    assert best.exists() and csv.exists() and yaml.exists()


@pytest.mark.s3
def test_a_file_uploaded_from_another_source_is_not_counted(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    files = run_files()
    write_tree(tmp_path / "a" / "exp", files)
    write_tree(tmp_path / "b" / "exp", files)
    push(s3_env, tmp_path / "a", bucket, state)
    push(s3_env, tmp_path / "b", bucket, state)  # same keys, same content: b owns the rows

    decisions, _ = clean(s3_env, bucket, tmp_path / "a", state, policy())

    assert set(reasons(decisions).values()) == {"not uploaded"}
    assert all((tmp_path / "a" / "exp" / name).exists() for name in files)


@pytest.mark.s3
def test_objects_deleted_or_overwritten_in_the_bucket_keep_their_files(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    files = run_files()
    write_tree(src / "exp", files)
    push(s3_env, src, bucket, state)
    client = s3_env.client()
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/exp/weights/last.pt")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/exp/weights/best.pt", Body=b"other")
    # Right digest in the metadata, but not the file's bytes (a truncated copy).
    digest = client.head_object(Bucket=bucket, Key=f"{PREFIX}/exp/args.yaml")["Metadata"]
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/exp/args.yaml", Body=b"epochs",
                      Metadata=digest)

    decisions, _ = clean(s3_env, bucket, src, state, policy())

    assert reasons(decisions) == {
        "exp/args.yaml": "object in bucket has another size",
        "exp/results.csv": "verified in bucket",
        "exp/train_batch0.jpg": "verified in bucket",
        "exp/weights/best.pt": "object in bucket has other content",
        "exp/weights/last.pt": "not in bucket",
    }
    for name in ("args.yaml", "weights/best.pt", "weights/last.pt"):
        assert (src / "exp" / name).read_bytes() == files[name]


@pytest.mark.s3
def test_dry_run_deletes_nothing(s3_env: S3Server, bucket: str, tmp_path: Path) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    files = run_files()
    write_tree(src / "exp", files)
    push(s3_env, src, bucket, state)

    decisions, _ = clean(s3_env, bucket, src, state, policy("best.pt", dry_run=True))

    assert by_action(decisions) == {
        "kept": ["exp/weights/best.pt"],
        "would-delete": sorted(f"exp/{n}" for n in files if n != "weights/best.pt"),
    }
    assert all((src / "exp" / name).read_bytes() == data for name, data in files.items())


@pytest.mark.s3
def test_runs_two_levels_deep(s3_env: S3Server, bucket: str, tmp_path: Path) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    for run in ("detect/train", "detect/train2", "segment/train"):
        write_tree(src / run, run_files())
    write_tree(src, {"detect/summary.txt": b"beside the runs, in no run"})
    push(s3_env, src, bucket, state)
    write_tree(src, {"detect/train2/results.csv": b"still training"}, mtime=None)

    decisions, _ = clean(s3_env, bucket, src, state,
                         policy("weights/best.pt", run_depth=2))

    assert {d.path.rsplit("/", 1)[0] for d in decisions if d.action == "deleted"} == {
        "detect/train", "detect/train/weights", "segment/train", "segment/train/weights"
    }
    assert by_action(decisions)["kept"] == [
        "detect/train/weights/best.pt", "segment/train/weights/best.pt"
    ]
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()) == sorted(
        ["detect/summary.txt", "detect/train/weights/best.pt", "segment/train/weights/best.pt"]
        + [f"detect/train2/{n}" for n in run_files()]
    )


@pytest.mark.s3
def test_symlinks_are_neither_followed_nor_deleted(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    write_tree(src / "exp", run_files())
    write_tree(tmp_path / "elsewhere", run_files())
    push(s3_env, src, bucket, state)
    os.symlink(src / "exp" / "weights" / "best.pt", src / "exp" / "best-link.pt")
    os.symlink(tmp_path / "elsewhere", src / "linked-run")  # a "run" that is a symlink

    decisions, _ = clean(s3_env, bucket, src, state, policy())

    assert all(d.path.startswith("exp/") and d.action == "deleted" for d in decisions)
    assert "exp/best-link.pt" not in reasons(decisions)
    assert os.path.islink(src / "exp" / "best-link.pt")  # its directory stays for it
    assert len(list((tmp_path / "elsewhere").rglob("*.pt"))) == 2


@pytest.mark.s3
def test_an_unreachable_store_keeps_everything(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    src, state = tmp_path / "runs", tmp_path / "state"
    files = run_files()
    write_tree(src / "exp", files)
    push(s3_env, src, bucket, state)

    # Nothing listens on port 9 of loopback: connection refused, after every retry.
    decisions, heads = clean(s3_env, bucket, src, state, policy(), endpoint="http://127.0.0.1:9")

    assert {d.action for d in decisions} == {"kept"}
    assert all(d.reason.startswith("cannot verify: ") for d in decisions), reasons(decisions)
    assert len(heads) == 1  # the store is known to be down after the first file
    assert all((src / "exp" / name).exists() for name in files)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 7 * 86400), ("1h30m", 5400),
     ("1d 12h", 129600), ("2w", 14 * 86400), ("3600", 3600), ("1.5h", 5400), ("0", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "soon", "-1h", "1y", "30M", "h", "30m2h", "1h1h", "1.h", "1e3"]
)
def test_parse_duration_rejects_bad_input_in_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert "--delete-after" in message and repr(text) in message and "\n" not in message


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="--delete-after"):
        CleanupPolicy(delete_after=-1, keep=(), dry_run=False)
    with pytest.raises(ConfigError, match="run depth"):
        CleanupPolicy(delete_after=0, keep=(), dry_run=False, run_depth=0)


def test_keep_matches_relative_to_the_run_or_the_source_root() -> None:
    keep = CleanupPolicy(delete_after=0, keep=("best.pt", "weights/last.pt", "exp/*.yaml"),
                         dry_run=False)
    assert keep.keeps("weights/best.pt", "exp/weights/best.pt")
    assert keep.keeps("weights/last.pt", "exp/weights/last.pt")
    assert not keep.keeps("sub/weights/last.pt", "exp/sub/weights/last.pt")
    assert keep.keeps("args.yaml", "exp/args.yaml")
    assert not keep.keeps("args.yaml", "exp2/args.yaml")
    assert not CleanupPolicy(delete_after=0, keep=(), dry_run=False).keeps("a", "exp/a")


def test_the_last_stat_before_unlinking_keeps_a_file_changed_after_hashing(
    tmp_path: Path,
) -> None:
    from asyncsync.commands.cleanup import _unlink_if_unchanged
    from asyncsync.errors import SourceNotRegular
    from asyncsync.pipeline.digest import FileIdentity
    from asyncsync.pipeline.source import SourcePath, open_source

    def opened(path: Path) -> Any:
        return open_source(SourcePath.of(str(path), str(tmp_path), os.lstat(path)))

    path = tmp_path / "last.pt"
    path.write_bytes(b"epoch 3")
    hashed = FileIdentity.of(os.stat(path))
    with opened(path) as held:
        path.write_bytes(b"epoch 4")  # training came back between the hash and the unlink
        os.utime(path, ns=(hashed.mtime_ns, hashed.mtime_ns + 1))
        assert not _unlink_if_unchanged(held, hashed)
    assert path.read_bytes() == b"epoch 4"
    link = tmp_path / "link.pt"
    os.symlink(path, link)
    with pytest.raises(SourceNotRegular):
        opened(link)  # a symlink is never opened, so never deleted
    assert link.is_symlink()
    with opened(path) as held:
        # Renamed over by another file between the verification and the unlink: kept.
        other = tmp_path / "other.pt"
        other.write_bytes(b"epoch 4")
        os.utime(other, ns=(hashed.mtime_ns, hashed.mtime_ns + 1))
        os.rename(other, path)
        assert not _unlink_if_unchanged(held, FileIdentity.of(os.fstat(held.fd)))
    assert path.exists()
    with opened(path) as held:
        assert _unlink_if_unchanged(held, FileIdentity.of(os.stat(path)))
        assert not path.exists()
        assert not _unlink_if_unchanged(held, hashed)  # already gone: nothing to do


@pytest.mark.s3
def test_a_directory_swapped_for_a_symlink_redirects_no_delete_outside(
    s3_env: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Between the verification of weights/best.pt (its HEAD) and its deletion, something
    writing in the run replaces weights/ by a symlink to a directory outside SRC holding the
    same names: nothing outside is deleted or read, and the rest of the run is kept."""
    src, state, outside = tmp_path / "runs", tmp_path / "state", tmp_path / "outside"
    files = run_files()
    write_tree(src / "exp", files)
    write_tree(outside, {"weights/best.pt": b"not ours", "weights/last.pt": b"not ours"})
    push(s3_env, src, bucket, state)
    run = src / "exp"

    class SwappingStore(HeadOnlyStore):
        async def head_object(self, key: str) -> ObjectInfo | None:
            info = await super().head_object(key)
            if key.endswith("weights/best.pt"):
                os.rename(run / "weights", run / "weights-old")
                os.symlink(outside / "weights", run / "weights")
            return info

    decisions, _ = clean(s3_env, bucket, src, state, policy(), store_class=SwappingStore)
    assert (outside / "weights" / "best.pt").read_bytes() == b"not ours"
    assert (outside / "weights" / "last.pt").read_bytes() == b"not ours"
    assert (run / "weights").is_symlink()
    actions = {d.path: d.action for d in decisions}
    # best.pt was verified through the descriptor that is unlinked: its own, wherever its
    # directory went; last.pt is reached through the symlink now, so never read.
    assert actions["exp/weights/best.pt"] == "deleted"
    assert not (run / "weights-old" / "best.pt").exists()
    assert actions["exp/weights/last.pt"] == "kept"
    assert "replaced by a symlink" in reasons(decisions)["exp/weights/last.pt"]
