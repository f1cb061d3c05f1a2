"""CheckpointStaging: consistent copies of checkpoints, made off the trainer's thread."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncsync.integrations import staging
from asyncsync.integrations.staging import CheckpointStaging
from asyncsync.pipeline.manifest import MANIFEST_FILE, Manifest
from asyncsync.pipeline.source import OpenedSource


class Received:
    def __init__(self) -> None:
        self.copied: list[tuple[str, bytes]] = []
        self.failed: list[tuple[str, BaseException]] = []

    def on_copied(self, relative: str, staged: Path) -> None:
        self.copied.append((relative, staged.read_bytes()))
        staged.unlink()

    def on_failed(self, what: str, exc: BaseException) -> None:
        self.failed.append((what, exc))


def make(tmp_path: Path, received: Received, interval: float = 0.0) -> CheckpointStaging:
    run = tmp_path / "runs" / "exp"
    (run / "weights").mkdir(parents=True)
    return CheckpointStaging(
        tmp_path / "state", run, run / "weights", checkpoint_interval=interval,
        on_copied=received.on_copied, on_failed=received.on_failed,
    )


@pytest.fixture
def one_checkpoint(tmp_path: Path) -> tuple[CheckpointStaging, Received]:
    """A staging area whose run has weights/last.pt (b"v1"), and what it hands over."""
    received = Received()
    stage = make(tmp_path, received)
    (stage.weights_dir / "last.pt").write_bytes(b"v1")
    return stage, received


def test_each_changed_checkpoint_is_copied_once_in_name_order(tmp_path: Path) -> None:
    received = Received()
    stage = make(tmp_path, received)
    weights = stage.weights_dir
    (weights / "last.pt").write_bytes(b"last-1")
    (weights / "best.pt").write_bytes(b"best-1")
    stage.snapshot()
    stage.wait()
    stage.snapshot()  # nothing changed: no second copy
    stage.wait()
    (weights / "last.pt").write_bytes(b"last-2, longer")
    stage.snapshot()
    stage.wait()
    stage.close()
    assert received.copied == [("weights/best.pt", b"best-1"), ("weights/last.pt", b"last-1"),
                               ("weights/last.pt", b"last-2, longer")]
    assert not received.failed
    assert not stage.directory.exists()


def test_a_checkpoint_rewritten_during_its_copy_is_dropped(
    one_checkpoint: tuple[CheckpointStaging, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    stage, received = one_checkpoint
    real_copy = staging.copy_checkpoint

    def copy_then_rewrite(source: OpenedSource, staged: Path) -> None:
        real_copy(source, staged)
        Path(source.path).write_bytes(b"v2, written by something else")

    monkeypatch.setattr(staging, "copy_checkpoint", copy_then_rewrite)
    stage.snapshot()
    stage.wait()
    stage.close()
    assert received.copied == []
    assert not received.failed


def test_a_failed_copy_is_reported_and_leaves_nothing_behind(
    one_checkpoint: tuple[CheckpointStaging, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    stage, received = one_checkpoint

    def disk_full(source: OpenedSource, staged: Path) -> None:
        staged.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(staging, "copy_checkpoint", disk_full)
    stage.snapshot()
    stage.wait()
    assert [what for what, _ in received.failed] == ["checkpoint snapshot"]
    assert "No space left" in str(received.failed[0][1])
    assert list(stage.directory.iterdir()) == []
    stage.close()


def test_wait_blocks_until_the_copy_is_made(
    one_checkpoint: tuple[CheckpointStaging, Received], monkeypatch: pytest.MonkeyPatch
) -> None:
    stage, received = one_checkpoint
    release = threading.Event()
    real_copy = staging.copy_checkpoint

    def held_copy(source: OpenedSource, staged: Path) -> None:
        assert release.wait(30)
        real_copy(source, staged)

    monkeypatch.setattr(staging, "copy_checkpoint", held_copy)
    stage.snapshot()  # returns with the copy held
    waiter = threading.Thread(target=stage.wait)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    release.set()
    waiter.join(10)
    assert not waiter.is_alive()
    assert received.copied == [("weights/last.pt", b"v1")]
    stage.close()


def test_staging_of_dead_processes_is_removed_and_live_ones_kept(tmp_path: Path) -> None:
    parent = tmp_path / "state" / "staging"
    parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    left_by_dead = parent / f"{dead.stdout.strip()}-exp-abc"
    left_by_dead.mkdir()
    (left_by_dead / "000001-last.pt").write_bytes(b"orphan")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        of_live = parent / f"{alive.pid}-exp-def"
        of_live.mkdir()
        not_ours = parent / "notes"
        not_ours.mkdir()
        stage = make(tmp_path, Received())
        assert not left_by_dead.exists()
        assert of_live.is_dir() and not_ours.is_dir()
        assert stage.directory.parent == parent
        assert stage.directory.name.startswith(f"{os.getpid()}-exp-")
        stage.close()
    finally:
        alive.kill()
        alive.wait()


def test_staging_inside_the_run_directory_moves_to_the_temp_dir(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "exp"
    (run / "weights").mkdir(parents=True)
    received = Received()
    stage = CheckpointStaging(run / ".state", run, run / "weights", checkpoint_interval=0,
                              on_copied=received.on_copied, on_failed=received.on_failed)
    try:
        assert not stage.directory.resolve().is_relative_to(run.resolve())
    finally:
        stage.close()


def test_a_checkpoint_swapped_for_a_symlink_before_its_copy_is_not_copied(
    one_checkpoint: tuple[CheckpointStaging, Received], tmp_path: Path,
) -> None:
    stage, received = one_checkpoint
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not the training's")
    release = threading.Event()
    stage._copier.submit(release.wait, 30)  # the copier is busy: the snapshot waits
    stage.snapshot()
    link = stage.weights_dir / ".swap"
    os.symlink(secret, link)
    os.rename(link, stage.weights_dir / "last.pt")
    release.set()
    stage.wait()
    stage.close()
    assert received.copied == []
    assert not received.failed


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """umask 022, the common default: what it would leave readable must be private anyway."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_the_state_dir_made_for_the_staging_is_private_and_so_are_the_copies(
    tmp_path: Path, usual_umask: None
) -> None:
    """attach() makes the staging before the manifest: the state directory it makes on the
    way is 0700 (the manifest then keeps an existing directory's mode), the staging and each
    checkpoint copy are the run's own."""
    state = tmp_path / "state"
    copies: list[int] = []
    received = Received()

    def on_copied(relative: str, staged: Path) -> None:
        copies.append(mode(staged))
        received.on_copied(relative, staged)

    run = tmp_path / "runs" / "exp"
    (run / "weights").mkdir(parents=True)
    stage = CheckpointStaging(state, run, run / "weights", checkpoint_interval=0,
                              on_copied=on_copied, on_failed=received.on_failed)
    try:
        (stage.weights_dir / "last.pt").write_bytes(b"v1")
        stage.snapshot()
        stage.wait()
        assert (mode(state), mode(state / "staging"), mode(stage.directory)) == \
            (0o700, 0o700, 0o700)
        manifest = Manifest.open(state)
        manifest.close()
    finally:
        stage.close()
    assert received.copied == [("weights/last.pt", b"v1")] and copies == [0o600]
    assert mode(state) == 0o700 and mode(state / MANIFEST_FILE) == 0o600
    assert mode(tmp_path / "runs") == 0o755  # the umask's, where asyncsync made nothing
