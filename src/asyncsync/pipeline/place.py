"""Placing files beneath a root directory: which path a key may name, and atomic publication.

Shared by the ``file://`` store (objects under its root) and by whatever writes downloaded
objects into a local tree. A key is split into path segments and refused when any segment
could lead anywhere but one level down (empty, ``.``, ``..``), so containment is decided on
segments, never on string prefixes (``/data/run`` is a string prefix of ``/data/run2``).
Directories are then reached one segment at a time from the root's descriptor without
following a symlink, so a link planted in the tree cannot carry a write outside it either.
A file is published by writing a temp file in its final directory (same filesystem, so the
rename is atomic), fsyncing it, renaming it over the final name and fsyncing the directory:
a crash leaves the old file or the new one under the final name, never a partial one.
A temp file is locked by its writer until it is renamed, so one left by a writer that died
(killed, or its machine) can be told from one still being written, and removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

# Temp files start with this; listings skip such names, so no key segment may have it.
TEMP_PREFIX = ".asyncsync-tmp-"
# The names `temp_name` makes (and the uuid4 hex it once used): what `remove_stale_temps` may
# remove. Other names with the prefix (a ranged download kept to resume) are left alone.
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + "[0-9a-f]{32}")
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NOFOLLOW with O_DIRECTORY: a symlink fails (ENOTDIR on Linux) instead of being entered.
_DIRECTORY_BENEATH = _DIRECTORY | os.O_NOFOLLOW


class UnsafeKey(ValueError):
    """A key that cannot name a file beneath the root (the reason is the message)."""


def key_segments(
    key: str, *, reserved: Collection[str] = (), allow_backslash: bool = True
) -> list[str]:
    """The path segments ``key`` names beneath a root; UnsafeKey if it could name anything
    else: a leading ``/`` or an empty, ``.`` or ``..`` segment, a NUL, a segment that is a
    temp file's name, or a first segment in ``reserved``. A backslash is an ordinary
    character of a POSIX name (push keeps it); ``allow_backslash=False`` refuses it, for
    keys that may have been written by tools for which it separates directories."""
    if "\x00" in key:
        raise UnsafeKey(f"key {key!r} contains a NUL byte")
    if not allow_backslash and "\\" in key:
        raise UnsafeKey(f"key {key!r} contains a backslash")
    segments = key.split("/")  # '' and a leading '/' both give an empty segment
    for segment in segments:
        if segment in ("", ".", ".."):
            raise UnsafeKey(f"key {key!r} has an empty, '.' or '..' segment")
        if segment.startswith(TEMP_PREFIX):
            raise UnsafeKey(f"key {key!r} has a segment starting with {TEMP_PREFIX!r}")
    if segments[0] in reserved:
        raise UnsafeKey(f"key {key!r} lies in the reserved {segments[0]!r}")
    return segments


def open_directory_beneath(root: str, parents: Sequence[str], *, create: bool = False) -> int:
    """A descriptor of ``root/parents...`` (the caller closes it), reached one segment at a
    time from ``root`` without following a symlink below it (one fails with ENOTDIR, like a
    file on the way; the OSError names the segment). ``create`` makes missing directories
    below the root, never the root itself: a vanished root (an unmounted volume) must fail,
    not be recreated empty. The source reads of `source.open_source` walk the same way."""
    fd = os.open(root, _DIRECTORY)  # the root itself may be a link: the user named it
    try:
        for segment in parents:
            try:
                child = os.open(segment, _DIRECTORY_BENEATH, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made by a concurrent writer
                    os.mkdir(segment, 0o777, dir_fd=fd)
                child = os.open(segment, _DIRECTORY_BENEATH, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def directory_beneath(root: str, parents: Sequence[str], *, create: bool = False) -> Iterator[int]:
    """`open_directory_beneath`, closed on leaving. ``parents`` come from `key_segments`."""
    fd = open_directory_beneath(root, parents, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def temp_name() -> str:
    """A fresh temp file name: unique, so concurrent writers of one name never share one."""
    # 128 random bits, as uuid4 has (the uuid module imports platform: 4 ms on every start).
    return TEMP_PREFIX + os.urandom(16).hex()


def fsync_directory(directory: int) -> None:
    """Make the renames in ``directory`` durable: without it a crash may undo them."""
    os.fsync(directory)


def publish(directory: int, temp: str, name: str) -> None:
    """Rename the (already fsynced) temp file over ``name`` in ``directory``, durably. A
    symlink or file under ``name`` is replaced itself, never written through."""
    os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
    fsync_directory(directory)


def create_temp(directory: int) -> tuple[str, int]:
    """A new temp file in ``directory``, open for writing and locked: its name and descriptor.
    Closing the descriptor releases the lock, so close it only once the file is renamed or
    removed: until then `remove_stale_temps` (in this process or another) leaves it alone."""
    temp = temp_name()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666,
                 dir_fd=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        raise
    return temp, fd


def remove_stale_temps(directory: int) -> list[str]:
    """Remove the temp files in ``directory`` that no writer holds any more (left by one that
    was killed before it renamed or removed them); return their names. Best effort: what
    cannot be inspected or removed is left as it is."""
    try:
        with os.scandir(directory) as entries:
            names = [entry.name for entry in entries if _TEMP_NAME.fullmatch(entry.name)
                     and entry.is_file(follow_symlinks=False)]
    except OSError:
        return []
    removed = []
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=directory)
        except OSError:
            continue  # renamed or removed by its writer since the listing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.unlink(name, dir_fd=directory)
                removed.append(name)
        except OSError:
            continue  # locked: a live writer's (BlockingIOError); or gone meanwhile
        finally:
            os.close(fd)
    return removed


def write_atomically(
    directory: int, name: str, fill: Callable[[int], T], *,
    before_publish: Callable[[os.stat_result, T], None] | None = None,
) -> T:
    """Write ``name`` in ``directory`` through a temp file beside it and return what ``fill``
    (given the temp file's descriptor) returned. ``before_publish`` runs after the fsync
    with the temp file's stat (which the rename keeps: same inode, same mtime), so anything
    describing the file can be written first and the rename stays the one commit point.
    On any failure the temp file is removed and the final name is left as it was."""
    temp, fd = create_temp(directory)
    try:
        try:
            result = fill(fd)
            os.fsync(fd)
            if before_publish is not None:
                before_publish(os.fstat(fd), result)
            publish(directory, temp, name)
        finally:
            os.close(fd)  # after the rename: the lock covers the temp file's whole life
    except BaseException:
        # Gone already if the rename happened; whatever else fails here, the first error is
        # the one to report (a temp file that cannot be removed now is stale once unlocked).
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=directory)
        raise
    return result
