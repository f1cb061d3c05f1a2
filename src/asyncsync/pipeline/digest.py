"""Reading and hashing local files, consistently.

xxh3-128 is the content digest (fast: several GB/s, so hashing never bounds an upload);
MD5 and CRC32 only travel as Content-MD5 and x-amz-checksum-crc32, so the server can verify
each body. Every function here
is blocking and meant to run in a worker thread; xxhash and hashlib release the GIL on
large buffers, so threads really do hash in parallel.

A read is consistent when the file's identity (size, mtime_ns, inode) is the same before
and after it: otherwise it raises `SourceChanged` and the caller reads again later. Source
files are opened through `source.open_source`, never by path: a file swapped for a symlink
is not read.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import xxhash

from ..errors import SourceChanged
from .source import OpenedSource, SourceFile, open_source

# Buffer of one hashing pass; the transfer stage pays for it from the byte budget.
HASH_CHUNK = 1024 * 1024
# A hashing pass over a file this large reads in bigger pieces: every read comes back to
# Python and must win the GIL back from the event loop's thread, which is busy opening the
# store meanwhile; a 1 GiB file in 1 MiB reads took 0.42 s that way, in 8 MiB reads 0.34 s.
LARGE_HASH_FROM = 512 * 1024 * 1024
LARGE_HASH_CHUNK = 8 * 1024 * 1024


def hash_chunk_for(size: int) -> int:
    """How much of a ``size``-byte file one read of its hashing pass takes (and holds)."""
    return LARGE_HASH_CHUNK if size >= LARGE_HASH_FROM else HASH_CHUNK


def new_digest() -> Any:
    return xxhash.xxh3_128()


def md5_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def crc32_b64_of(data: bytes | memoryview) -> str:
    """CRC32 as S3's x-amz-checksum-crc32 carries it: base64 of the big-endian value."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


@dataclass(frozen=True, slots=True)
class FileIdentity:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


ZIP_SIGNATURE = b"PK\x03\x04"


def check_zip_complete(path: str, source: BinaryIO | bytes) -> None:
    """A file that starts like a zip archive (torch.save writes them) must have a central
    directory that parses; one still being written does not, and must not be published.

    Only the directory at the end is read, not the members: cheap even for gigabytes.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source):
            pass
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise SourceChanged(f"{path}: incomplete zip archive (still being written?)") from exc


def check_unchanged(opened: OpenedSource, before: FileIdentity) -> None:
    """The open file is still ``before``, and its name in its directory still names it."""
    after = FileIdentity.of(os.fstat(opened.fd))
    if after != before:
        raise SourceChanged(f"{opened.path}: changed while it was read")
    if FileIdentity.of(opened.stat_name()) != before:
        # Replaced (renamed over, or swapped for a link) while we held the old inode.
        raise SourceChanged(f"{opened.path}: replaced while it was read")


@dataclass(frozen=True, slots=True)
class SmallSnapshot:
    """A whole small file, read once: its body, identity and digests."""

    body: bytes
    identity: FileIdentity
    digest: str  # xxh3-128 of the original content, hex
    body_md5_b64: str  # MD5 of ``body`` (which is gzip data when compressed)
    content_encoding: str | None


def read_small(source: SourceFile, max_size: int, compress: bool) -> SmallSnapshot:
    """Read a whole file of at most ``max_size`` bytes (it grew past that: SourceChanged)."""
    path = source.path
    with open_source(source) as opened:
        fd = opened.fd
        before = FileIdentity.of(os.fstat(fd))
        if before.size > max_size:
            raise SourceChanged(f"{path}: grew past the multipart threshold")
        chunks = []
        remaining = before.size
        while True:
            # Read to EOF, not to the stat size: a file growing meanwhile is caught below.
            chunk = os.read(fd, max(remaining, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        check_unchanged(opened, before)
    if len(data) != before.size:
        raise SourceChanged(f"{path}: size changed while it was read")
    if data.startswith(ZIP_SIGNATURE):
        check_zip_complete(path, data)
    digest = xxhash.xxh3_128_hexdigest(data)
    encoding = None
    if compress:
        # mtime=0: the same content always compresses to the same bytes.
        packed = gzip.compress(data, compresslevel=6, mtime=0)
        if len(packed) < len(data):  # else sent as it is: nothing gained, a decoder needed
            data, encoding = packed, "gzip"
    return SmallSnapshot(data, before, digest, md5_b64(data), encoding)


def hash_file(source: SourceFile, chunk: int = HASH_CHUNK) -> tuple[str, FileIdentity]:
    """Digest of a whole file, read ``chunk`` bytes at a time (also warms the page cache for
    the upload that follows)."""
    with open_source(source) as opened:
        return hash_opened(opened, chunk)


def starts_with(source: SourceFile, size: int, digest: str, chunk: int = HASH_CHUNK) -> bool:
    """Whether the first ``size`` bytes of the file are those whose digest is ``digest``
    (an append-only file that only grew still starts with what was uploaded of it)."""
    hasher = new_digest()
    with open_source(source) as opened:
        offset = 0
        while offset < size:
            data = os.pread(opened.fd, min(chunk, size - offset), offset)
            if not data:
                return False  # shorter than that now
            hasher.update(data)
            offset += len(data)
    return bool(hasher.hexdigest() == digest)


def hash_opened(opened: OpenedSource, chunk: int = HASH_CHUNK) -> tuple[str, FileIdentity]:
    """`hash_file` of a file already open (cleanup hashes the descriptor it deletes by)."""
    path, fd = opened.path, opened.fd
    before = FileIdentity.of(os.fstat(fd))
    hasher = new_digest()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    first = b""
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            break
        if not first:
            first = bytes(view[:4])
        hasher.update(view[:n])
    if first == ZIP_SIGNATURE:
        with open(fd, "rb", closefd=False) as archive:
            check_zip_complete(path, archive)
    check_unchanged(opened, before)
    return hasher.hexdigest(), before


def read_part(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``; short only if the file shrank (the caller checks)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    pieces = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


def gzip_to_temp(
    source: SourceFile, temp_dir: str
) -> tuple[str, str, FileIdentity, BinaryIO]:
    """Compress a (large) file into an anonymous temp file, in one read.

    Returns the temp file's path, the digest of the original content, the original's
    identity, and the open temp file (the caller closes it, which deletes it). A body that
    did not shrink is of no use: the caller then sends the file as it is.
    """
    with open_source(source) as opened:
        fd = opened.fd
        before = FileIdentity.of(os.fstat(fd))
        hasher = new_digest()
        temp = tempfile.NamedTemporaryFile(dir=temp_dir, prefix="gzip-", suffix=".gz")
        try:
            with open(fd, "rb", closefd=False) as reader, gzip.GzipFile(
                # No name and no mtime in the header: same content, same bytes.
                filename="", fileobj=temp, mode="wb", compresslevel=6, mtime=0
            ) as sink:
                while True:
                    chunk = reader.read(HASH_CHUNK)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    sink.write(chunk)
            temp.flush()
            check_unchanged(opened, before)
        except BaseException:
            temp.close()
            raise
    return temp.name, hasher.hexdigest(), before, temp  # type: ignore[return-value]

