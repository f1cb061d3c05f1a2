"""Freeing the training node's disk (`--delete-after`, `--keep`, `--delete-dry-run`): delete
the local files of quiet runs, and only those provably in the bucket.

A run is a directory ``run_depth`` levels below the source root; it is quiet when no regular
file in it was written within ``delete_after``. A file of a quiet run goes only when every
link holds: the manifest recorded an upload of this very file (path, size, mtime_ns, inode),
its content hashed now has the recorded xxh3-128 digest, and a HEAD shows the object with
that digest and size. Any doubt keeps the file. The bucket is only read; symlinks are never
followed or deleted; directories emptied by a deletion go too, but only inside the run.

The tree may be rewritten while cleanup runs, by anything that can write in it: the file is
hashed through a descriptor opened beneath the source root without following any link, and
deleted with unlinkat() relative to its directory's descriptor, after checking that its name
there still names the verified inode. A directory swapped for a symlink can redirect neither
the read nor the delete outside the run.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio.to_thread

from ..errors import (
    ConfigError,
    FatalStoreError,
    SourceChanged,
    SourceNotRegular,
    SourceVanished,
    StoreError,
    TransientStoreError,
)
from ..pipeline import digest
from ..pipeline.digest import FileIdentity
from ..pipeline.keys import InvalidKey, PathFilter, object_key
from ..pipeline.manifest import Manifest, Scope
from ..pipeline.source import OpenedSource, SourcePath, SourceRoot, open_parent, open_source
from ..stores.protocol import META_DIGEST, META_SIZE, ObjectStore

log = logging.getLogger("asyncsync")

CleanupAction = Literal["deleted", "would-delete", "kept"]

# Largest unit first, each at most once: "1h30m", "7d", "90s"; a bare number is seconds.
_UNITS = (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile("".join(f"(?:{_NUMBER}{unit})?" for unit, _ in _UNITS))


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '7d', '1h30m', '3600' -> seconds."""
    compact = "".join(text.split())
    if re.fullmatch(_NUMBER, compact):
        return float(compact)
    match = _DURATION_RE.fullmatch(compact)
    if not match or not any(match.groups()):
        raise ConfigError(
            f"--delete-after: {text!r} is not a duration (examples: 90s, 30m, 2h, 7d, 1h30m)"
        )
    scales = (scale for _, scale in _UNITS)
    return sum(float(n) * scale for n, scale in zip(match.groups(), scales, strict=True) if n)


@dataclass(frozen=True)
class CleanupPolicy:
    delete_after: float  # seconds without a write before a run counts as quiet
    keep: tuple[str, ...]  # globs never deleted (PathFilter semantics)
    dry_run: bool
    run_depth: int = 1  # runs/exp: 1; runs/detect/train: 2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delete_after) and self.delete_after >= 0):
            raise ConfigError(f"--delete-after: {self.delete_after!r} must not be negative")
        if self.run_depth < 1:
            raise ConfigError(f"run depth {self.run_depth!r} must be at least 1")

    def keeps(self, run_relative: str, source_relative: str) -> bool:
        """A --keep glob matches the path relative to the run or to the source root."""
        if not self.keep:  # an empty include list would accept everything
            return False
        accepts = PathFilter(include=self.keep).accepts
        return accepts(run_relative) or accepts(source_relative)


@dataclass(frozen=True)
class CleanupDecision:
    path: str  # POSIX path relative to the source root
    action: CleanupAction
    reason: str


@dataclass(frozen=True, slots=True)
class _LocalFile:
    path: str  # absolute, spelled as the scanner spells it (the manifest's `source`)
    relative: str
    run_relative: str
    identity: FileIdentity
    device: int


@dataclass
class _RunSurvey:
    files: list[_LocalFile] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    busy: str | None = None  # why the run is not quiet (or cannot be judged)


def _relative(path: str, base: str) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def _find_runs(root: str, depth: int) -> list[str]:
    """Real directories (never symlinks) exactly ``depth`` levels below ``root``, sorted."""
    level = [root]
    for _ in range(depth):
        level = [e.path for d in level for e in _listing(d) if e.is_dir(follow_symlinks=False)]
    return level


def _listing(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.warning("cleanup: cannot list %s: %s", directory, exc.strerror)
        return []


def _survey_run(run: str, root: str, threshold_ns: int) -> _RunSurvey:
    """Every regular file of a run, or why the run must be left alone."""
    survey = _RunSurvey()
    stack = [run]
    while stack:
        directory = stack.pop()
        survey.directories.append(directory)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            return _RunSurvey(busy=f"cannot list {_relative(directory, root)}: {exc.strerror}")
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                # A file vanishing under the walk is a sign of life, not an accident to skip.
                why = "vanished" if isinstance(exc, FileNotFoundError) else exc.strerror
                return _RunSurvey(busy=f"{_relative(entry.path, root)}: {why}")
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                if st.st_mtime_ns > threshold_ns:
                    return _RunSurvey(busy=f"{_relative(entry.path, root)} written recently")
                survey.files.append(_LocalFile(
                    entry.path, _relative(entry.path, root), _relative(entry.path, run),
                    FileIdentity.of(st), st.st_dev,
                ))
            # Symlinks, FIFOs and sockets are neither followed nor deleted; they also keep
            # their directory from being removed.
    return survey


def _unlink_if_unchanged(opened: OpenedSource, hashed: FileIdentity) -> bool:
    """Delete the opened file's name if it still names the very regular file that was
    verified (the descriptor's inode), relative to the directory it was opened in."""
    try:
        st = opened.stat_name()
    except SourceVanished:
        return False
    held = os.fstat(opened.fd)
    if (
        not stat.S_ISREG(st.st_mode) or FileIdentity.of(st) != hashed
        or (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino)
    ):
        return False
    os.unlink(opened.name, dir_fd=opened.parent)
    return True


def _remove_empty_directories(directories: list[str], root: str) -> None:
    """rmdir what is empty now, deepest first: rmdir itself refuses a directory that still
    holds anything (a kept file, a symlink, a file written meanwhile), so nothing is lost.
    Each is removed by name from its parent's descriptor, reached from ``root`` without
    following links: rmdir of a name that is a symlink now fails (ENOTDIR)."""
    for directory in sorted(directories, key=lambda d: d.count(os.sep), reverse=True):
        try:
            parent, name = open_parent(directory, root)
        except (OSError, SourceVanished, SourceNotRegular):
            continue
        try:
            os.rmdir(name, dir_fd=parent)
        except OSError:
            continue
        finally:
            os.close(parent)
        log.debug("cleanup: removed empty directory %s", directory)


@dataclass
class _Verifier:
    """Decides one file at a time; remembers a store that is down, so that a pass over a
    thousand files does not sit through a thousand retry schedules to keep them all."""

    prefix: str
    manifest: Manifest
    scope: Scope
    store: ObjectStore
    policy: CleanupPolicy
    root: SourceRoot  # what every file is opened (and deleted) beneath
    store_down: str | None = None

    async def decide(self, local: _LocalFile) -> CleanupDecision:
        def kept(reason: str) -> CleanupDecision:
            return CleanupDecision(local.relative, "kept", reason)

        if self.policy.keeps(local.run_relative, local.relative):
            return kept("--keep")
        try:
            key = object_key(self.prefix, local.relative)
        except InvalidKey as exc:
            return kept(f"not uploaded: {exc}")
        record = self.manifest.lookup(self.scope, key)
        if record is None or record.source != local.path:
            return kept("not uploaded")
        ident = local.identity
        if not record.same_stat(local.path, ident.size, ident.mtime_ns, ident.inode):
            return kept("modified after upload")
        source = SourcePath(local.path, self.root, local.device, ident.inode)
        try:
            opened = await anyio.to_thread.run_sync(open_source, source)
        except (SourceVanished, SourceChanged):
            return kept("modified while verifying")
        except SourceNotRegular as exc:
            return kept(str(exc))
        except OSError as exc:
            return kept(f"cannot read: {exc.strerror}")
        try:
            # The bytes verified and the inode deleted are those of this one descriptor.
            try:
                content, identity = await anyio.to_thread.run_sync(digest.hash_opened, opened)
            except (SourceVanished, SourceChanged):
                return kept("modified while verifying")
            except OSError as exc:
                return kept(f"cannot read: {exc.strerror}")
            if identity != local.identity:
                return kept("modified after upload")
            # Same stat but other bytes: rewritten with its old size and mtime put back.
            if content != record.digest:
                return kept("modified after upload (content differs)")
            problem = await self._bucket_problem(key, content, identity.size)
            if problem:
                return kept(problem)
            if self.policy.dry_run:
                return CleanupDecision(local.relative, "would-delete", "verified in bucket")
            try:
                if not await anyio.to_thread.run_sync(_unlink_if_unchanged, opened, identity):
                    return kept("modified while verifying")
            except OSError as exc:
                return kept(f"cannot delete: {exc.strerror}")
        finally:
            opened.close()
        return CleanupDecision(local.relative, "deleted", "verified in bucket")

    async def _bucket_problem(self, key: str, content: str, size: int) -> str | None:
        """None if the object holds this content; else why that cannot be shown."""
        if self.store_down is not None:
            return f"cannot verify: {self.store_down}"
        try:
            head = await self.store.head_object(key)
        except StoreError as exc:
            if isinstance(exc, TransientStoreError | FatalStoreError):
                self.store_down = str(exc)  # retried already, or hopeless: not per object
            return f"cannot verify: {exc}"
        if head is None:
            return "not in bucket"
        if head.metadata.get(META_DIGEST) != content:
            return "object in bucket has other content"
        # A gzip body is smaller than the file; its original size travels in the metadata.
        if (head.content_encoding or "").lower() == "gzip":
            stored_size = head.metadata.get(META_SIZE)
        else:
            stored_size = str(head.size)
        if stored_size != str(size):
            return "object in bucket has another size"
        return None


async def clean_quiet_runs(
    *, source: Path, prefix: str, manifest: Manifest, scope: Scope, store: ObjectStore,
    policy: CleanupPolicy, now: float | None = None,
) -> list[CleanupDecision]:
    """Delete what is provably in the bucket from every quiet run under ``source``.

    ``prefix``, ``scope`` and ``manifest`` must be those the push of ``source`` used (keys
    and manifest rows are looked up exactly as push wrote them). Runs still being written
    are skipped without a decision; every file of a quiet run gets one.
    """
    now = time.time() if now is None else now
    threshold_ns = math.floor((now - policy.delete_after) * 1e9)
    # Resolved like push's source, so that paths compare equal to the manifest's `source`.
    root = str(await anyio.to_thread.run_sync(source.resolve))
    verifier = _Verifier(prefix, manifest, scope, store, policy, SourceRoot(root))
    decisions: list[CleanupDecision] = []
    for run in await anyio.to_thread.run_sync(_find_runs, root, policy.run_depth):
        survey = await anyio.to_thread.run_sync(_survey_run, run, root, threshold_ns)
        if survey.busy is not None:
            log.debug("cleanup: %s: run not quiet: %s", _relative(run, root), survey.busy)
            continue
        deleted = False
        for local in sorted(survey.files, key=lambda f: f.relative):
            decision = await verifier.decide(local)
            log.info("cleanup: %s: %s (%s)", decision.path, decision.action, decision.reason)
            decisions.append(decision)
            deleted = deleted or decision.action == "deleted"
        if deleted:
            await anyio.to_thread.run_sync(_remove_empty_directories, survey.directories,
                                           root)
    return decisions
