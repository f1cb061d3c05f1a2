"""Stage 1, scan: walk a source tree and stream what it holds, one directory at a time.

The walk yields as it goes, so uploading starts before it ends, and it holds at most one
directory listing plus the stack of directories still to visit, whatever the tree size.
Directories are listed and stat()ed in chunks: on the event loop's thread while a chunk
takes milliseconds, in a worker thread as soon as one does not (a slow disk never stalls the
uploads for long). Only regular files are yielded; everything else becomes a `ScanIssue`.
"""

from __future__ import annotations

import asyncio
import errno
import marshal
import operator
import os
import stat
import time
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from .inline import InlineGate
from .keys import PathFilter
from .place import TEMP_PREFIX
from .source import SourceRoot, describe_mode

if TYPE_CHECKING:
    from .shard import Shard


@dataclass(slots=True)
class ScannedFile:
    path: str  # absolute local path
    relative: str  # POSIX path relative to the source root
    size: int
    mtime_ns: int
    inode: int
    device: int
    root: SourceRoot  # what the file is opened beneath: a read never leaves it


@dataclass(frozen=True, slots=True)
class ScanIssue:
    relative: str
    message: str
    failed: bool = False  # True: counts as a failed file (unreadable); False: a warning


ScanItem = ScannedFile | ScanIssue

# One regular file as the walk saw it: (name, size, mtime_ns, inode).
FileStat = tuple[str, int, int, int]


class KnownFiles(Protocol):
    """What the caller already knows about each directory's files (push: the manifest).
    Files that match exactly are not yielded one by one: `Listing.unchanged` lists them.
    Every method gets the directory's path and its relative prefix first."""

    def matches(self, directory: str, prefix: str, digest: bytes) -> bool:
        """Whether ``digest`` (of all the directory's files, as `directory_digest` makes
        it) is the one remembered for the directory: then every file is unchanged."""

    def rows(
        self, directory: str, prefix: str, names: list[str], subdirs: list[str] | None
    ) -> Container[FileStat]:
        """The known files among ``names`` (and maybe others of the directory).
        ``subdirs``: the names of its subdirectories (None: not known)."""

    def remember(self, directory: str, prefix: str, digest: bytes) -> None:
        """Every file of the directory matched a row: `matches` may say so next time."""


def directory_digest(files: list[FileStat]) -> bytes:
    """A digest of one directory's files, in the order the walk listed them. marshal
    version 2 writes no back-references, so equal lists give equal bytes."""
    return xxhash.xxh3_128_digest(marshal.dumps(files, 2))


@dataclass(slots=True)
class Listing:
    """What the walk found in one directory."""

    directory: str  # its path
    prefix: str  # its path relative to the root plus '/', or '' for the root
    items: list[ScanItem]  # files to look at, and issues; in name order unless cached
    # Files matching what `KnownFiles` knows; None when no lookup was given.
    unchanged: list[FileStat] | None = None


_FILE_TYPE, _REGULAR, _DIRECTORY, _LINK = 0o170000, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
# Directories listed per worker-thread call: one hop per directory would cost more than
# the stat calls of a small directory.
_DIRECTORIES_PER_CALL = 64
# A chunk of the walk (up to 64 directories or ~1,000 files) runs on the event loop's own
# thread while chunks take less than this (see inline.py): a few milliseconds on a local
# disk, where a worker thread measured 15% slower on a no-op re-run.
_INLINE_CHUNK_SECONDS = 0.05


# Sort keys of what a directory yields (they run in C: a thousand entries per directory).
_relative = operator.attrgetter("relative")
_subdir_relative = operator.itemgetter(1)

DirIdentity = tuple[int, int]  # (st_dev, st_ino)
# A directory still to visit: its path, its relative path plus '/', the identities of the
# directories above it (symlink loops), and its own identity as its parent's listing saw it.
PendingDirectory = tuple[str, str, frozenset[DirIdentity], DirIdentity]


@dataclass(frozen=True)
class ScanOptions:
    follow_symlinks: bool = False
    path_filter: PathFilter = PathFilter()
    # Directory names never descended into, relative to the root (e.g. the state directory
    # when it lives inside the tree: the manifest never uploads itself).
    skip_paths: frozenset[str] = frozenset()
    # push --shard: only this shard's files are walked and reported (`pipeline.shard`).
    shard: Shard | None = None


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


def _everything(relative: str) -> bool:
    return True


class _Walker:
    def __init__(self, root: str, options: ScanOptions, cache: StatCache | None = None) -> None:
        self.root = root
        self.options = options
        self.cache = cache
        self.real_root = os.path.realpath(root)
        self.source_root = SourceRoot(root, options.follow_symlinks)
        # Hot path: tens of thousands of entries per second go through list_directory.
        self.filtering = bool(options.path_filter.include or options.path_filter.exclude)

    def _inside_root(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def _accepts(self, rel: str) -> bool:
        return not self.filtering or self.options.path_filter.accepts(rel)

    def _through_link(
        self, entry: os.DirEntry[str], path: str, rel: str, items: list[ScanItem]
    ) -> os.stat_result | None:
        """What a symlink points to, when it is followed; None (and maybe an issue) when not."""
        if not self._accepts(rel) and not entry.is_dir():
            return None
        if not self.options.follow_symlinks:
            items.append(ScanIssue(rel, "skipped symlink (see --follow-symlinks)"))
            return None
        if not self._inside_root(path):
            items.append(ScanIssue(rel, "skipped symlink pointing outside the source"))
            return None
        return os.stat(path)

    def list_directory(
        self, directory: str, prefix: str, ancestors: frozenset[DirIdentity],
        identity: DirIdentity, known: KnownFiles | None = None,
    ) -> tuple[Listing, list[PendingDirectory]]:
        """One directory (``prefix``: its relative path plus '/', or '' for the root): its
        files and issues, and the subdirectories to visit later (see `PendingDirectory`)."""
        items: list[ScanItem] = []
        subdirs: list[PendingDirectory] = []
        listing = Listing(directory, prefix, items)
        base = os.path.join(directory, "")
        here = prefix.rstrip("/") or "."
        try:
            # Below the root a directory is never entered through a symlink unless links are
            # followed; one swapped in since its parent was listed is caught by its identity.
            fd, entries, opened = _open_and_list(
                directory, nofollow=bool(prefix) and not self.options.follow_symlinks
            )
        except FileNotFoundError:
            items.append(ScanIssue(here, "directory vanished during the scan"))
            return listing, []
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                items.append(ScanIssue(here, "directory replaced by a symlink during the scan; "
                                       "not entered"))
                return listing, []
            message = f"cannot list directory: {exc.strerror}"
            items.append(ScanIssue(here, message, failed=True))
            return listing, []
        if (opened.st_dev, opened.st_ino) != identity:
            os.close(fd)
            items.append(ScanIssue(here, "directory replaced during the scan; not entered"))
            return listing, []
        device = opened.st_dev
        devices: dict[str, int] = {}  # the files on another device (bind mounts): rare
        try:
            files = self._stat_entries(entries, base, prefix, ancestors, items, subdirs,
                                       device, devices)
        finally:
            os.close(fd)
        if known is not None:
            files = self._compare(files, known, listing, subdirs)
        if self.cache is not None:
            files = self._compare_with_cache(files, prefix)
        root = self.source_root
        if devices:
            items.extend([
                ScannedFile(base + name, prefix + name, size, mtime_ns, inode,
                            devices.get(name, device), root)
                for name, size, mtime_ns, inode in files
            ])
        else:
            items.extend([
                ScannedFile(base + name, prefix + name, size, mtime_ns, inode, device, root)
                for name, size, mtime_ns, inode in files
            ])
        if self.cache is None:
            # A stable order (push's output, tests), sorting only what is yielded; a cached
            # rescan only looks for changes, in any order.
            items.sort(key=_relative)
            subdirs.sort(key=_subdir_relative)
        return listing, subdirs

    def _stat_entries(
        self, entries: list[os.DirEntry[str]], base: str, prefix: str,
        ancestors: frozenset[DirIdentity], items: list[ScanItem],
        subdirs: list[PendingDirectory], device: int, devices: dict[str, int],
    ) -> list[FileStat]:
        """stat() the entries of one directory (still open, on ``device``): its regular
        files that the filter accepts are returned (those on another device also go into
        ``devices``); issues and subdirectories are appended."""
        follow = self.options.follow_symlinks
        skip = self.options.skip_paths
        filtering, accepts = self.filtering, self.options.path_filter.accepts
        files: list[FileStat] = []
        # --shard: which of this directory's files and subdirectories are this shard's. A
        # run directory that is not is never entered, so N shards stat each file once.
        shard = self.options.shard
        owns = shard.owns if shard is not None else _everything
        owned_files: bool | None = True  # None: ask `owns` per file
        subdirs_owned = True
        if shard is not None:
            if shard.by == "file":
                owned_files = None
            else:
                depth = prefix.count("/") + 1  # of this directory's entries
                owned_files = depth > shard.run_depth or shard.index == 0
                subdirs_owned = depth != shard.run_depth
        for entry in entries:
            name = entry.name
            rel = prefix + name
            if skip and rel in skip:
                continue
            if name.startswith(TEMP_PREFIX):
                # asyncsync's own, half-written: a pull's download to resume, a placement
                # under way. Never a key (place.key_segments refuses the name anyway).
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                kind = st.st_mode & _FILE_TYPE
                if kind == _LINK:
                    followed = self._through_link(entry, base + name, rel, items)
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
                if owned_files is False or (owned_files is None and not owns(rel)):
                    continue
                if not filtering or accepts(rel):
                    files.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
                    if st.st_dev != device:
                        devices[name] = st.st_dev
            elif kind == _DIRECTORY:
                if not subdirs_owned and not owns(rel):
                    continue
                identity = (st.st_dev, st.st_ino)
                if not follow:
                    subdirs.append((base + name, rel + "/", ancestors, identity))
                    continue
                # Only a followed symlink can lead back to a directory above it (hard links
                # to directories do not exist); aliases elsewhere are simply followed.
                if identity in ancestors:
                    items.append(ScanIssue(rel, "skipped symlink loop"))
                    continue
                subdirs.append((base + name, rel + "/", ancestors | {identity}, identity))
            elif self._accepts(rel):
                items.append(ScanIssue(rel, f"skipped: {describe_mode(st.st_mode)}"))
        return files

    @staticmethod
    def _compare(
        files: list[FileStat], known: KnownFiles, listing: Listing,
        subdirs: list[PendingDirectory],
    ) -> list[FileStat]:
        """Move the files ``known`` vouches for to ``listing.unchanged``; the rest stay."""
        if not files:
            listing.unchanged = []
            return files
        directory, prefix = listing.directory, listing.prefix
        digest = directory_digest(files)
        if known.matches(directory, prefix, digest):
            listing.unchanged = files  # a re-run's common case: one lookup per directory
            return []
        rows = known.rows(directory, prefix, [file[0] for file in files],
                          [pending[1][len(prefix):-1] for pending in subdirs])
        unchanged: list[FileStat] = []
        changed: list[FileStat] = []
        for file in files:
            (unchanged if file in rows else changed).append(file)
        listing.unchanged = unchanged
        if not changed:
            known.remember(directory, prefix, digest)
        return changed

    def _compare_with_cache(self, files: list[FileStat], prefix: str) -> list[FileStat]:
        """The files whose stat differs from what the cache's previous scan saw."""
        assert self.cache is not None
        seen, generation = self.cache.view()
        changed: list[FileStat] = []
        for file in files:
            rel = prefix + file[0]
            identity = file[1:]
            known_entry = seen.get(rel)
            if known_entry is not None and known_entry[0] == identity:
                known_entry[1] = generation
                continue
            seen[rel] = [identity, generation]
            changed.append(file)
        return changed


def _open_and_list(
    directory: str, *, nofollow: bool
) -> tuple[int, list[os.DirEntry[str]], os.stat_result]:
    """The directory's entries, listed through a descriptor that stays open: each entry is
    then stat()ed relative to it, so the kernel resolves a name, not the whole path again
    (15% of a no-op re-run). Also what the descriptor is. The caller closes it."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(directory, flags)
    try:
        opened = os.fstat(fd)
        with os.scandir(fd) as it:
            return fd, list(it), opened
    except BaseException:
        os.close(fd)
        raise


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
    async for listing in scan_listings(root, options, cache=cache):
        yield listing.items


async def scan_listings(
    root: str, options: ScanOptions | None = None, *, cache: StatCache | None = None,
    known: KnownFiles | None = None,
) -> AsyncIterator[Listing]:
    """The same walk as `Listing`s, directories with nothing to report left out. With
    ``known``, each directory's files are compared with what it returns: as they are
    stat()ed while the walk runs on the event loop's thread, building no object per
    unchanged file; after the worker thread's call returns once the walk has moved there
    (the lookup may use objects bound to the loop's thread, a SQLite connection)."""
    walker = _Walker(root, options or ScanOptions(), cache)
    root_stat = os.stat(root)
    root_identity = (root_stat.st_dev, root_stat.st_ino)
    stack: list[PendingDirectory] = [(root, "", frozenset({root_identity}), root_identity)]
    loop = asyncio.get_running_loop()
    # A slow disk (NFS, a cold cache) must not stall the uploads on this loop.
    inline = InlineGate(slow_seconds=_INLINE_CHUNK_SECONDS, strikes=3)
    while stack:
        if inline.open:
            started = time.perf_counter()
            listings = _walk_some(walker, stack, known)
            inline.record(time.perf_counter() - started)
            for listing in listings:
                yield listing
            await asyncio.sleep(0)  # signals and other tasks get their turn
        else:
            for listing in await loop.run_in_executor(None, _walk_some, walker, stack, None):
                if known is not None:
                    _compare_items(listing, known)
                if listing.items or listing.unchanged:
                    yield listing


def _compare_items(listing: Listing, known: KnownFiles) -> None:
    """Move the files ``known`` vouches for from ``listing.items`` to ``listing.unchanged``:
    the comparison of a listing made in the worker thread, file by file (no digest: its
    files come sorted, not in the order the inline walk digests them)."""
    start = len(listing.prefix)
    files = [item for item in listing.items if isinstance(item, ScannedFile)]
    rows = known.rows(listing.directory, listing.prefix,
                      [item.relative[start:] for item in files], None)
    unchanged: list[FileStat] = []
    changed: list[ScanItem] = []
    for item in listing.items:
        if isinstance(item, ScannedFile):
            file = (item.relative[start:], item.size, item.mtime_ns, item.inode)
            if file in rows:
                unchanged.append(file)
                continue
        changed.append(item)
    listing.items, listing.unchanged = changed, unchanged


def _walk_some(
    walker: _Walker, stack: list[PendingDirectory], known: KnownFiles | None,
) -> list[Listing]:
    """List directories off the stack (in the worker thread; the event loop waits for this
    call, so the stack is never touched by both) until enough files are found."""
    listings: list[Listing] = []
    found = 0
    for _ in range(_DIRECTORIES_PER_CALL):
        if not stack or found >= 1000:
            break
        listing, subdirs = walker.list_directory(*stack.pop(), known)
        if listing.items or listing.unchanged:
            listings.append(listing)
            found += len(listing.items) + len(listing.unchanged or ())
        # Reversed so that the pop() order visits subdirectories alphabetically.
        stack.extend(reversed(subdirs))
    return listings
