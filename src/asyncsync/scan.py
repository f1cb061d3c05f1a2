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
from typing import Any

import anyio.to_thread

from .keys import PathFilter


@dataclass(slots=True)
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
_FILE_TYPE, _REGULAR, _DIRECTORY = stat.S_IFMT(0o170000), stat.S_IFREG, stat.S_IFDIR
# Directories listed per worker-thread call: one hop per directory would cost more than
# the stat calls of a small directory.
_DIRECTORIES_PER_CALL = 64


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name
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


class StatCache:
    """What the previous scan saw, so that a repeated scan reports only what changed.

    The watch daemon rescans the same tree every few seconds; comparing each unchanged file
    with the manifest again would cost more CPU than the stat itself. With a cache, the
    walk (in its worker thread) drops files whose size, mtime and inode are what the last
    scan saw, and each scan ends with the paths that disappeared since.
    """

    def __init__(self) -> None:
        # rel -> [(size, mtime_ns, inode), number of the last scan that saw it]
        self._entries: dict[str, list[Any]] = {}
        self._generation = 0

    def begin(self) -> None:
        self._generation += 1

    def view(self) -> tuple[dict[str, list[Any]], int]:
        """The table and this scan's number; `_Walker.list_directory` reads and updates them
        inline (a file unchanged since the last scan costs one lookup, no new objects)."""
        return self._entries, self._generation

    def forget(self, rel: str) -> None:
        """Report ``rel`` again on the next scan even if it does not change."""
        self._entries.pop(rel, None)

    def end(self) -> list[str]:
        """The paths seen before but not in this scan (removed since), now forgotten."""
        gone = [rel for rel, entry in self._entries.items() if entry[1] != self._generation]
        for rel in gone:
            del self._entries[rel]
        return gone


class _Walker:
    def __init__(self, root: str, options: ScanOptions, cache: StatCache | None = None) -> None:
        self.root = root
        self.options = options
        self.cache = cache
        self.real_root = os.path.realpath(root)
        # Hot path: tens of thousands of entries per second go through list_directory.
        self.filtering = bool(options.path_filter.include or options.path_filter.exclude)

    def _inside_root(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def _accepts(self, rel: str) -> bool:
        return not self.filtering or self.options.path_filter.accepts(rel)

    def list_directory(
        self, directory: str, prefix: str, ancestors: frozenset[DirIdentity]
    ) -> tuple[list[ScanItem], list[tuple[str, str, frozenset[DirIdentity]]]]:
        """One directory (``prefix``: its relative path plus '/', or '' for the root): its
        files and issues, and the subdirectories to visit later, each with the identities
        of the directories above it (for symlink loop detection)."""
        items: list[ScanItem] = []
        subdirs: list[tuple[str, str, frozenset[DirIdentity]]] = []
        try:
            with os.scandir(directory) as it:
                # Sorted for a stable order (push's output, tests); a cached rescan only
                # looks for changes, in any order.
                entries = list(it) if self.cache is not None else sorted(it, key=_name)
        except FileNotFoundError:
            return [ScanIssue(prefix.rstrip("/") or ".", "directory vanished during the scan")], []
        except OSError as exc:
            message = f"cannot list directory: {exc.strerror}"
            return [ScanIssue(prefix.rstrip("/") or ".", message, failed=True)], []
        follow = self.options.follow_symlinks
        skip = self.options.skip_paths
        # `StatCache.unchanged`, inlined: this loop runs for every file of every rescan.
        seen, generation = self.cache.view() if self.cache is not None else (None, 0)
        for entry in entries:
            rel = prefix + entry.name
            if skip and rel in skip:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not follow and st.st_mode & _FILE_TYPE == _DIRECTORY:
                    subdirs.append((entry.path, rel + "/", ancestors))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    if not self._accepts(rel) and not entry.is_dir():
                        continue
                    if not follow:
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
            if st.st_mode & _FILE_TYPE == _REGULAR:
                if self.filtering and not self.options.path_filter.accepts(rel):
                    continue
                if seen is not None:
                    file_identity = (st.st_size, st.st_mtime_ns, st.st_ino)
                    known = seen.get(rel)
                    if known is not None and known[0] == file_identity:
                        known[1] = generation
                        continue
                    seen[rel] = [file_identity, generation]
                items.append(ScannedFile(entry.path, rel, st.st_size, st.st_mtime_ns, st.st_ino))
            elif stat.S_ISDIR(st.st_mode):
                # Only a followed symlink can lead back to a directory above it (hard links
                # to directories do not exist); aliases elsewhere are simply followed.
                identity = (st.st_dev, st.st_ino)
                if identity in ancestors:
                    items.append(ScanIssue(rel, "skipped symlink loop"))
                    continue
                subdirs.append((entry.path, rel + "/", ancestors | {identity}))
            elif self._accepts(rel):
                items.append(ScanIssue(rel, f"skipped: {_describe_special(st.st_mode)}"))
        return items, subdirs


async def scan_tree(root: str, options: ScanOptions | None = None) -> AsyncIterator[ScanItem]:
    """Yield every regular file under ``root`` (and issues), depth first, names sorted."""
    async for batch in scan_directories(root, options):
        for item in batch:
            yield item


async def scan_directories(
    root: str, options: ScanOptions | None = None, cache: StatCache | None = None
) -> AsyncIterator[list[ScanItem]]:
    """The same walk, one directory's files and issues at a time (for batched lookups).
    With ``cache``, files unchanged since the cache's previous scan are left out; the
    caller brackets the walk with `StatCache.begin` and `StatCache.end`."""
    walker = _Walker(root, options or ScanOptions(), cache)
    root_stat = os.stat(root)
    stack = [(root, "", frozenset({(root_stat.st_dev, root_stat.st_ino)}))]
    while stack:
        for items in await anyio.to_thread.run_sync(_walk_some, walker, stack):
            yield items


def _walk_some(walker: _Walker, stack: list[tuple[str, str, frozenset[DirIdentity]]]
               ) -> list[list[ScanItem]]:
    """List directories off the stack (in the worker thread; the event loop waits for this
    call, so the stack is never touched by both) until enough files are found."""
    batches: list[list[ScanItem]] = []
    found = 0
    for _ in range(_DIRECTORIES_PER_CALL):
        if not stack or found >= 1000:
            break
        items, subdirs = walker.list_directory(*stack.pop())
        if items:
            batches.append(items)
            found += len(items)
        # Reversed so that the pop() order visits subdirectories alphabetically.
        stack.extend(reversed(subdirs))
    return batches

