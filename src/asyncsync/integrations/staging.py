"""Consistent copies of the checkpoints a framework rewrites in place.

ultralytics saves ``last.pt`` and ``best.pt`` by truncating and rewriting the same paths every
epoch, so uploading them from the run directory would race the next save. `CheckpointStaging`
copies each changed checkpoint into a staging directory outside the run, in a thread of its
own (a checkpoint with its optimizer state is hundreds of MB: copied on the trainer's thread
it cost a short GPU epoch 10%), and hands each finished copy to ``on_copied`` for upload.
The trainer must not save again before `wait` has returned. A checkpoint is copied from a
descriptor opened beneath the run directory without following links (`source.open_source`):
a checkpoint swapped for a symlink is never copied.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from ..errors import SourceChanged, SourceNotRegular, SourceVanished
from ..pipeline.digest import FileIdentity, check_unchanged
from ..pipeline.manifest import make_state_dir
from ..pipeline.source import OpenedSource, SourcePath, SourceRoot, open_source

# (path relative to the run directory, the staged copy): the copy is the receiver's to
# upload and delete.
OnCopied = Callable[[str, Path], None]
OnFailed = Callable[[str, BaseException], None]

log = logging.getLogger("asyncsync.training")


class _Snapshot(NamedTuple):
    """A checkpoint to copy: where it is, what it was when the trainer handed it over,
    and where its copy goes."""

    relative: str
    source: Path
    identity: FileIdentity
    device: int
    staged: Path


class CheckpointStaging:
    """The staging directory of one run and the copier thread that fills it."""

    def __init__(
        self, state_dir: Path, run_dir: Path, weights_dir: Path, *,
        checkpoint_interval: float, on_copied: OnCopied, on_failed: OnFailed,
    ) -> None:
        """``checkpoint_interval``: a checkpoint is copied at most once per this many
        seconds (0: every time it changes)."""
        self.run_dir = run_dir
        self.weights_dir = weights_dir
        self.checkpoint_interval = checkpoint_interval
        self._on_copied = on_copied
        self._on_failed = on_failed
        self.directory = _make_staging(state_dir, run_dir)
        self._snapshotted: dict[str, FileIdentity] = {}
        self._taken: dict[str, float] = {}  # monotonic time of the last copy, per checkpoint
        self._count = 0
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncsync-copy")
        self._copies: list[Future[None]] = []

    def snapshot(self) -> None:
        """Queue a copy of each checkpoint that changed since the last one (the trainer's
        thread; returns at once)."""
        try:
            entries = list(os.scandir(self.weights_dir))
        except FileNotFoundError:
            return
        now = time.monotonic()
        changed: list[_Snapshot] = []
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False):
                continue
            relative = Path(entry.path).relative_to(self.run_dir).as_posix()
            st = entry.stat(follow_symlinks=False)
            identity = FileIdentity.of(st)
            if self._snapshotted.get(relative) == identity:
                continue
            taken = self._taken.get(relative)
            if taken is not None and now - taken < self.checkpoint_interval:
                # Paced, as watch paces checkpoints: a short epoch would otherwise send
                # hundreds of MB a second. A later epoch's version or the flush goes up.
                continue
            self._snapshotted[relative] = identity
            self._taken[relative] = now
            self._count += 1
            staged = self.directory / f"{self._count:06d}-{entry.name}"
            changed.append(_Snapshot(relative, Path(entry.path), identity, st.st_dev, staged))
        if changed:
            # One copier thread: snapshots of a key reach on_copied in the order taken.
            self._copies.append(self._copier.submit(self._copy, changed))

    def wait(self) -> None:
        """Return once the copies under way are made: the trainer may then rewrite its
        weights. A copy that failed is reported to ``on_failed``."""
        copies, self._copies = self._copies, []
        for copy in copies:
            try:
                copy.result()
            except Exception as exc:  # noqa: BLE001 - the final flush still has the file
                self._on_failed("checkpoint snapshot", exc)

    def close(self) -> None:
        """Stop the copier (after the copies queued) and remove the staging directory."""
        self._copier.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _copy(self, snapshots: list[_Snapshot]) -> None:
        started = time.perf_counter()
        copied = 0
        root = SourceRoot(str(self.run_dir))
        for snapshot in snapshots:
            source = SourcePath(str(snapshot.source), root, snapshot.device,
                                snapshot.identity.inode)
            try:
                with open_source(source) as opened:
                    if FileIdentity.of(os.fstat(opened.fd)) != snapshot.identity:
                        raise SourceChanged(f"{snapshot.relative}: changed before its copy")
                    copy_checkpoint(opened, snapshot.staged)
                    check_unchanged(opened, snapshot.identity)
            except (SourceChanged, SourceVanished, SourceNotRegular) as exc:
                # Written while copying (or swapped), so not a consistent copy: the trainer
                # waits for these copies before it saves, so something else wrote it. The
                # next snapshot or the final flush has the file.
                snapshot.staged.unlink(missing_ok=True)
                if isinstance(exc, SourceNotRegular):
                    log.warning("%s: %s", snapshot.relative, exc)
                continue
            except OSError as exc:
                snapshot.staged.unlink(missing_ok=True)
                self._on_failed("checkpoint snapshot", exc)
                continue
            copied += snapshot.identity.size
            self._on_copied(snapshot.relative, snapshot.staged)
        if copied:
            log.debug("snapshot of %d bytes of weights in %.3f s", copied,
                      time.perf_counter() - started)


def copy_checkpoint(source: OpenedSource, staged: Path) -> None:
    """A real copy of the open checkpoint (the trainer truncates the original in place next
    epoch). sendfile copies in the kernel, so the training's threads keep the GIL."""
    with open(staged, "wb", opener=_open_private) as out:
        offset = 0
        try:
            while sent := os.sendfile(out.fileno(), source.fd, offset, 1 << 30):
                offset += sent
        except OSError as exc:
            if offset or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # A filesystem without sendfile: copy through a buffer.
            while chunk := os.pread(source.fd, 8 << 20, offset):
                out.write(chunk)
                offset += len(chunk)


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _make_staging(state_dir: Path, run_dir: Path) -> Path:
    """A directory for checkpoint copies, outside the run directory."""
    parent = state_dir / "staging"
    if parent.resolve().is_relative_to(run_dir):
        parent = Path(tempfile.gettempdir())
    else:
        # Made before the manifest is opened: the state directory is made private here, or
        # the manifest would find it with the umask's mode and keep it so.
        make_state_dir(state_dir)
        _make_private_directory(parent)
    _remove_stale_staging(parent)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{run_dir.name}-", dir=parent))


def _make_private_directory(path: Path) -> None:
    """``path`` 0700 if it is made now (the checkpoint copies in it are the run's own)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # mkdir's mode passes through the umask; 0700 is meant


def _remove_stale_staging(parent: Path) -> None:
    """Staging directories left by processes that died (SIGKILL, OOM) before teardown."""
    for entry in parent.iterdir():
        pid_text = entry.name.partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's
