"""A local-directory `store.ObjectStore` for ``file:///abs/path`` destinations (an NFS or Lustre
mount, typically): ``<root>/<key>`` holds each object, keys can never name anything outside the
root (nor reach through a symlink in it), and every write is published atomically (temp file
beside its target, fsync, rename, directory fsync: `pipeline.place`, which whatever places
downloaded files shares) after its Content-MD5 has been checked, with S3-shaped ETags. Reads
are ranged and resumable like S3's (`retry.ResumableBody`). Metadata lives in
sidecars under ``.asyncsync-store/meta`` and multipart uploads stage their parts under
``.asyncsync-store/uploads``; neither is ever listed. A sidecar records the size, inode and
mtime of the data file it was written for and is trusted only while they still match, so stale
metadata is never paired with other bytes. Blocking I/O runs in worker threads.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, BinaryIO, TypeVar

import anyio.to_thread

from ..config import MIN_PART_SIZE
from ..errors import (
    FatalStoreError,
    NoSuchUpload,
    NotFound,
    NotSupported,
    ObjectChanged,
    StoreError,
    TransientStoreError,
)
from ..pipeline.digest import crc32_b64_of
from ..pipeline.place import (
    TEMP_PREFIX,
    UnsafeKey,
    directory_beneath,
    key_segments,
    write_atomically,
)
from .capabilities import Capabilities, Capability
from .integrity import etag_md5
from .protocol import (
    GET_CHUNK,
    MultipartUpload,
    ObjectAttributes,
    ObjectBody,
    ObjectInfo,
    UploadedPart,
)
from .retry import Backoff, RangeReader, ResumableBody, retry_transient

T = TypeVar("T")
E = TypeVar("E", bound=StoreError)
RetryObserver = Callable[[TransientStoreError, int, float], None]

STATE_DIR = ".asyncsync-store"
_RESERVED = frozenset({STATE_DIR})
_CHUNK = 1024 * 1024  # what copies and hashes read at a time
# NFS/Lustre hiccups and momentary contention: worth another try.
_TRANSIENT_ERRNOS = frozenset({errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY})


def _invalid_key(key: str) -> bool:
    try:
        key_segments(key, reserved=_RESERVED)
    except UnsafeKey:
        return True
    return False


def _attributes_json(attributes: ObjectAttributes) -> dict[str, Any]:
    # S3 keeps user metadata names in lower case (they travel as HTTP headers).
    metadata = {k.lower(): v for k, v in attributes.metadata.items()}
    encoding, content_type = attributes.content_encoding, attributes.content_type
    return {"metadata": metadata, "content_encoding": encoding, "content_type": content_type}


def _fingerprint(st: os.stat_result) -> dict[str, int]:
    # os.replace keeps the inode and mtime, so the temp file's stat is the published file's.
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_body(body: bytes, etag: str, fd: int) -> str:
    _write_all(fd, body)
    return etag


def _read_at(fd: int, size: int, offset: int) -> bytes:
    # Positioned: a failed read consumes nothing, and the one descriptor has no cursor to
    # share between a retry and what it retries.
    return os.pread(fd, size, offset)


def _append(fd: int, source: BinaryIO) -> bytes:
    """Copy ``source`` to ``fd``; return the MD5 digest of what was copied."""
    digest = hashlib.md5()
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        _write_all(fd, chunk)
    return digest.digest()


# ioctl(FICLONE): the target file shares the source's extents (btrfs, XFS, bcachefs).
_FICLONE = 0x40049409


def _clone_range(source: int, target: int, offset: int, length: int, *, whole: bool) -> None:
    """Bytes ``[offset, offset + length)`` of ``source`` written to the (empty) ``target``:
    a reflink where the filesystem has them (``whole`` files only), else copy_file_range (the
    kernel copies, or shares extents, without a trip through this process), else read and
    write. Raises OSError when fewer bytes arrive than asked for."""
    if whole and offset == 0:
        try:
            fcntl.ioctl(target, _FICLONE, source)
        except OSError:
            pass  # no reflinks here (ext4, tmpfs, NFS...), or across filesystems
        else:
            if os.fstat(target).st_size == length:
                return
            os.ftruncate(target, 0)
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(source, target, length - done, offset + done, done)
            if n == 0:
                break
            done += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                             errno.EBADF):
            raise
        while done < length and (chunk := os.pread(source, min(_CHUNK, length - done),
                                                   offset + done)):
            os.pwrite(target, chunk, done)
            done += len(chunk)
    if done != length or os.fstat(target).st_size != length:
        raise OSError(errno.EIO, f"copied {done} of {length} bytes")


def _write_json_at(directory: int, name: str, data: Mapping[str, Any]) -> None:
    write_atomically(directory, name,
                     partial(_write_body, json.dumps(data, sort_keys=True).encode(), ""))


def _sidecar_describing(record_path: str, st: os.stat_result) -> tuple[str, dict[str, Any]] | None:
    """(ETag, attributes) from the sidecar at ``record_path`` if it was written for exactly the
    file ``st`` describes (size, inode, mtime), else None: stale metadata never pairs with
    other bytes."""
    record = _read_json(record_path)
    if isinstance(record, dict) and all(record.get(k) == v for k, v in _fingerprint(st).items()):
        return str(record["etag"]), dict(record.get("attributes") or {})
    return None


def _md5_etag(fd: int, offset: int = 0, end: int | None = None) -> str:
    """What S3 shows for an object put without metadata: the MD5 of its bytes (of bytes
    ``[offset, end)`` of them, for a part copied from it)."""
    digest = hashlib.md5()
    while chunk := _read_at(fd, _CHUNK if end is None else min(_CHUNK, end - offset), offset):
        digest.update(chunk)
        offset += len(chunk)
    return f'"{digest.hexdigest()}"'


def _read_json(path: str) -> Any:
    """The JSON document at ``path``, or None if it is missing or damaged."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return None


def _describe(path: str, sidecar: str) -> tuple[os.stat_result, str, dict[str, Any]] | None:
    """Stat, ETag and attributes of the regular file at ``path`` (None for a symlink: the store
    never writes one). Without a sidecar written for it (a crash between the renames, a hand
    edit, a copy of the tree) it is what S3 shows for an object put without metadata."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if found := _sidecar_describing(sidecar, st):
        return st, *found
    with open(path, "rb") as handle:
        return st, f'"{hashlib.file_digest(handle, "md5").hexdigest()}"', {}


def _walk(directory: str, meta: str, key_prefix: str, name_prefix: str) -> Iterator[ObjectInfo]:
    """The objects under ``directory`` (sidecars under ``meta``) whose names start with
    ``name_prefix``, in key order: sorting each directory with ``/`` appended to subdirectory
    names yields S3's order (``a-b`` < ``a/c`` < ``a0``) without sorting the whole tree."""
    try:
        with os.scandir(directory) as scan:
            # Symlinks are not followed (a loop could not end a listing), nor listed.
            is_dir = {entry.name: entry.is_dir(follow_symlinks=False) for entry in scan}
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in sorted(is_dir, key=lambda n: n + "/" if is_dir[n] else n):
        hidden = name.startswith(TEMP_PREFIX) or (not key_prefix and name == STATE_DIR)
        if hidden or not name.startswith(name_prefix):
            continue
        path = os.path.join(directory, name)
        if is_dir[name]:
            yield from _walk(path, os.path.join(meta, name), f"{key_prefix}{name}/", "")
        elif found := _describe(path, os.path.join(meta, name + ".json")):
            yield ObjectInfo(key_prefix + name, found[0].st_size, found[1],
                             last_modified=found[0].st_mtime)


# A directory checks every body itself and implements every call.
_LOCAL_CAPABILITIES = Capabilities({capability.value: True for capability in Capability})


class FileStore:
    """A directory as a bucket: ``<root>/<key>`` holds the object, sidecars hold the rest."""

    def __init__(self, root: str, *, max_attempts: int = 3, backoff: Backoff | None = None,
                 on_retry: RetryObserver | None = None,
                 pace: Callable[[int], Awaitable[None]] | None = None,
                 on_sent: Callable[[int], None] | None = None) -> None:
        self._root = os.path.abspath(root)
        self._on_sent = on_sent or (lambda n: None)  # body bytes written
        # --max-bandwidth: a directory on NFS or Lustre shares the node's network too.
        self._pace = pace
        self._meta = os.path.join(self._root, STATE_DIR, "meta")
        self._uploads = os.path.join(self._root, STATE_DIR, "uploads")
        self._max_attempts = max(1, max_attempts)
        self._backoff = backoff or Backoff()
        self._on_retry = on_retry

    @property
    def location(self) -> str:
        return f"file://{self._root}"

    @property
    def capabilities(self) -> Capabilities:
        return _LOCAL_CAPABILITIES

    def _error(self, cls: type[E], op: str, key: str, message: str, code: str) -> E:
        where = f"{self.location}/{key}" if key else self.location
        return cls(f"{op} {where}: {message} ({code})", op=op, key=key, code=code)

    def _translate(self, exc: OSError, op: str, key: str) -> StoreError:
        """Map an OSError to the domain hierarchy (in the worker thread: it may stat)."""
        number = exc.errno or 0
        code, reason = errno.errorcode.get(number, str(number)), exc.strerror or str(exc)
        gone = number in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(self._root)
        if gone:  # unmounted, say: nothing else can work, and the root is never created again
            reason = f"{self._root} no longer exists"
        fatal, transient = gone or number == errno.EROFS, number in _TRANSIENT_ERRNOS
        cls = FatalStoreError if fatal else TransientStoreError if transient else StoreError
        return self._error(cls, op, key, reason, code)

    async def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run blocking ``fn`` in a worker thread; translate its errors; retry transient ones."""
        return await retry_transient(
            partial(self._run, op, key, fn), attempts=self._max_attempts,
            backoff=self._backoff, on_retry=self._on_retry,
        )

    async def _run(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """One try of blocking ``fn`` in a worker thread, its errors translated."""

        def guarded() -> T:
            try:
                return fn()
            except OSError as exc:
                raise self._translate(exc, op, key) from exc

        return await anyio.to_thread.run_sync(guarded)

    async def _verify(self, op: str, key: str, body: bytes, md5_b64: str | None,
                      crc32_b64: str | None = None) -> str:
        """Check a body against its Content-MD5 and CRC32 (those given) as S3 does; return
        its ETag."""
        if md5_b64 is None and crc32_b64 is None:
            raise ValueError("a body needs a checksum")
        digest = await anyio.to_thread.run_sync(lambda: hashlib.md5(body).digest())
        with contextlib.suppress(ValueError):
            if (md5_b64 is None or digest == base64.b64decode(md5_b64, validate=True)) and (
                crc32_b64 is None or crc32_b64 == crc32_b64_of(body)
            ):
                return f'"{digest.hex()}"'
        # Transient, as with S3: the body (or its checksum) was damaged on its way here.
        raise self._error(TransientStoreError, op, key, "wrong checksum", "BadDigest")

    def _segments(self, op: str, key: str) -> list[str]:
        """The key's path segments; StoreError InvalidKey for a key that is not valid."""
        try:
            return key_segments(key, reserved=_RESERVED)
        except UnsafeKey:
            raise self._error(StoreError, op, key, f"invalid key {key!r}", "InvalidKey") from None

    def _paths(self, op: str, key: str) -> tuple[str, str]:
        """(data file, sidecar) of a key; StoreError InvalidKey for a key that is not valid."""
        *parents, name = self._segments(op, key)
        data = os.path.join(self._root, *parents, name)
        return data, os.path.join(self._meta, *parents, name + ".json")

    def _write_json(self, parents: Sequence[str], name: str, data: Mapping[str, Any]) -> None:
        with directory_beneath(self._root, parents, create=True) as directory:
            _write_json_at(directory, name, data)

    def _write_object(self, op: str, key: str, fill: Callable[[int], str],
                      attributes: Mapping[str, Any]) -> str:
        """Publish ``key``. Its sidecar (ETag, attributes, fingerprint) goes first, so the data
        rename is the one commit point: a key never appears without its metadata, and a crash
        between the renames leaves a sidecar matching nothing. Where a parent is a file (``a``
        exists, ``a/b`` is written) or a symlink, this fails with ENOTDIR, as it must."""
        *parents, name = self._segments(op, key)

        def describe(st: os.stat_result, etag: str) -> None:
            record = {"etag": etag, "attributes": attributes, **_fingerprint(st)}
            self._write_json([STATE_DIR, "meta", *parents], name + ".json", record)

        with directory_beneath(self._root, parents, create=True) as directory:
            return write_atomically(directory, name, fill, before_publish=describe)

    def _open_object(self, op: str, key: str) -> tuple[int, os.stat_result, str, dict[str, Any]]:
        """The object's file open for reading, its stat, ETag and attributes, all of the one
        file opened (a concurrent replace cannot pair one version's bytes with another's
        ETag); NotFound if there is none. A symlink is not an object, and none is followed."""
        *parents, name = self._segments(op, key)
        try:
            with directory_beneath(self._root, parents) as directory:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except OSError as exc:
            missing = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
            if exc.errno not in missing or not os.path.isdir(self._root):
                raise  # a vanished root is fatal (`_translate`), not a missing key
            raise self._error(NotFound, op, key, "not found", "NoSuchKey") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._error(NotFound, op, key, "not found", "NoSuchKey")
            sidecar = os.path.join(self._meta, *parents, name + ".json")
            etag, attributes = _sidecar_describing(sidecar, st) or (_md5_etag(fd), {})
        except BaseException:
            os.close(fd)
            raise
        return fd, st, etag, attributes

    async def check_bucket(self) -> None:
        def check() -> None:
            fatal = partial(self._error, FatalStoreError, "CheckRoot", "")
            if not os.path.isdir(self._root):
                raise fatal("is missing or not a directory", "NoSuchBucket")
            if not os.access(self._root, os.W_OK | os.X_OK):  # false on a read-only mount too
                raise fatal("is not writable", "AccessDenied")

        await self._call("CheckRoot", "", check)

    async def put_object(self, key: str, body: bytes, *, md5_b64: str,
                         attributes: ObjectAttributes) -> str:
        op = "PutObject"
        self._paths(op, key)  # refuse a bad key before hashing the body
        fill = partial(_write_body, body, await self._verify(op, key, body, md5_b64))
        if self._pace is not None:
            await self._pace(len(body))
        attrs = _attributes_json(attributes)
        etag = await self._call(op, key, lambda: self._write_object(op, key, fill, attrs))
        self._on_sent(len(body))
        return etag

    async def head_object(self, key: str) -> ObjectInfo | None:
        data, sidecar = self._paths("HeadObject", key)
        if not (found := await self._call("HeadObject", key, lambda: _describe(data, sidecar))):
            return None
        st, etag, attributes = found
        metadata = dict(attributes.get("metadata") or {})
        return ObjectInfo(key, st.st_size, etag, metadata, attributes.get("content_encoding"),
                          st.st_mtime)

    def get_object(
        self, key: str, *, offset: int = 0, end: int | None = None, if_match: str | None = None,
        chunk_size: int = GET_CHUNK,
    ) -> ObjectBody:
        # ``if_match`` needs nothing here: ResumableBody compares the ETag of what was opened.
        async def open_range(start: int, stop: int | None, etag: str | None) -> RangeReader:
            return await self._run("GetObject", key, lambda: self._open_range(key, start, stop))

        return ResumableBody(
            open_range, key=key, location=self.location, offset=offset, end=end,
            if_match=if_match, chunk_size=chunk_size, attempts=self._max_attempts,
            backoff=self._backoff, on_retry=self._on_retry,
        )

    def _open_range(self, key: str, start: int, end: int | None) -> _FileRange:
        op = "GetObject"
        fd, st, etag, attributes = self._open_object(op, key)
        try:
            if start > st.st_size:
                raise self._error(StoreError, op, key, f"byte {start} lies past the object's"
                                  f" end ({st.st_size} bytes)", "InvalidRange")
        except BaseException:
            os.close(fd)
            raise
        info = ObjectInfo(key, st.st_size, etag, dict(attributes.get("metadata") or {}),
                          attributes.get("content_encoding"))
        stop = st.st_size if end is None else min(max(end, start), st.st_size)
        return _FileRange(self, key, fd, info, start, stop)

    async def delete_object(self, key: str) -> None:
        op = "DeleteObject"
        *parents, name = self._segments(op, key)

        def delete() -> None:
            # The data file first: without it the sidecar describes nothing.
            for where, entry in ((parents, name), ([STATE_DIR, "meta", *parents],
                                                   name + ".json")):
                try:
                    with directory_beneath(self._root, where) as directory:
                        os.unlink(entry, dir_fd=directory)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR) or not os.path.isdir(
                        self._root
                    ):
                        raise

        await self._call(op, key, delete)

    async def copy_object(self, source_key: str, key: str) -> str:
        op = "CopyObject"
        self._segments(op, source_key)
        self._segments(op, key)

        def copy() -> str:
            fd, _, _, attributes = self._open_object(op, source_key)
            with open(fd, "rb", buffering=0) as handle:
                # Like S3's CopyObject: a new single-part object, so a plain MD5 ETag.
                return self._write_object(op, key, lambda out: f'"{_append(out, handle).hex()}"',
                                          attributes)

        return await self._call(op, key, copy)

    async def copy_object_as(
        self, source_key: str, key: str, *, attributes: ObjectAttributes, if_match: str
    ) -> str:
        op = "CopyObject"
        self._segments(op, source_key)
        self._segments(op, key)
        attrs = _attributes_json(attributes)

        def copy() -> str:
            fd, st, etag, _ = self._open_object(op, source_key)
            try:
                self._check_version(op, source_key, etag, if_match)
                md5 = etag_md5(etag)

                def fill(out: int) -> str:
                    _clone_range(fd, out, 0, st.st_size, whole=True)
                    # The very bytes of the source: its ETag where that is their MD5 (a
                    # reflink then reads nothing at all), else the MD5 S3's CopyObject gives.
                    return f'"{md5}"' if md5 else _md5_etag(fd)

                return self._write_object(op, key, fill, attrs)
            finally:
                os.close(fd)

        return await self._call(op, key, copy)

    async def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, source_key: str, *, offset: int,
        end: int, if_match: str,
    ) -> str:
        op = "UploadPartCopy"
        self._segments(op, source_key)

        def store() -> str:
            self._upload(op, key, upload_id)
            fd, st, etag, _ = self._open_object(op, source_key)
            try:
                self._check_version(op, source_key, etag, if_match)
                if not 0 <= offset < end <= st.st_size:
                    raise self._error(StoreError, op, key, f"bytes {offset}-{end - 1} lie"
                                      f" outside the source ({st.st_size} bytes)", "InvalidRange")
                name = str(part_number)
                with directory_beneath(self._root,
                                       [STATE_DIR, "uploads", upload_id]) as directory:
                    def fill(out: int) -> str:
                        _clone_range(fd, out, offset, end - offset, whole=False)
                        # What Complete checks each part against (the same bytes).
                        return _md5_etag(fd, offset, end)

                    def describe(st: os.stat_result, etag: str) -> None:
                        _write_json_at(directory, name + ".json",
                                       {"etag": etag, **_fingerprint(st)})

                    return write_atomically(directory, name, fill, before_publish=describe)
            finally:
                os.close(fd)

        return await self._call(op, key, store)

    def _check_version(self, op: str, key: str, etag: str, if_match: str) -> None:
        if etag.strip().removeprefix("W/").strip('"') != if_match.strip().removeprefix(
                "W/").strip('"'):
            raise self._error(ObjectChanged, op, key, f"is no longer version {if_match}",
                              "ObjectChanged")

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        head, slash, tail = prefix.rpartition("/")
        if slash and _invalid_key(head):
            return  # no valid key starts with such a prefix
        parents = head.split("/") if slash else []
        start, meta = os.path.join(self._root, *parents), os.path.join(self._meta, *parents)
        # Each attempt walks afresh: a generator that raised cannot be resumed.
        walk = partial(_walk, start, meta, head + slash, tail)
        for info in await self._call("ListObjects", prefix, lambda: list(walk())):
            yield info

    async def close(self) -> None:
        return None

    def _upload(self, op: str, key: str, upload_id: str) -> tuple[str, dict[str, Any]]:
        """The staging directory and meta.json of a live upload of ``key``."""
        self._paths(op, key)
        upload_dir = os.path.join(self._uploads, upload_id)
        # Only our own ids name a directory (anything else could walk out of uploads/), and S3
        # also answers NoSuchUpload for the id of another key's upload.
        ours = len(upload_id) == 32 and all(c in "0123456789abcdef" for c in upload_id)
        meta = _read_json(os.path.join(upload_dir, "meta.json")) if ours else None
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise self._error(NoSuchUpload, op, key, "upload no longer exists", "NoSuchUpload")
        return upload_dir, meta

    async def create_multipart_upload(
        self, key: str, *, attributes: ObjectAttributes, crc32: bool = False
    ) -> MultipartUpload:
        """An upload whose parts come with Content-MD5: the ETags are MD5s anyway here, so
        CRC32 checksums would save nothing."""
        op = "CreateMultipartUpload"
        self._paths(op, key)
        meta = {"key": key, "attributes": _attributes_json(attributes)}

        def create() -> MultipartUpload:
            upload_id = os.urandom(16).hex()
            # Now the upload exists.
            self._write_json([STATE_DIR, "uploads", upload_id], "meta.json", meta)
            return MultipartUpload(upload_id)

        return await self._call(op, key, create)

    async def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes, *,
                          md5_b64: str | None = None, crc32_b64: str | None = None) -> str:
        op = "UploadPart"
        etag = await self._verify(op, key, body, md5_b64, crc32_b64)
        fill = partial(_write_body, body, etag)
        if self._pace is not None:
            await self._pace(len(body))

        def store() -> str:
            self._upload(op, key, upload_id)
            name = str(part_number)
            with directory_beneath(self._root, [STATE_DIR, "uploads", upload_id]) as directory:
                # The part's sidecar keeps its ETag, so list_parts need not hash the parts.
                def describe(st: os.stat_result, etag: str) -> None:
                    _write_json_at(directory, name + ".json", {"etag": etag, **_fingerprint(st)})

                return write_atomically(directory, name, fill, before_publish=describe)

        etag = await self._call(op, key, store)
        self._on_sent(len(body))
        return etag

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        op = "ListParts"

        def list_parts() -> list[UploadedPart]:
            upload_dir, _ = self._upload(op, key, upload_id)
            numbers = sorted(int(n) for n in os.listdir(upload_dir) if n.isascii() and n.isdigit())
            paths = {n: os.path.join(upload_dir, str(n)) for n in numbers}
            found = {n: _describe(path, path + ".json") for n, path in paths.items()}
            return [UploadedPart(n, f[1], f[0].st_size) for n, f in found.items() if f]

        return await self._call(op, key, list_parts)

    async def complete_multipart_upload(self, key: str, upload_id: str,
                                        parts: list[UploadedPart]) -> str:
        op = "CompleteMultipartUpload"
        refuse = partial(self._error, StoreError, op, key)

        def complete() -> str:
            upload_dir, meta = self._upload(op, key, upload_id)
            numbers = [part.part_number for part in parts]
            paths = [os.path.join(upload_dir, str(number)) for number in numbers]
            if not parts:
                raise refuse("no parts given", "MalformedXML")
            if numbers != sorted(set(numbers)):
                raise refuse("parts are not in ascending order", "InvalidPartOrder")
            if missing := [n for n, p in zip(numbers, paths, strict=True) if not os.path.isfile(p)]:
                raise refuse(f"part {missing[0]} was never uploaded", "InvalidPart")
            if any(os.path.getsize(path) < MIN_PART_SIZE for path in paths[:-1]):
                raise refuse(f"a part but the last is under {MIN_PART_SIZE} B", "EntityTooSmall")

            def fill(fd: int) -> str:
                digests: list[bytes] = []
                for part, path in zip(parts, paths, strict=True):
                    with open(path, "rb") as handle:
                        digests.append(_append(fd, handle))
                    # Checked against the bytes being published, not against a record of them.
                    if digests[-1].hex() != part.etag.strip('"').lower():
                        raise refuse(f"part {part.part_number}: ETag does not match", "InvalidPart")
                return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'

            etag = self._write_object(op, key, fill, meta.get("attributes") or {})
            # Published: failing now would redo the upload; leftovers only cost disk space.
            shutil.rmtree(upload_dir, ignore_errors=True)
            return etag

        return await self._call(op, key, complete)

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        op = "AbortMultipartUpload"

        def abort() -> None:
            # Already gone, or not an upload of this key: S3 does nothing either.
            with contextlib.suppress(NoSuchUpload):
                upload_dir, _ = self._upload(op, key, upload_id)
                # meta.json first: the upload is gone at once, however far rmtree gets.
                os.unlink(os.path.join(upload_dir, "meta.json"))
                shutil.rmtree(upload_dir)

        await self._call(op, key, abort)

    async def presign_get(self, key: str, *, expires: int) -> str:
        raise NotSupported(f"presign {key}: a directory has no presigned URLs",
                           op="presign", key=key, code="NotSupported")


async def open_file_store(
    root: str, *, max_attempts: int = 3, on_retry: RetryObserver | None = None,
    pace: Callable[[int], Awaitable[None]] | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> FileStore:
    """A FileStore for ``root`` (checked by `FileStore.check_bucket`, not here, as for S3)."""
    return FileStore(root, max_attempts=max_attempts, on_retry=on_retry, pace=pace,
                     on_sent=on_sent)


class _FileRange:
    """Bytes [start, end) of one open object file: read where they lie (pread), so a retry
    reads nothing twice, and from the one file opened, so a concurrent replace (a rename
    over it) never mixes versions."""

    __slots__ = ("info", "start", "end", "_store", "_key", "_fd", "_position")

    def __init__(self, store: FileStore, key: str, fd: int, info: ObjectInfo, start: int,
                 end: int) -> None:
        self.info, self.start, self.end = info, start, end
        self._store, self._key, self._fd, self._position = store, key, fd, start

    async def read(self, size: int) -> bytes:
        fd, offset = self._fd, self._position
        if fd < 0 or offset >= self.end:
            return b""
        size = min(size, self.end - offset)
        chunk = await self._store._run("GetObject", self._key, lambda: _read_at(fd, size, offset))
        self._position += len(chunk)
        return chunk

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # closing a read-only file does not block
