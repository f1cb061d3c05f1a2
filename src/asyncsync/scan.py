"""Stage 1, scan: walk a source tree and stream what it holds, one directory at a time.

The walk yields as it goes, so uploading starts before it ends, and it holds at most one
directory listing plus the stack of directories still to visit, whatever the tree size.
Each directory is listed and stat()ed in a worker thread: the event loop never blocks on
the disk. Only regular files are yielded; everything else becomes a `ScanIssue`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio.to_thread

from .keys import PathFilter


@dataclass(frozen=True, slots=True)
class ScannedFile:
    path: str  # absolute local path
    relative: str  # POSIX path relative to the source root
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True, slots=True)
class ScanIssue:
    relative: str
    message: str
    failed: bool = False  # True: counts as a failed file (unreadable); False: a warning


ScanItem = ScannedFile | ScanIssue
DirIdentity = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class ScanOptions:
    follow_symlinks: bool = False
    path_filter: PathFilter = PathFilter()
    # Directory names never descended into, relative to the root (e.g. the state directory
    # when it lives inside the tree: the manifest never uploads itself).
    skip_paths: frozenset[str] = frozenset()


def _describe_special(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class _Walker:
    def __init__(self, root: str, options: ScanOptions) -> None:
        self.root = root
        self.options = options
        self.real_root = os.path.realpath(root)

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def _inside_root(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def list_directory(
        self, directory: str, ancestors: frozenset[DirIdentity]
    ) -> tuple[list[ScanItem], list[tuple[str, frozenset[DirIdentity]]]]:
        """One directory: its files and issues, and the subdirectories to visit later, each
        with the identities of the directories above it (for loop detection)."""
        items: list[ScanItem] = []
        subdirs: list[tuple[str, frozenset[DirIdentity]]] = []
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            rel = self._relative(directory)
            return [ScanIssue(rel, "directory vanished during the scan")], []
        except OSError as exc:
            rel = self._relative(directory)
            return [ScanIssue(rel, f"cannot list directory: {exc.strerror}", failed=True)], []
        for entry in entries:
            rel = self._relative(entry.path)
            if rel in self.options.skip_paths:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    if not self.options.path_filter.accepts(rel) and not entry.is_dir():
                        continue
                    if not self.options.follow_symlinks:
                        items.append(ScanIssue(rel, "skipped symlink (see --follow-symlinks)"))
                        continue
                    if not self._inside_root(entry.path):
                        items.append(ScanIssue(rel, "skipped symlink pointing outside the source"))
                        continue
                    st = os.stat(entry.path)
            except FileNotFoundError:
                items.append(ScanIssue(rel, "vanished during the scan"))
                continue
            except OSError as exc:
                items.append(ScanIssue(rel, f"cannot stat: {exc.strerror}", failed=True))
                continue
            if stat.S_ISDIR(st.st_mode):
                # Only a followed symlink can lead back to a directory above it (hard links
                # to directories do not exist); aliases elsewhere are simply followed.
                identity = (st.st_dev, st.st_ino)
                if identity in ancestors:
                    items.append(ScanIssue(rel, "skipped symlink loop"))
                    continue
                subdirs.append((entry.path, ancestors | {identity}))
            elif stat.S_ISREG(st.st_mode):
                if self.options.path_filter.accepts(rel):
                    items.append(
                        ScannedFile(entry.path, rel, st.st_size, st.st_mtime_ns, st.st_ino)
                    )
            elif self.options.path_filter.accepts(rel):
                items.append(ScanIssue(rel, f"skipped: {_describe_special(st.st_mode)}"))
        return items, subdirs


async def scan_tree(root: str, options: ScanOptions | None = None) -> AsyncIterator[ScanItem]:
    """Yield every regular file under ``root`` (and issues), depth first, names sorted."""
    walker = _Walker(root, options or ScanOptions())
    root_stat = os.stat(root)
    stack = [(root, frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while stack:
        directory, ancestors = stack.pop()
        items, subdirs = await anyio.to_thread.run_sync(
            walker.list_directory, directory, ancestors
        )
        for item in items:
            yield item
        # Reversed so that the pop() order visits subdirectories alphabetically.
        stack.extend(reversed(subdirs))

