"""An object read back and digested as the scan digests files: the proof that the bucket
holds a file's bytes, for stores whose answers prove nothing (``--verify-after-upload``).

The digest is the xxh3-128 of the original content: a gzip-encoded body is decoded as it
streams in, so the result compares with the manifest's digest and the object's
``xxh128`` metadata alike. Memory is one chunk and the decoder's window, whatever the size.
"""

from __future__ import annotations

import zlib

from ..errors import BadDigest
from ..stores.protocol import ObjectStore
from .digest import new_digest

READ_CHUNK = 1024 * 1024


class ContentDigest:
    """xxh3-128 and length of an object's content, fed its body in order; a gzip body is
    decoded as it comes, the output bounded per call (a small body may inflate a
    thousandfold). `finish` raises zlib.error for a gzip body that ends early."""

    def __init__(self, encoding: str | None) -> None:
        self.hasher = new_digest()
        self.size = 0
        self.decoder = (zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                        if (encoding or "").lower() == "gzip" else None)

    def _hash(self, data: bytes) -> None:
        self.hasher.update(data)
        self.size += len(data)

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.decoder is None:
            self.hasher.update(chunk)
            self.size += len(chunk)
            return
        data = self.decoder.decompress(chunk, READ_CHUNK)
        while True:
            self._hash(data)
            if not self.decoder.unconsumed_tail:
                break
            data = self.decoder.decompress(self.decoder.unconsumed_tail, READ_CHUNK)

    def finish(self) -> tuple[str, int]:
        if self.decoder is not None:
            self._hash(self.decoder.flush())
            if not self.decoder.eof:
                raise zlib.error("the gzip stream ends early")
        return str(self.hasher.hexdigest()), self.size


async def content_digest(store: ObjectStore, key: str, *, if_match: str | None = None) -> str:
    """xxh3-128 (hex) of the object's content, decoded when its body is gzip."""
    async with store.get_object(key, if_match=if_match, chunk_size=READ_CHUNK) as body:
        content = ContentDigest(body.info.content_encoding)
        async for chunk in body:
            content.feed(chunk)
    return content.finish()[0]


async def verify_object(
    store: ObjectStore, key: str, digest: str, *, etag: str | None = None
) -> None:
    """Raise `BadDigest` unless the object's content digest is ``digest``."""
    try:
        found = await content_digest(store, key, if_match=etag)
    except zlib.error as exc:
        raise BadDigest(f"{key}: read back from {store.location}, its gzip body does not"
                        f" decode ({exc}): damaged on the way", op="GetObject", key=key,
                        code="BadDigest") from exc
    if found != digest:
        raise BadDigest(
            f"{key}: read back from {store.location}, its content digest is {found}, the"
            f" file's {digest}: damaged on the way", op="GetObject", key=key, code="BadDigest",
        )
