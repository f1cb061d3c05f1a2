"""A local-directory implementation of `store.ObjectStore`, for ``file:///abs/path`` destinations.

It mirrors a run into a directory (typically an NFS or Lustre mount) with the S3 semantics the
pipeline relies on: keys are ``/``-separated paths under the root that can never name anything
outside it; every object is published atomically (temp file in its own directory, fsync,
``os.replace``) so a reader sees the old bytes or the new ones, never a mix; bodies and parts are
verified against their Content-MD5 and get S3-shaped ETags (``"<md5>"``, multipart
``"<md5 of part md5s>-<n>"``); metadata lives in a sidecar tree under ``.asyncsync-store/meta``
and multipart uploads stage their parts under ``.asyncsync-store/uploads``, neither of which is
ever listed. Each sidecar records the inode, size and mtime of the data file it describes, and
is written *before* the data is renamed into place: the data rename is the single commit point,
so a key never becomes visible without its metadata, and a reader that catches the gap between
the two renames (or the remains of a crash between them) sees a fingerprint that does not match
and either waits for the writer or falls back to hashing the bytes, so stale metadata is never
paired with other data. All blocking file I/O runs in worker threads.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread

from .config import MAX_PARTS, MIN_PART_SIZE
from .errors import (
    FatalStoreError,
    NoSuchUpload,
    NotFound,
    StoreError,
    TransientStoreError,
)
from .retry import Backoff, retry_transient
from .store import ObjectAttributes, ObjectInfo, UploadedPart

T = TypeVar("T")

RetryObserver = Callable[[TransientStoreError, int, float], None]

STATE_DIR = ".asyncsync-store"
_TMP_PREFIX = ".asyncsync-tmp-"
# Temp files live beside their target (same directory, so same filesystem, so os.replace is
# atomic even when a subdirectory is another mount); this name is how listings skip them, and
# why no key segment may look like one.
_TMP_NAME = re.compile(r"\.asyncsync-tmp-[0-9a-f]{32}")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_UPLOAD_META = "meta.json"

_READ_CHUNK = 1024 * 1024  # get_object's chunk, as s3.py reads its stream
_COPY_CHUNK = 8 * 1024 * 1024
_LIST_BATCH = 1000
# A reader that sees a sidecar and a data file that do not belong together retries this many
# times (1, 2, 4, ... ms apart): the window between a writer's two renames is microseconds on a
# local disk, a few milliseconds on NFS. After that it trusts only a hash of the bytes.
_SETTLE_TRIES = 6

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# Worth retrying: NFS/Lustre hiccups and momentary resource pressure.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ESTALE", "ETIMEDOUT", "EAGAIN", "EBUSY", "ENOLCK", "EMFILE", "ENFILE")
    if hasattr(errno, name)
)


class _KeyConflict(Exception):
    """A file tree cannot hold both ``a`` and ``a/b``, which S3 can: the second write fails."""


@dataclass(frozen=True)
class _Record:
    """A sidecar: what the store knows about one data file, bound to it by its fingerprint."""

    etag: str
    size: int
    ino: int
    mtime_ns: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_encoding: str | None = None
    content_type: str | None = None
    # Set for multipart objects, so their ETag can be recomputed from the bytes if need be.
    part_sizes: tuple[int, ...] | None = None

    def matches(self, st: os.stat_result) -> bool:
        return (self.ino, self.size, self.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)

    def bound_to(self, st: os.stat_result) -> _Record:
        return _Record(
            self.etag, st.st_size, st.st_ino, st.st_mtime_ns, self.metadata,
            self.content_encoding, self.content_type, self.part_sizes,
        )

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "version": 1,
            "etag": self.etag,
            "size": self.size,
            "ino": self.ino,
            "mtime_ns": self.mtime_ns,
            "metadata": dict(self.metadata),
            "content_encoding": self.content_encoding,
            "content_type": self.content_type,
            "part_sizes": list(self.part_sizes) if self.part_sizes is not None else None,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> _Record | None:
        """The record, or None if it is damaged (then it is as good as absent)."""
        try:
            data = json.loads(raw)
            metadata = data["metadata"]
            parts = data.get("part_sizes")
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                return None
            return cls(
                etag=str(data["etag"]),
                size=int(data["size"]),
                ino=int(data["ino"]),
                mtime_ns=int(data["mtime_ns"]),
                metadata=metadata,
                content_encoding=_optional_str(data.get("content_encoding")),
                content_type=_optional_str(data.get("content_type")),
                part_sizes=tuple(int(p) for p in parts) if parts is not None else None,
            )
        except (ValueError, TypeError, KeyError):
            return None


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _attributes_json(attributes: ObjectAttributes) -> dict[str, Any]:
    return {
        # S3 stores user metadata names in lower case (they travel as HTTP headers).
        "metadata": {k.lower(): v for k, v in attributes.metadata.items()},
        "content_encoding": attributes.content_encoding,
        "content_type": attributes.content_type,
    }


def _quoted(md5_hex: str) -> str:
    return f'"{md5_hex}"'


def _bare_etag(etag: str) -> str:
    # CompleteMultipartUpload accepts part ETags with or without their quotes.
    return etag.strip().strip('"').lower()


def _multipart_etag(digests: Sequence[bytes]) -> str:
    return _quoted(f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _open_temp(directory: str) -> tuple[int, str]:
    path = os.path.join(directory, _TMP_PREFIX + uuid.uuid4().hex)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
    return fd, path


def _finish_temp(fd: int) -> os.stat_result:
    """Make the temp file durable and take its fingerprint (os.replace keeps the inode)."""
    os.fsync(fd)
    return os.fstat(fd)


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some filesystems refuse fsync on a directory; their renames are durable anyway.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_file_atomically(path: str, data: bytes) -> os.stat_result:
    """Write ``path`` through a temp file in its directory; return the new file's stat."""
    directory = os.path.dirname(path)
    fd, temp = _open_temp(directory)
    try:
        try:
            _write_all(fd, data)
            st = _finish_temp(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        _discard(temp)
        raise
    _fsync_dir(directory)
    return st


def _read_small(path: str) -> bytes | None:
    """A sidecar's bytes, or None if there is none."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _read_record(path: str) -> _Record | None:
    raw = _read_small(path)
    return None if raw is None else _Record.from_json(raw)


def _open_regular(path: str) -> tuple[int, os.stat_result] | None:
    """An fd on the regular file at ``path`` and its stat, or None if there is none.

    Opening (rather than stat-ing) also revalidates NFS's attribute cache (close-to-open).
    The last component is not followed if it is a symlink: the store never writes one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def _hash_range(fd: int, offset: int, length: int) -> bytes:
    """MD5 digest of ``length`` bytes at ``offset`` (fewer if the file is shorter)."""
    digest = hashlib.md5()
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_COPY_CHUNK, length - done), offset + done)
        if not chunk:
            break
        digest.update(chunk)
        done += len(chunk)
    return digest.digest()


def _content_etag(fd: int, size: int, part_sizes: Sequence[int] | None) -> str:
    """The ETag of the bytes themselves: multipart-shaped when the part layout fits them."""
    if part_sizes and sum(part_sizes) == size:
        digests: list[bytes] = []
        offset = 0
        for part_size in part_sizes:
            digests.append(_hash_range(fd, offset, part_size))
            offset += part_size
        return _multipart_etag(digests)
    return _quoted(_hash_range(fd, 0, size).hex())


def _record_for(fd: int, st: os.stat_result, record_path: str) -> _Record:
    """The sidecar that belongs to the open data file ``fd``, judged by the bytes.

    Called when the fingerprints disagree for good: what a crash between the two renames, two
    writers racing on one key, or a copy of the tree (new inodes) left behind. The sidecar is
    kept only if its ETag is the bytes' ETag; otherwise the object is reported as S3 would
    report a file put there without metadata: a plain MD5 ETag and no metadata.
    """
    record = _read_record(record_path)
    if record is not None and record.matches(st):
        return record
    plain: str | None = None
    if record is not None and record.size == st.st_size:
        etag = _content_etag(fd, st.st_size, record.part_sizes)
        if etag == record.etag:
            return record.bound_to(st)
        if not record.part_sizes:
            plain = etag
    if plain is None:
        plain = _content_etag(fd, st.st_size, None)
    return _Record(plain, st.st_size, st.st_ino, st.st_mtime_ns)


def _settled(path: str, record_path: str) -> tuple[int, os.stat_result, _Record] | None:
    """Open the data file and the sidecar that belongs to it; None if there is no object.

    The caller owns (and closes) the returned fd.
    """
    for attempt in range(_SETTLE_TRIES):
        opened = _open_regular(path)
        if opened is None:
            return None
        fd, st = opened
        try:
            record = _read_record(record_path)
            # No sidecar at all is not a race (a sidecar is written before its data ever
            # appears): a file put there by hand, or a lost sidecar. Nothing to wait for.
            if record is not None and record.matches(st):
                return fd, st, record
            if record is None or attempt == _SETTLE_TRIES - 1:
                return fd, st, _record_for(fd, st, record_path)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        time.sleep(0.001 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _take(items: Iterator[T], count: int) -> list[T]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= count:
            break
    return batch


class FileStore:
    """A directory as a bucket: ``<root>/<key>`` holds the object, sidecars hold the rest."""

    def __init__(
        self,
        root: str,
        *,
        max_attempts: int = 3,
        backoff: Backoff | None = None,
        on_retry: RetryObserver | None = None,
    ) -> None:
        self._root = os.path.abspath(root)
        self._state = os.path.join(self._root, STATE_DIR)
        self._meta = os.path.join(self._state, "meta")
        self._uploads = os.path.join(self._state, "uploads")
        self._max_attempts = max(1, max_attempts)
        self._backoff = backoff or Backoff()
        self._on_retry = on_retry

    @property
    def root(self) -> str:
        return self._root

    @property
    def location(self) -> str:
        return f"file://{self._root}"

    # -- plumbing ------------------------------------------------------------------------

    def _where(self, op: str, key: str) -> str:
        return f"{op} {self.location}/{key}" if key else f"{op} {self.location}"

    def _translate(self, exc: OSError, op: str, key: str) -> StoreError:
        """Map an OSError to the domain hierarchy (runs in the worker thread: it may stat)."""
        number = exc.errno or 0
        code = errno.errorcode.get(number, "")
        where = self._where(op, key)
        reason = exc.strerror or type(exc).__name__
        if number in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(self._root):
            # The root went away (unmounted?): nothing else can work, and creating it again
            # would write into whatever is under the mount point.
            return FatalStoreError(
                f"{where}: {self._root} no longer exists", op=op, key=key, code=code
            )
        if number == errno.EROFS:
            return FatalStoreError(f"{where}: read-only filesystem", op=op, key=key, code=code)
        if number in _TRANSIENT_ERRNOS:
            return TransientStoreError(f"{where}: {reason} ({code})", op=op, key=key, code=code)
        return StoreError(f"{where}: {reason} ({code or number})", op=op, key=key, code=code)

    def _guarded(self, op: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StoreError:
            raise
        except _KeyConflict as exc:
            raise StoreError(
                f"{self._where(op, key)}: {exc}", op=op, key=key, code="KeyConflict"
            ) from exc
        except OSError as exc:
            raise self._translate(exc, op, key) from exc

    async def _call(self, op: str, key: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run blocking ``fn`` in a worker thread; translate its errors; retry transient ones.

        Threads are not abandoned on cancellation: a write always finishes or cleans up.
        """

        async def attempt() -> T:
            return await anyio.to_thread.run_sync(self._guarded, op, key, fn)

        if not retry:
            return await attempt()
        return await retry_transient(
            attempt, attempts=self._max_attempts, backoff=self._backoff, on_retry=self._on_retry
        )

    def _segments(self, op: str, key: str) -> list[str]:
        """The key's path segments; refuse any key that could name something outside the
        root, the store's own state, or a temp file."""
        segments = key.split("/")
        bad = (
            not key
            or key.startswith("/")
            or "\x00" in key
            or any(s in ("", ".", "..") or _TMP_NAME.fullmatch(s) for s in segments)
            or segments[0] == STATE_DIR
            or any(sep in key for sep in (os.sep, os.altsep) if sep and sep != "/")
        )
        if not bad:
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                bad = True
        if bad:
            raise StoreError(
                f"{self._where(op, '')}: invalid key {key!r} for a file store",
                op=op, key=key, code="InvalidKey",
            )
        return segments

    def _paths(self, op: str, key: str) -> tuple[str, str]:
        """(data file, sidecar) of a key."""
        segments = self._segments(op, key)
        data = os.path.join(self._root, *segments)
        record = os.path.join(self._meta, *segments[:-1], segments[-1] + ".json")
        return data, record

    def _ensure_dir(self, path: str) -> None:
        """Create ``path`` and its missing parents, but never the root itself."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if path == self._root:
                raise
            self._ensure_dir(os.path.dirname(path))
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise _KeyConflict(f"{self._relative(path)} is an object") from None
            return
        except NotADirectoryError:
            raise _KeyConflict(
                f"a parent of {self._relative(path)} is an object"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise _KeyConflict(f"{self._relative(path)} is an object")

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self._root)

    def _prepare(self, data_path: str, record_path: str) -> None:
        self._ensure_dir(os.path.dirname(data_path))
        self._ensure_dir(os.path.dirname(record_path))
        if os.path.isdir(data_path) and not os.path.islink(data_path):
            raise _KeyConflict(f"{self._relative(data_path)} holds other objects")

    def _publish(self, temp: str, data_path: str, record_path: str, record: _Record) -> None:
        """Commit a finished temp file: sidecar first, then the data rename (the commit point).

        Sidecar first means a new key is never visible without its metadata, and a crash
        between the renames leaves the old object in place (its new sidecar does not match it,
        so readers fall back to its bytes). The opposite order would expose new data under the
        old sidecar until the second rename.
        """
        _write_file_atomically(record_path, record.to_json())
        os.replace(temp, data_path)
        _fsync_dir(os.path.dirname(data_path))

    def _write_object(
        self, key: str, fill: Callable[[int], _Record], op: str
    ) -> str:
        """Write a new object through a temp file filled by ``fill`` (which returns its record
        minus fingerprint); return the ETag."""
        data_path, record_path = self._paths(op, key)
        self._prepare(data_path, record_path)
        fd, temp = _open_temp(os.path.dirname(data_path))
        try:
            try:
                record = fill(fd)
                st = _finish_temp(fd)
            finally:
                os.close(fd)
            self._publish(temp, data_path, record_path, record.bound_to(st))
        except BaseException:
            _discard(temp)
            raise
        return record.etag

    def _check_md5(self, op: str, key: str, body: bytes, md5_b64: str) -> str:
        """Verify a body against its Content-MD5 as S3 does; return the MD5 hex."""
        try:
            expected = base64.b64decode(md5_b64, validate=True)
        except (binascii.Error, ValueError):
            expected = b""
        if len(expected) != 16:
            raise StoreError(
                f"{self._where(op, key)}: the Content-MD5 is not a valid MD5 (InvalidDigest)",
                op=op, key=key, code="InvalidDigest",
            )
        actual = hashlib.md5(body)
        if actual.digest() != expected:
            # Transient, like S3's BadDigest: the body was damaged before it reached the store.
            raise TransientStoreError(
                f"{self._where(op, key)}: the body does not match its Content-MD5 (BadDigest)",
                op=op, key=key, code="BadDigest",
            )
        return actual.hexdigest()

    # -- whole objects -------------------------------------------------------------------

    async def check_bucket(self) -> None:
        await self._call("CheckRoot", "", self._check_root)

    def _check_root(self) -> None:
        op = "CheckRoot"
        try:
            st = os.stat(self._root)
        except FileNotFoundError as exc:
            raise FatalStoreError(
                f"{self.location} does not exist", op=op, code="NoSuchBucket"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise FatalStoreError(f"{self.location} is not a directory", op=op,
                                  code="NoSuchBucket")
        if not os.access(self._root, os.W_OK | os.X_OK):
            raise FatalStoreError(f"{self.location} is not writable", op=op, code="AccessDenied")
        if os.statvfs(self._root).f_flag & os.ST_RDONLY:
            raise FatalStoreError(f"{self.location} is on a read-only filesystem", op=op,
                                  code="EROFS")

    async def put_object(
        self, key: str, body: bytes, *, md5_b64: str, attributes: ObjectAttributes
    ) -> str:
        op = "PutObject"
        self._segments(op, key)
        # Verified outside the retry loop: the same bytes would fail the same way again.
        md5_hex = await self._call(
            op, key, partial(self._check_md5, op, key, body, md5_b64), retry=False
        )
        extra = _attributes_json(attributes)

        def fill(fd: int) -> _Record:
            _write_all(fd, body)
            return _Record(
                _quoted(md5_hex), len(body), 0, 0, extra["metadata"],
                extra["content_encoding"], extra["content_type"],
            )

        return await self._call(op, key, partial(self._write_object, key, fill, op))

    async def head_object(self, key: str) -> ObjectInfo | None:
        op = "HeadObject"
        data_path, record_path = self._paths(op, key)
        return await self._call(op, key, partial(self._head, key, data_path, record_path))

    @staticmethod
    def _head(key: str, data_path: str, record_path: str) -> ObjectInfo | None:
        found = _settled(data_path, record_path)
        if found is None:
            return None
        fd, st, record = found
        os.close(fd)
        return ObjectInfo(
            key=key, size=st.st_size, etag=record.etag, metadata=dict(record.metadata),
            content_encoding=record.content_encoding,
        )

    async def get_object(self, key: str) -> AsyncIterator[bytes]:
        op = "GetObject"
        data_path, _ = self._paths(op, key)
        fd = await self._call(op, key, partial(self._open_for_get, op, key, data_path))
        try:
            while True:
                # Reads go on from the one fd: a concurrent replace does not mix versions.
                chunk = await self._call(op, key, partial(os.read, fd, _READ_CHUNK), retry=False)
                if not chunk:
                    return
                yield chunk
        finally:
            # Closing a read-only fd does not block (nothing to flush), and an async generator
            # being closed may not be able to await.
            os.close(fd)

    def _open_for_get(self, op: str, key: str, data_path: str) -> int:
        opened = _open_regular(data_path)
        if opened is None:
            raise NotFound(f"{self._where(op, key)}: not found", op=op, key=key, code="NoSuchKey")
        return opened[0]

    async def copy_object(self, source_key: str, key: str) -> str:
        op = "CopyObject"
        source_path, source_record = self._paths(op, source_key)
        self._segments(op, key)
        return await self._call(
            op, key, partial(self._copy, op, source_key, source_path, source_record, key)
        )

    def _copy(
        self, op: str, source_key: str, source_path: str, source_record: str, key: str
    ) -> str:
        found = _settled(source_path, source_record)
        if found is None:
            raise NotFound(
                f"{self._where(op, source_key)}: not found", op=op, key=source_key,
                code="NoSuchKey",
            )
        source_fd, st, record = found
        try:

            def fill(fd: int) -> _Record:
                # Like S3's CopyObject: a new single-part object, so a plain MD5 ETag.
                digest, copied = hashlib.md5(), 0
                while True:
                    chunk = os.pread(source_fd, _COPY_CHUNK, copied)
                    if not chunk:
                        break
                    digest.update(chunk)
                    _write_all(fd, chunk)
                    copied += len(chunk)
                return _Record(
                    _quoted(digest.hexdigest()), copied, 0, 0, record.metadata,
                    record.content_encoding, record.content_type,
                )

            return self._write_object(key, fill, op)
        finally:
            os.close(source_fd)

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        op = "ListObjects"
        walker = self._list(prefix)
        while True:
            # A generator cannot be resumed after it raised, so listing batches are not retried.
            batch = await self._call(op, prefix, partial(_take, walker, _LIST_BATCH), retry=False)
            for info in batch:
                yield info
            if len(batch) < _LIST_BATCH:
                return

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, as S3 lists them."""
        head, slash, tail = prefix.rpartition("/")
        start, key_prefix = self._root, ""
        if slash:
            segments = head.split("/")
            if (
                prefix.startswith("/")
                or any(s in ("", ".", "..") or "\x00" in s for s in segments)
                or segments[0] == STATE_DIR
            ):
                return  # no valid key starts with such a prefix
            start, key_prefix = os.path.join(self._root, *segments), head + "/"
        for key, path in self._walk(start, key_prefix, tail):
            found = _settled(path, self._paths("ListObjects", key)[1])
            if found is None:
                continue  # replaced by a directory since the scan: gone
            fd, st, record = found
            os.close(fd)
            yield ObjectInfo(key, st.st_size, record.etag)

    def _walk(self, directory: str, key_prefix: str, name_prefix: str) -> Iterator[tuple[str, str]]:
        """(key, path) of the regular files under ``directory``, in key order.

        Sorting each directory's entries with ``/`` appended to subdirectory names yields the
        keys in global byte order (``a-b`` < ``a/c`` < ``a0``) without sorting the whole tree.
        Symlinks are neither listed nor followed (a loop could not end a listing).
        """
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except (FileNotFoundError, NotADirectoryError):
            return
        named: list[tuple[str, str, bool]] = []
        for entry in entries:
            name = entry.name
            if not name.startswith(name_prefix) or _TMP_NAME.fullmatch(name):
                continue
            if not key_prefix and name == STATE_DIR:
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue  # not a name any key could have
            if entry.is_dir(follow_symlinks=False):
                named.append((name + "/", entry.path, True))
            elif entry.is_file(follow_symlinks=False):
                named.append((name, entry.path, False))
        named.sort()
        for sort_name, path, is_dir in named:
            if is_dir:
                yield from self._walk(path, key_prefix + sort_name, "")
            else:
                yield key_prefix + sort_name, path

    async def close(self) -> None:
        return None

    # -- multipart -----------------------------------------------------------------------

    def _upload_dir(self, op: str, key: str, upload_id: str) -> str:
        # Only our own ids name a directory: anything else could walk out of uploads/.
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise self._no_upload(op, key)
        return os.path.join(self._uploads, upload_id)

    def _no_upload(self, op: str, key: str) -> NoSuchUpload:
        return NoSuchUpload(
            f"{self._where(op, key)}: upload no longer exists", op=op, key=key,
            code="NoSuchUpload",
        )

    def _load_upload(self, op: str, key: str, upload_id: str) -> tuple[str, dict[str, Any]]:
        """The staging directory and attributes of a live upload of ``key``."""
        upload_dir = self._upload_dir(op, key, upload_id)
        raw = _read_small(os.path.join(upload_dir, _UPLOAD_META))
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError:
            meta = None
        # S3 also answers NoSuchUpload when the id belongs to another key.
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise self._no_upload(op, key)
        return upload_dir, meta

    def _gone_if_missing(self, op: str, key: str, upload_dir: str, exc: OSError) -> None:
        """An abort or complete removed the staging directory under us: NoSuchUpload."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(upload_dir):
            raise self._no_upload(op, key) from exc

    async def create_multipart_upload(self, key: str, *, attributes: ObjectAttributes) -> str:
        op = "CreateMultipartUpload"
        self._segments(op, key)
        meta = {"key": key, "created": time.time(), **_attributes_json(attributes)}
        return await self._call(op, key, partial(self._create_upload, meta))

    def _create_upload(self, meta: dict[str, Any]) -> str:
        upload_id = uuid.uuid4().hex
        self._ensure_dir(self._uploads)
        upload_dir = os.path.join(self._uploads, upload_id)
        os.mkdir(upload_dir)
        try:
            # The upload exists once meta.json does; list/upload/complete all need it.
            _write_file_atomically(
                os.path.join(upload_dir, _UPLOAD_META), json.dumps(meta).encode()
            )
            _fsync_dir(self._uploads)
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
        return upload_id

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes, *, md5_b64: str
    ) -> str:
        op = "UploadPart"
        self._segments(op, key)
        if not 1 <= part_number <= MAX_PARTS:
            raise StoreError(
                f"{self._where(op, key)}: part number {part_number} is not in 1..{MAX_PARTS}",
                op=op, key=key, code="InvalidArgument",
            )
        md5_hex = await self._call(
            op, key, partial(self._check_md5, op, key, body, md5_b64), retry=False
        )
        return await self._call(
            op, key, partial(self._store_part, op, key, upload_id, part_number, body, md5_hex)
        )

    def _store_part(
        self, op: str, key: str, upload_id: str, number: int, body: bytes, md5_hex: str
    ) -> str:
        upload_dir, _ = self._load_upload(op, key, upload_id)
        etag = _quoted(md5_hex)
        try:
            fd, temp = _open_temp(upload_dir)
            try:
                try:
                    _write_all(fd, body)
                    st = _finish_temp(fd)
                finally:
                    os.close(fd)
                # Same order as objects: the part's record, then the part itself.
                record = _Record(etag, st.st_size, st.st_ino, st.st_mtime_ns)
                _write_file_atomically(
                    os.path.join(upload_dir, f"{number}.json"), record.to_json()
                )
                os.replace(temp, os.path.join(upload_dir, str(number)))
            except BaseException:
                _discard(temp)
                raise
            _fsync_dir(upload_dir)
        except OSError as exc:
            self._gone_if_missing(op, key, upload_dir, exc)
            raise
        return etag

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        op = "ListParts"
        self._segments(op, key)
        return await self._call(op, key, partial(self._list_parts, op, key, upload_id))

    def _list_parts(self, op: str, key: str, upload_id: str) -> list[UploadedPart]:
        upload_dir, _ = self._load_upload(op, key, upload_id)
        try:
            with os.scandir(upload_dir) as scan:
                numbers = sorted(
                    int(e.name) for e in scan if e.name.isdigit() and str(int(e.name)) == e.name
                )
            parts: list[UploadedPart] = []
            for number in numbers:
                found = _settled(
                    os.path.join(upload_dir, str(number)),
                    os.path.join(upload_dir, f"{number}.json"),
                )
                if found is None:
                    continue
                fd, st, record = found
                os.close(fd)
                parts.append(UploadedPart(number, record.etag, st.st_size))
        except OSError as exc:
            self._gone_if_missing(op, key, upload_dir, exc)
            raise
        return parts

    async def complete_multipart_upload(
        self, key: str, upload_id: str, parts: list[UploadedPart]
    ) -> str:
        op = "CompleteMultipartUpload"
        self._segments(op, key)
        return await self._call(op, key, partial(self._complete, op, key, upload_id, parts))

    def _complete(self, op: str, key: str, upload_id: str, parts: list[UploadedPart]) -> str:
        upload_dir, meta = self._load_upload(op, key, upload_id)

        def refuse(message: str, code: str) -> StoreError:
            return StoreError(f"{self._where(op, key)}: {message} ({code})", op=op, key=key,
                              code=code)

        if not parts:
            raise refuse("no parts given", "MalformedXML")
        numbers = [p.part_number for p in parts]
        if any(later <= earlier for earlier, later in zip(numbers, numbers[1:], strict=False)):
            raise refuse("parts are not in ascending order", "InvalidPartOrder")
        try:
            sizes: list[int] = []
            for part in parts:
                try:
                    sizes.append(os.stat(os.path.join(upload_dir, str(part.part_number))).st_size)
                except FileNotFoundError:
                    if not os.path.isdir(upload_dir):
                        raise
                    raise refuse(f"part {part.part_number} was never uploaded",
                                 "InvalidPart") from None
            if any(size < MIN_PART_SIZE for size in sizes[:-1]):
                raise refuse(f"a part but the last is under {MIN_PART_SIZE} bytes",
                             "EntityTooSmall")

            def fill(fd: int) -> _Record:
                digests: list[bytes] = []
                copied: list[int] = []
                for part in parts:
                    opened = _open_regular(os.path.join(upload_dir, str(part.part_number)))
                    if opened is None:
                        raise refuse(f"part {part.part_number} is gone", "InvalidPart")
                    part_fd, _ = opened
                    try:
                        # The bytes are hashed as they are copied, so the given ETag is checked
                        # against what is published, not against a record of it.
                        digest, done = hashlib.md5(), 0
                        while True:
                            chunk = os.pread(part_fd, _COPY_CHUNK, done)
                            if not chunk:
                                break
                            digest.update(chunk)
                            _write_all(fd, chunk)
                            done += len(chunk)
                    finally:
                        os.close(part_fd)
                    if digest.hexdigest() != _bare_etag(part.etag):
                        raise refuse(
                            f"part {part.part_number}: ETag {part.etag} does not match the "
                            "stored part", "InvalidPart",
                        )
                    digests.append(digest.digest())
                    copied.append(done)
                return _Record(
                    _multipart_etag(digests), sum(copied), 0, 0, meta.get("metadata") or {},
                    _optional_str(meta.get("content_encoding")),
                    _optional_str(meta.get("content_type")), tuple(copied),
                )

            etag = self._write_object(key, fill, op)
        except OSError as exc:
            self._gone_if_missing(op, key, upload_dir, exc)
            raise
        # The object is published: failing now would make the caller abort and retry an
        # upload that succeeded. A staging directory left behind costs only disk space.
        with contextlib.suppress(OSError):
            self._discard_upload(upload_dir)
        return etag

    def _discard_upload(self, upload_dir: str) -> None:
        """Retire a staging directory: one rename makes the upload gone at once; the removal
        after it is best effort (what it leaves is never listed or used)."""
        trash = os.path.join(self._uploads, f".trash-{uuid.uuid4().hex}")
        try:
            os.rename(upload_dir, trash)
        except FileNotFoundError:
            return  # another abort or complete got there first
        shutil.rmtree(trash, ignore_errors=True)

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        op = "AbortMultipartUpload"
        self._segments(op, key)
        await self._call(op, key, partial(self._abort, op, key, upload_id))

    def _abort(self, op: str, key: str, upload_id: str) -> None:
        try:
            upload_dir, _ = self._load_upload(op, key, upload_id)
        except NoSuchUpload:
            return  # already gone, or not an upload of this key: S3 does nothing either
        self._discard_upload(upload_dir)


async def open_file_store(root: str, *, on_retry: RetryObserver | None = None) -> FileStore:
    """A FileStore for ``root`` (checked by `FileStore.check_bucket`, not here, as for S3)."""
    return FileStore(root, on_retry=on_retry)
