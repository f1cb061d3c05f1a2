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


async def content_digest(store: ObjectStore, key: str, *, if_match: str | None = None) -> str:
    """xxh3-128 (hex) of the object's content, decoded when its body is gzip."""
    hasher = new_digest()
    async with store.get_object(key, if_match=if_match, chunk_size=READ_CHUNK) as body:
        decoder = (zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                   if (body.info.content_encoding or "").lower() == "gzip" else None)
        async for chunk in body:
            if decoder is None:
                hasher.update(chunk)
                continue
            # Bounded output per call: a small body may inflate a thousandfold.
            data = decoder.decompress(chunk, READ_CHUNK)
            while True:
                hasher.update(data)
                if not decoder.unconsumed_tail:
                    break
                data = decoder.decompress(decoder.unconsumed_tail, READ_CHUNK)
        if decoder is not None:
            hasher.update(decoder.flush())
    return str(hasher.hexdigest())


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
