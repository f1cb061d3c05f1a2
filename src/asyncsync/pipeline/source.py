"""Opening source files in a tree that another process may be rewriting, never outside it.

Between the scan and the read, anything that can write in SRC (any training script on a
shared node) can swap a file, or a directory on its path, for a symlink to something else:
``/var/run/secrets/...``, another user's files. A read by path would follow it. So every read
starts from the root's descriptor and opens one component at a time relative to the last,
none of them following a symlink (``O_NOFOLLOW``, ``O_DIRECTORY`` for directories), and the
opened descriptor must be a regular file with the device and inode the scan recorded. A file
that fails this is never read: `SourceNotRegular` (a symlink or something else now) or
`SourceChanged` (another regular file now: read it again once it is stat()ed afresh).

With ``--follow-symlinks`` a link is resolved once, and its target is then opened through the
same walk from the root's real path: what is opened is proven to lie inside SRC by the walk
itself, not by a string test on a path that can change underneath.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import Protocol

from ..errors import SourceChanged, SourceNotRegular, SourceVanished
from .place import open_directory_beneath

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a FIFO swapped in must not hang the open (fstat then refuses it); reads of
# a regular file ignore the flag.
_FILE_FLAGS = (
    os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    | _CLOEXEC
)


@dataclass(frozen=True, slots=True)
class SourceRoot:
    """The directory a tree's files are opened beneath (one per scan, shared by its files)."""

    path: str  # absolute, as the scan spells it; itself trusted (the user named it)
    follow_symlinks: bool = False


class SourceFile(Protocol):
    """What a read needs to know of a file: where it is, beneath what, and what it was."""

    @property
    def path(self) -> str: ...  # absolute: root.path + "/" + the path inside the root
    @property
    def root(self) -> SourceRoot: ...
    @property
    def device(self) -> int: ...
    @property
    def inode(self) -> int: ...


def describe_mode(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class OpenedSource:
    """A regular file opened beneath its root, with its directory's descriptor, so that
    "is the name still this file?" is asked of that directory, not of a path again."""

    __slots__ = ("fd", "parent", "name", "path")

    def __init__(self, fd: int, parent: int, name: str, path: str) -> None:
        self.fd = fd
        self.parent = parent
        self.name = name
        self.path = path

    def stat_name(self) -> os.stat_result:
        """What the file's name in its directory is now (not followed if a link)."""
        try:
            return os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise SourceVanished(f"{self.path}: vanished while it was read") from exc

    def close(self) -> None:
        try:
            os.close(self.fd)
        finally:
            os.close(self.parent)

    def __enter__(self) -> OpenedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(source: SourceFile) -> OpenedSource:
    """Open ``source`` for reading beneath its root, or raise: `SourceVanished`,
    `SourceNotRegular` (a symlink or special file now, on the path or at the end),
    `SourceChanged` (another file than the scan saw), or OSError (cannot read)."""
    parent, name = _open_parent(source)
    try:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _translate(exc, source.path, "") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceNotRegular(f"replaced by {describe_mode(st.st_mode)}; not read")
            if (st.st_dev, st.st_ino) != (source.device, source.inode):
                raise SourceChanged(f"{source.path}: replaced since the scan")
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.close(parent)
        raise
    return OpenedSource(fd, parent, name, source.path)


@dataclass(frozen=True, slots=True)
class SourcePath:
    """A `SourceFile` that is not a scan's (a staged copy, a file cleanup verifies)."""

    path: str
    root: SourceRoot
    device: int
    inode: int

    @classmethod
    def of(cls, path: str, root: str, st: os.stat_result) -> SourcePath:
        return cls(path, SourceRoot(root), st.st_dev, st.st_ino)


def stat_source(path: str, root: SourceRoot) -> os.stat_result:
    """The regular file at ``path`` now, reached as `open_source` reaches it (a re-read
    after a change starts from this stat)."""
    parent, name = _open_parent(SourcePath(path, root, -1, -1))
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as exc:
        raise _translate(exc, path, "") from exc
    finally:
        os.close(parent)
    if not stat.S_ISREG(st.st_mode):
        raise SourceNotRegular(f"replaced by {describe_mode(st.st_mode)}; not read")
    return st


def read_beneath(path: str, root: str) -> bytes:
    """The whole of the regular file at ``path``, opened as `open_source` opens a file, for
    small files read outside the upload path (results.csv for the run record)."""
    parent, name = open_parent(path, root)
    try:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _translate(exc, path, "") from exc
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceNotRegular(f"replaced by {describe_mode(st.st_mode)}; not read")
        chunks = []
        while chunk := os.read(fd, max(st.st_size, 65536)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_parent(path: str, root: str) -> tuple[int, str]:
    """The descriptor of the directory holding ``path``, reached from ``root`` without
    following any link, and the last name of ``path`` (what cleanup unlinks and rmdirs
    by: a directory swapped for a symlink cannot redirect either outside the tree)."""
    return _open_parent(SourcePath(path, SourceRoot(root), -1, -1))


def _open_parent(source: SourceFile) -> tuple[int, str]:
    """The descriptor of the directory holding ``source`` (reached from the root without
    following any link) and the file's name in it."""
    root = source.root
    if root.follow_symlinks:
        base, parts = _resolved_parts(source.path, root.path)
    else:
        base, parts = root.path, _parts_beneath(source.path, root.path)
    try:
        fd = open_directory_beneath(base, parts[:-1])
    except OSError as exc:
        if exc.filename in (base, None):
            raise _translate(exc, source.path, "the source directory") from exc
        raise _translate(exc, source.path, f"directory {exc.filename!r} on its path") from exc
    return fd, parts[-1]


def _parts_beneath(path: str, root: str) -> list[str]:
    base = os.path.join(root, "")
    if not path.startswith(base):
        raise SourceNotRegular(f"not inside the source {root}; not read")
    parts = path[len(base):].split(os.sep)
    if any(part in ("", ".", "..") for part in parts):
        raise SourceNotRegular("not a plain path inside the source; not read")
    return parts


def _resolved_parts(path: str, root: str) -> tuple[str, list[str]]:
    """--follow-symlinks: the link resolved once, and the target's components below the
    root's real path (the walk that follows then proves it is there, link by link)."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(path)
    if target == real_root or os.path.commonpath([real_root, target]) != real_root:
        raise SourceNotRegular("symlink pointing outside the source; not read")
    return real_root, _parts_beneath(target, real_root)


def _translate(exc: OSError, path: str, what: str) -> OSError | SourceVanished | SourceNotRegular:
    if isinstance(exc, FileNotFoundError):
        return SourceVanished(f"{path}: vanished before upload")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        # O_NOFOLLOW answers ELOOP for a final symlink (EMLINK on some BSDs); O_DIRECTORY
        # answers ENOTDIR for a symlink or file where a directory was.
        if not what:
            return SourceNotRegular("replaced by a symlink; not read")
        return SourceNotRegular(f"{what} was replaced by a symlink or file; not read")
    return exc
