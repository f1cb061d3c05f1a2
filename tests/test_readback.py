"""`pipeline.readback`: an object's content digest, as the scan digests files."""

from __future__ import annotations

import gzip
import zlib

import pytest
import xxhash

from asyncsync.pipeline.readback import ContentDigest


def test_content_digest_decodes_gzip_in_pieces() -> None:
    original = b"".join(b"%d,loss\n" % i for i in range(200_000))
    packed = gzip.compress(original, mtime=0)
    content = ContentDigest("gzip")
    for start in range(0, len(packed), 4096):
        content.feed(memoryview(packed)[start:start + 4096])
    assert content.finish() == (xxhash.xxh3_128_hexdigest(original), len(original))
    plain = ContentDigest(None)
    plain.feed(original)
    assert plain.finish() == (xxhash.xxh3_128_hexdigest(original), len(original))
    truncated = ContentDigest("gzip")
    truncated.feed(packed[: len(packed) // 2])
    with pytest.raises(zlib.error):
        truncated.finish()
