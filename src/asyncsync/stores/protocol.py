"""The storage seam: the one Protocol everything above the store talks to.

`s3.py` implements it with aiobotocore, `local.py` for ``file://`` destinations.
Implementations translate their own errors into `errors.StoreError` subclasses (keeping
``__cause__``), retry what is transient themselves (one retry layer, `retry.py`, which also
resumes an object body cut off half-way), and never log or echo credentials.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .capabilities import Capabilities

# Object metadata keys (sent as x-amz-meta-*): the digest of the original content lets a
# bucket be verified without the manifest; the original size matters when the body is gzip.
META_DIGEST = "xxh128"
META_SIZE = "asyncsync-size"
# The most bytes one chunk of `ObjectStore.get_object` holds, unless the caller asks for less.
GET_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    content_encoding: str | None = None
    last_modified: float | None = None  # seconds since the epoch: when it was stored


@dataclass(frozen=True)
class UploadedPart:
    part_number: int
    etag: str
    size: int
    crc32: str | None = None  # base64 CRC32 of the part, for uploads with CRC32 checksums


@dataclass(frozen=True)
class MultipartUpload:
    upload_id: str
    # The store confirmed that this upload takes CRC32 part checksums: every part is then
    # sent with one (and listed with it in Complete) instead of a Content-MD5.
    crc32: bool = False


@dataclass(frozen=True)
class ObjectAttributes:
    """What a new object carries besides its body."""

    metadata: Mapping[str, str]
    content_encoding: str | None = None
    content_type: str | None = None

    @classmethod
    def of_content(
        cls, digest: str, size: int, encoding: str | None, content_type: str | None = None
    ) -> ObjectAttributes:
        """An uploaded file's: its digest and original size, the body's encoding, and the
        media type of the original content."""
        return cls(metadata={META_DIGEST: digest, META_SIZE: str(size)},
                   content_encoding=encoding, content_type=content_type)


class ObjectBody(Protocol):
    """The bytes ``[offset, end)`` of one version of an object, as `ObjectStore.get_object`
    hands them out: enter it (``async with``) to send the request, then iterate it for
    chunks of at most the chunk size asked for. A connection that drops anywhere in the body
    is resumed from the last byte delivered, with a ranged request that must find the same
    ETag (else `ObjectChanged`), within the store's retry budget per chunk."""

    @property
    def info(self) -> ObjectInfo:
        """The whole object's size, ETag, metadata and content encoding (once entered)."""
        ...

    @property
    def offset(self) -> int:
        """The first byte delivered."""
        ...

    @property
    def end(self) -> int:
        """One past the last byte delivered: the ``end`` asked for, or the object's size
        when that is smaller or none was asked for (once entered)."""
        ...

    async def __aenter__(self) -> ObjectBody: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...


class ObjectStore(Protocol):
    """A bucket (or bucket-like root) of an object store."""

    @property
    def location(self) -> str:
        """Human-readable name of the store, for messages (never holds credentials)."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What the store was seen to do (CRC32 echo, ListParts, ...): learned from its
        answers, kept in the manifest between runs."""
        ...

    async def check_bucket(self) -> None:
        """Raise FatalStoreError if the bucket does not exist or cannot be reached with these
        credentials; TransientStoreError if the store does not answer."""
        ...

    async def put_object(
        self, key: str, body: bytes, *, md5_b64: str, attributes: ObjectAttributes
    ) -> str:
        """Store a whole object; return its ETag. What the store kept is proven against
        ``md5_b64`` (by the store, and by its answer on this side: `BadDigest` otherwise)."""
        ...

    async def create_multipart_upload(
        self, key: str, *, attributes: ObjectAttributes, crc32: bool = False
    ) -> MultipartUpload:
        """Start a multipart upload, asking for CRC32 part checksums when ``crc32``."""
        ...

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes, *,
        md5_b64: str | None = None, crc32_b64: str | None = None,
    ) -> str:
        """Store one part; return its ETag. What the store kept is proven against the
        checksums given (at least one): the store's echo of the CRC32, or the ETag as the
        part's MD5 (computed if only a CRC32 was given). A mismatch raises `BadDigest`."""
        ...

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        """Parts already stored for an upload; raise NoSuchUpload if the upload is gone."""
        ...

    async def complete_multipart_upload(
        self, key: str, upload_id: str, parts: list[UploadedPart]
    ) -> str:
        """Publish the object from its parts (with their CRC32s, for an upload that takes
        them); return its ETag."""
        ...

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Discard an upload and its parts; a no-op if the upload is already gone."""
        ...

    async def head_object(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and metadata, or None if it does not exist."""
        ...

    def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix`` (no metadata: listings do not carry it)."""
        ...

    def get_object(
        self, key: str, *, offset: int = 0, end: int | None = None, if_match: str | None = None,
        chunk_size: int = GET_CHUNK,
    ) -> ObjectBody:
        """Bytes ``offset`` up to ``end`` (exclusive; None: the object's end) of the object, in
        chunks of at most ``chunk_size`` bytes, with its attributes. ``if_match`` is the ETag
        the object must have (several ranges of one large object read in parallel, or a
        download resumed later, must all come from one version). Entering the body raises
        NotFound if there is no such object, `ObjectChanged` if its ETag is not
        ``if_match``, and StoreError ``InvalidRange`` if ``offset`` lies past its end; an
        ``offset`` equal to its size gives no bytes, but the attributes all the same."""
        ...

    async def delete_object(self, key: str) -> None:
        """Remove the object; a no-op if there is none."""
        ...

    async def copy_object(self, source_key: str, key: str) -> str:
        """Server-side copy within the bucket; return the new ETag."""
        ...

    async def copy_object_as(
        self, source_key: str, key: str, *, attributes: ObjectAttributes, if_match: str
    ) -> str:
        """Server-side copy of version ``if_match`` (an ETag) of ``source_key`` to a new
        object ``key`` that carries ``attributes``, not the source's; return its ETag. At
        most 5 GiB on S3 (`upload_part_copy` beyond). Raises `ObjectChanged` (or another
        StoreError) when the source is no longer that version, NotFound when it is gone."""
        ...

    async def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, source_key: str, *, offset: int,
        end: int, if_match: str,
    ) -> str:
        """One part of a multipart upload, copied server-side from bytes ``[offset, end)`` of
        version ``if_match`` of ``source_key``; return the part's ETag."""
        ...

    async def close(self) -> None: ...

    async def presign_get(self, key: str, *, expires: int) -> str:
        """A URL that GETs the object without further credentials for ``expires`` seconds
        (it names the store's endpoint and carries a signature); NotSupported where the
        store has no such URLs (a ``file://`` directory)."""
        ...
