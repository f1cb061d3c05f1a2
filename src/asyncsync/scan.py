"""Stage 1, scan: walk a source tree and stream what it holds, one directory at a time.

The walk yields as it goes, so uploading starts before it ends, and it holds at most one
directory listing plus the stack of directories still to visit, whatever the tree size.
Directories are listed and stat()ed in chunks: on the event loop's thread while a chunk
takes milliseconds, in a worker thread as soon as one does not (a slow disk never stalls the
uploads for long). Only regular files are yielded; everything else becomes a `ScanIssue`.
"""

from __future__ import annotations

import asyncio
import operator
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .inline import InlineGate
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
_FILE_TYPE, _REGULAR, _DIRECTORY, _LINK = 0o170000, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
# Directories listed per worker-thread call: one hop per directory would cost more than
# the stat calls of a small directory.
_DIRECTORIES_PER_CALL = 64
# A chunk of the walk (up to 64 directories or ~1,000 files) runs on the event loop's own
# thread while chunks take less than this (see inline.py): a few milliseconds on a local
# disk, where a worker thread measured 15% slower on a no-op re-run.
_INLINE_CHUNK_SECONDS = 0.05


# Sort key of directory entries (attrgetter runs in C: a thousand entries per directory).
_name = operator.attrgetter("name")

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

    def _through_link(
        self, entry: os.DirEntry[str], rel: str, items: list[ScanItem]
    ) -> os.stat_result | None:
        """What a symlink points to, when it is followed; None (and maybe an issue) when not."""
        if not self._accepts(rel) and not entry.is_dir():
            return None
        if not self.options.follow_symlinks:
            items.append(ScanIssue(rel, "skipped symlink (see --follow-symlinks)"))
            return None
        if not self._inside_root(entry.path):
            items.append(ScanIssue(rel, "skipped symlink pointing outside the source"))
            return None
        return os.stat(entry.path)

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
        filtering, accepts = self.filtering, self.options.path_filter.accepts
        # `StatCache.unchanged`, inlined: this loop runs for every file of every rescan.
        seen, generation = self.cache.view() if self.cache is not None else (None, 0)
        for entry in entries:
            rel = prefix + entry.name
            if skip and rel in skip:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                kind = st.st_mode & _FILE_TYPE
                if kind == _LINK:
                    followed = self._through_link(entry, rel, items)
                    if followed is None:
                        continue
                    st, kind = followed, followed.st_mode & _FILE_TYPE
            except FileNotFoundError:
                items.append(ScanIssue(rel, "vanished during the scan"))
                continue
            except OSError as exc:
                items.append(ScanIssue(rel, f"cannot stat: {exc.strerror}", failed=True))
                continue
            if kind == _REGULAR:
                if filtering and not accepts(rel):
                    continue
                if seen is not None:
                    file_identity = (st.st_size, st.st_mtime_ns, st.st_ino)
                    known = seen.get(rel)
                    if known is not None and known[0] == file_identity:
                        known[1] = generation
                        continue
                    seen[rel] = [file_identity, generation]
                items.append(ScannedFile(entry.path, rel, st.st_size, st.st_mtime_ns, st.st_ino))
            elif kind == _DIRECTORY:
                if not follow:
                    subdirs.append((entry.path, rel + "/", ancestors))
                    continue
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
    loop = asyncio.get_running_loop()
    # A slow disk (NFS, a cold cache) must not stall the uploads on this loop.
    inline = InlineGate(slow_seconds=_INLINE_CHUNK_SECONDS, strikes=3)
    while stack:
        if inline.open:
            started = time.perf_counter()
            batches = _walk_some(walker, stack)
            inline.record(time.perf_counter() - started)
            for items in batches:
                yield items
            await asyncio.sleep(0)  # signals and other tasks get their turn
        else:
            for items in await loop.run_in_executor(None, _walk_some, walker, stack):
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

