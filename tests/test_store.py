"""ObjectStore conformance: the same tests against FileStore and S3Store (SeaweedFS).

The pipeline talks to stores only through `store.ObjectStore`, so whatever it relies on is
checked here against both implementations; a few FileStore-only tests cover what S3 gets from
the server (keys that would escape the root, the hidden sidecar tree, stale sidecars, the
completion rules). Reads are checked whole, by range, in parallel ranges, and cut off half-way
(a real connection reset through the fault proxy for S3, a failing read for the directory
store), with and without the object changing before the resumed request.
Each test runs its body in one `asyncio.run`, because the S3 client must be created and closed
inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import os
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from asyncsync.config import StoreConfig
from asyncsync.errors import (
    BadDigest,
    FatalStoreError,
    NoSuchUpload,
    NotFound,
    NotSupported,
    ObjectChanged,
    StoreError,
    TransientStoreError,
)
from asyncsync.stores.capabilities import Capability
from asyncsync.stores.local import STATE_DIR, FileStore, open_file_store
from asyncsync.stores.protocol import (
    META_DIGEST,
    META_SIZE,
    ObjectAttributes,
    ObjectStore,
    UploadedPart,
)
from asyncsync.stores.retry import RetryObserver

from .conftest import S3Server, new_bucket, server_params
from .faultproxy import FaultProxy
from .test_cli import SilentServer

MiB = 1024 * 1024

Body = Callable[[ObjectStore], Awaitable[None]]


class Opener(Protocol):
    def __call__(self, on_retry: RetryObserver | None = None) -> Awaitable[ObjectStore]: ...


@dataclass(frozen=True)
class StoreFactory:
    kind: str  # "file" or "s3"
    open: Opener
    root: Path | None = None  # FileStore only
    server: S3Server | None = None  # S3 only: which server of the matrix

    @property
    def lists_parts(self) -> bool:
        return self.server is None or self.server.lists_parts

    @property
    def checks_checksums(self) -> bool:
        return self.server is None or self.server.checks_content_md5

    @property
    def plain_multipart_etag(self) -> bool:
        return self.server is not None and self.server.kind == "s3rver"

    def run(self, body: Body, on_retry: RetryObserver | None = None) -> None:
        async def main() -> None:
            store = await self.open(on_retry)
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())


@pytest.fixture(params=["file", *server_params("s3"), *server_params("s3-botocore")])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreFactory]:
    if request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        yield file_factory(root)
        return
    # Only the S3 parameters start (or reuse) their server.
    path, name = request.param.split(":")
    server: S3Server = request.getfixturevalue(f"{name}_server")
    only_these_credentials(monkeypatch, server.access_key, server.secret_key)
    with new_bucket(server) as bucket:
        # "s3" sends bodies on the lean signed path (s3direct), "s3-botocore" through botocore.
        yield s3_factory(server.endpoint, bucket, direct=path == "s3", server=server)


def file_factory(root: Path) -> StoreFactory:
    async def open_file(on_retry: RetryObserver | None = None) -> ObjectStore:
        return await open_file_store(str(root), on_retry=on_retry)

    return StoreFactory("file", open_file, root)


def s3_factory(endpoint: str, bucket: str, *, direct: bool = True,
               server: S3Server | None = None) -> StoreFactory:
    config = StoreConfig(
        endpoint_url=endpoint, region="us-east-1", addressing_style="path",
        max_attempts=2, direct_uploads=direct,
    )

    async def open_s3(on_retry: RetryObserver | None = None) -> ObjectStore:
        from asyncsync.stores.s3 import open_s3_store

        return await open_s3_store(bucket, config, on_retry=on_retry)

    # Both S3 variants share the S3 expectations; the server says where they differ.
    return StoreFactory("s3", open_s3, server=server)


def only_these_credentials(monkeypatch: pytest.MonkeyPatch, key_id: str, secret: str) -> None:
    """The standard chain finds these keys in the environment and nothing else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def plain_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def multipart_etag(*parts: bytes) -> str:
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'


ATTRS = ObjectAttributes(
    metadata={META_DIGEST: "0123456789abcdef0123456789abcdef", META_SIZE: "12345"},
    content_encoding="gzip",
    content_type="application/octet-stream",
)
PLAIN = ObjectAttributes(metadata={})


async def put(store: ObjectStore, key: str, data: bytes,
              attributes: ObjectAttributes = PLAIN) -> str:
    return await store.put_object(key, data, md5_b64=md5_b64(data), attributes=attributes)


async def read(store: ObjectStore, key: str, **ranged: Any) -> bytes:
    async with store.get_object(key, **ranged) as body:
        return b"".join([chunk async for chunk in body])


async def keys(store: ObjectStore, prefix: str) -> list[str]:
    return [info.key async for info in store.list_objects(prefix)]


# -- both stores ------------------------------------------------------------------------------


def test_put_head_get_round_trip(store: StoreFactory) -> None:
    data = os.urandom(3 * MiB + 17)  # more than one get_object chunk

    async def body(s: ObjectStore) -> None:
        etag = await put(s, "run/a/data.bin", data, ATTRS)
        assert etag == plain_etag(data)
        head = await s.head_object("run/a/data.bin")
        assert head is not None
        assert (head.key, head.size, head.etag) == ("run/a/data.bin", len(data), etag)
        assert dict(head.metadata) == dict(ATTRS.metadata)
        assert head.content_encoding == "gzip"
        assert await read(s, "run/a/data.bin") == data
        # Overwriting replaces data and metadata together.
        etag2 = await put(s, "run/a/data.bin", b"v2", PLAIN)
        head = await s.head_object("run/a/data.bin")
        assert head is not None
        assert (head.size, head.etag, dict(head.metadata)) == (2, etag2, {})
        assert head.content_encoding is None
        assert await read(s, "run/a/data.bin") == b"v2"

    store.run(body)


def test_bad_md5_is_refused_and_nothing_stored(store: StoreFactory) -> None:
    async def body(s: ObjectStore) -> None:
        with pytest.raises(TransientStoreError) as caught:
            await s.put_object("bad/md5", b"payload", md5_b64=md5_b64(b"other"),
                               attributes=ATTRS)
        assert caught.value.code == "BadDigest"
        assert await s.head_object("bad/md5") is None
        assert await keys(s, "bad/") == []

    store.run(body)


def test_head_and_get_of_missing_key(store: StoreFactory) -> None:
    async def body(s: ObjectStore) -> None:
        assert await s.head_object("no/such/key") is None
        with pytest.raises(NotFound):
            await read(s, "no/such/key")
        with pytest.raises(NotFound):
            await s.copy_object("no/such/key", "copy/of/nothing")

    store.run(body)


def test_multipart_round_trip(store: StoreFactory) -> None:
    first, second = os.urandom(5 * MiB), os.urandom(1000)

    async def body(s: ObjectStore) -> None:
        key = "run/big.bin"
        upload_id = (await s.create_multipart_upload(key, attributes=ATTRS)).upload_id
        # Second part first: parts may arrive in any order.
        etag2 = await s.upload_part(key, upload_id, 2, second, md5_b64=md5_b64(second))
        etag1 = await s.upload_part(key, upload_id, 1, first, md5_b64=md5_b64(first))
        assert (etag1, etag2) == (plain_etag(first), plain_etag(second))
        sent = [UploadedPart(1, etag1, len(first)), UploadedPart(2, etag2, len(second))]
        if store.lists_parts:
            listed = await s.list_parts(key, upload_id)
            assert listed == sent
        else:
            with pytest.raises(NotSupported):
                await s.list_parts(key, upload_id)
        assert await s.head_object(key) is None  # nothing visible before completion
        # A Content-MD5 that is not the body's: refused by a store that checks it, and by
        # this side where the store's answer (an MD5 ETag) shows the body is another.
        with pytest.raises(TransientStoreError) as caught:
            await s.upload_part(key, upload_id, 3, b"x", md5_b64=md5_b64(b"y"))
        assert caught.value.code == "BadDigest"

        etag = await s.complete_multipart_upload(key, upload_id, sent)
        # s3rver names a multipart object by the MD5 of its whole body.
        assert etag == (plain_etag(first + second) if store.plain_multipart_etag
                        else multipart_etag(first, second))
        assert await read(s, key) == first + second
        head = await s.head_object(key)
        assert head is not None
        assert (head.size, head.etag) == (len(first) + len(second), etag)
        assert dict(head.metadata) == dict(ATTRS.metadata)
        assert head.content_encoding == "gzip"
        assert [(i.key, i.size, i.etag) for i in [x async for x in s.list_objects("run/")]] == [
            (key, len(first) + len(second), etag)
        ]

    store.run(body)


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def test_multipart_with_crc32_part_checksums(store: StoreFactory) -> None:
    """An upload asked for with CRC32 checksums: SeaweedFS confirms it, checks each part's
    CRC32 (a wrong one is refused) and echoes it; Complete lists the parts with them. The
    directory store keeps Content-MD5 parts (its ETags are MD5s anyway) but checks a CRC32
    it is given all the same."""
    first, second = os.urandom(5 * MiB), os.urandom(1000)

    async def body(s: ObjectStore) -> None:
        key = "run/crc.bin"
        upload = await s.create_multipart_upload(key, attributes=ATTRS, crc32=True)
        # An S3 upload asked for with CRC32 is one, whether the store says so or not (s3rver
        # does not: its parts then carry both checksums, and their ETags prove them).
        assert upload.crc32 is (store.kind == "s3")
        etags = []
        for number, data in ((1, first), (2, second)):
            if upload.crc32:
                etags.append(await s.upload_part(key, upload.upload_id, number, data,
                                                 crc32_b64=crc32_b64(data)))
            else:
                etags.append(await s.upload_part(key, upload.upload_id, number, data,
                                                 md5_b64=md5_b64(data),
                                                 crc32_b64=crc32_b64(data)))
        assert etags == [plain_etag(first), plain_etag(second)]
        if store.checks_checksums:
            # A CRC32 that is not the body's is refused. (A store that checks none, moto,
            # keeps the body, which is intact: its ETag proves that on this side.)
            with pytest.raises(TransientStoreError) as caught:
                await s.upload_part(key, upload.upload_id, 3, b"x", crc32_b64=crc32_b64(b"y"))
            assert caught.value.code == "BadDigest"
        crcs = [crc32_b64(first), crc32_b64(second)] if upload.crc32 else [None, None]
        parts = [UploadedPart(n, etag, len(data), crc32=crc)
                 for n, etag, data, crc in zip((1, 2), etags, (first, second), crcs,
                                               strict=True)]
        etag = await s.complete_multipart_upload(key, upload.upload_id, parts)
        assert etag == (plain_etag(first + second) if store.plain_multipart_etag
                        else multipart_etag(first, second))
        assert await read(s, key) == first + second

    store.run(body)


def test_abort_removes_the_upload(store: StoreFactory) -> None:
    part = os.urandom(1024)

    async def body(s: ObjectStore) -> None:
        key = "run/aborted.bin"
        upload_id = (await s.create_multipart_upload(key, attributes=PLAIN)).upload_id
        await s.upload_part(key, upload_id, 1, part, md5_b64=md5_b64(part))
        if not store.lists_parts:
            # s3rver can neither list nor abort: said as such, not as a failure to retry.
            with pytest.raises(NotSupported):
                await s.abort_multipart_upload(key, upload_id)
            assert s.capabilities[Capability.ABORT_MULTIPART] is False
            return
        assert len(await s.list_parts(key, upload_id)) == 1
        await s.abort_multipart_upload(key, upload_id)
        with pytest.raises(NoSuchUpload):
            await s.list_parts(key, upload_id)
        await s.abort_multipart_upload(key, upload_id)  # already gone: a no-op
        assert await s.head_object(key) is None

    store.run(body)


def test_list_objects_by_prefix(store: StoreFactory) -> None:
    # '-' (0x2d) < '/' (0x2f) < '0' (0x30): a naive tree walk gets the order of these wrong.
    names = ["p/b/c", "p/a", "p/b-d", "p/ab", "p/b0", "q/x", "pz", "p/b/a/deep"]

    async def listed(s: ObjectStore, prefix: str) -> list[str]:
        found = await keys(s, prefix)
        assert len(found) == len(set(found))
        if store.kind == "file":
            assert found == sorted(found)  # S3's order: UTF-8 byte order of the keys
        # SeaweedFS walks its directories instead ('p/b/c' before 'p/b-d'); the pipeline
        # only builds a dict from listings, so only the set is compared there.
        return sorted(found)

    async def body(s: ObjectStore) -> None:
        etags = {}
        for name in names:
            etags[name] = await put(s, name, name.encode())
        assert await listed(s, "p/") == ["p/a", "p/ab", "p/b-d", "p/b/a/deep", "p/b/c", "p/b0"]
        assert await listed(s, "p/a") == ["p/a", "p/ab"]
        assert await listed(s, "p/b/") == ["p/b/a/deep", "p/b/c"]
        assert await listed(s, "p/zz") == []
        assert await listed(s, "nothing/") == []
        assert await listed(s, "") == sorted(names)
        async for info in s.list_objects(""):
            assert (info.size, info.etag) == (len(info.key), etags[info.key])

    store.run(body)


def test_copy_object_copies_data_and_metadata(store: StoreFactory) -> None:
    data = os.urandom(100_000)

    async def body(s: ObjectStore) -> None:
        await put(s, "src/obj", data, ATTRS)
        etag = await s.copy_object("src/obj", "dst/obj")
        # Compared without quotes: see test_copy_object_etag_is_quoted_like_head.
        assert etag.strip('"') == plain_etag(data).strip('"')
        head = await s.head_object("dst/obj")
        assert head is not None
        assert (head.size, head.etag) == (len(data), plain_etag(data))
        assert dict(head.metadata) == dict(ATTRS.metadata)
        assert head.content_encoding == "gzip"
        assert await read(s, "dst/obj") == data
        assert await read(s, "src/obj") == data

    store.run(body)


def test_copy_object_etag_is_quoted_like_head(store: StoreFactory) -> None:
    # SeaweedFS sends CopyObjectResult's ETag without quotes; the store normalises it.

    async def body(s: ObjectStore) -> None:
        await put(s, "src/obj", b"abc")
        etag = await s.copy_object("src/obj", "dst/obj")
        head = await s.head_object("dst/obj")
        assert head is not None and etag == head.etag

    store.run(body)


def test_list_parts_of_unknown_upload(store: StoreFactory) -> None:
    if not store.lists_parts:
        pytest.skip("the store has no ListParts")

    async def body(s: ObjectStore) -> None:
        upload_id = (await s.create_multipart_upload("run/x", attributes=PLAIN)).upload_id
        await s.abort_multipart_upload("run/x", upload_id)
        with pytest.raises(NoSuchUpload):
            await s.list_parts("run/x", upload_id)

    store.run(body)


# -- both stores: reading bodies ---------------------------------------------------------------


def test_get_object_streams_bounded_chunks_with_the_attributes(store: StoreFactory) -> None:
    data = os.urandom(3 * MiB + 17)

    async def body(s: ObjectStore) -> None:
        etag = await put(s, "run/w.bin", data, ATTRS)
        async with s.get_object("run/w.bin", chunk_size=256 * 1024) as got:
            assert (got.offset, got.end) == (0, len(data))
            info = got.info
            chunks = [chunk async for chunk in got]
        assert b"".join(chunks) == data
        assert max(map(len, chunks)) <= 256 * 1024  # the buffer stays what was asked for
        assert (info.key, info.size, info.etag) == ("run/w.bin", len(data), etag)
        assert dict(info.metadata) == dict(ATTRS.metadata)  # the digest, to verify against
        assert info.content_encoding == "gzip"
        # Outside 'async with' nothing has been asked of the store yet.
        with pytest.raises(RuntimeError):
            _ = s.get_object("run/w.bin").info

    store.run(body)


def test_get_object_by_range(store: StoreFactory) -> None:
    data = os.urandom(MiB + 3)
    size = len(data)

    async def body(s: ObjectStore) -> None:
        etag = await put(s, "r", data, ATTRS)
        for offset, end in [(0, 10), (10, None), (size - 1, None), (5, size + 100),
                            (1000, 2000), (7, 7), (size, None), (size, size)]:
            async with s.get_object("r", offset=offset, end=end) as got:
                chunks = [chunk async for chunk in got]
                # The whole object's attributes, whatever the range (an empty one too).
                assert (got.info.size, got.info.etag) == (size, etag), (offset, end)
                assert dict(got.info.metadata) == dict(ATTRS.metadata)
                assert (got.offset, got.end) == (offset, min(size, end or size))
            assert b"".join(chunks) == data[offset:end], (offset, end)
        with pytest.raises(StoreError) as past:
            await read(s, "r", offset=size + 1)
        assert past.value.code == "InvalidRange"
        for bad in ({"offset": -1}, {"offset": 5, "end": 4}, {"chunk_size": 0}):
            with pytest.raises(ValueError):
                s.get_object("r", **bad)

        await put(s, "empty", b"")
        assert await read(s, "empty") == b""
        if store.server is not None and store.server.kind == "s3rver":
            return  # s3rver answers a range of an empty object with a body it never sends
        assert await read(s, "empty", offset=0, end=10) == b""
        async with s.get_object("empty", offset=0, end=10) as got:
            assert (got.info.size, got.end) == (0, 0)

    store.run(body)


def test_get_object_ranges_of_one_version_in_parallel(store: StoreFactory) -> None:
    data = os.urandom(4 * MiB + 1)

    async def body(s: ObjectStore) -> None:
        etag = await put(s, "big", data)
        bounds = list(range(0, len(data), MiB)) + [len(data)]
        pieces = await asyncio.gather(*(
            read(s, "big", offset=start, end=stop, if_match=etag)
            for start, stop in zip(bounds, bounds[1:], strict=False)
        ))
        assert b"".join(pieces) == data
        # A range of another version than the one the others came from is refused.
        await put(s, "big", data[::-1])
        with pytest.raises(ObjectChanged):
            await read(s, "big", offset=MiB, end=2 * MiB, if_match=etag)
        with pytest.raises(ObjectChanged):  # an empty range as well: no byte, still refused
            await read(s, "big", offset=MiB, end=MiB, if_match=etag)

    store.run(body)


def test_get_object_of_a_missing_key(store: StoreFactory) -> None:
    async def body(s: ObjectStore) -> None:
        for ranged in ({}, {"offset": 10}, {"offset": 0, "end": 5}, {"offset": 3, "end": 3}):
            with pytest.raises(NotFound):
                async with s.get_object("no/such/key", **ranged):
                    pass

    store.run(body)


@dataclass
class Interruptions:
    """A store whose next GetObject bodies can be cut off part-way."""

    factory: StoreFactory
    # Cut the next ``times`` bodies off, each ``at`` bytes after it started (the directory
    # store: a read fails at the first chunk that far on).
    cut: Callable[[int, int], None]
    transferred: Callable[[], int]  # body bytes the store sent since the last cut
    overwrite: Callable[[str, bytes], None]  # another writer replaces an object, synchronously


@pytest.fixture(params=["file", *server_params("s3")])
def interrupted(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Interruptions]:
    if request.param == "file":
        import errno

        from asyncsync.stores import local as localstore

        root = tmp_path / "store"
        root.mkdir()
        real_read_at = localstore._read_at
        cuts: dict[str, int] = {"at": 0, "step": 0, "left": 0, "read": 0}

        def read_at(fd: int, size: int, offset: int) -> bytes:
            if cuts["left"] and offset >= cuts["at"]:
                cuts["left"] -= 1
                cuts["at"] = offset + cuts["step"]
                # A stale NFS handle: transient, and only a new open helps.
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            chunk = real_read_at(fd, size, offset)
            cuts["read"] += len(chunk)
            return chunk

        monkeypatch.setattr(localstore, "_read_at", read_at)

        def cut(at: int, times: int) -> None:
            cuts.update(at=at, step=at, left=times, read=0)

        def overwrite(key: str, data: bytes) -> None:
            async def put_elsewhere() -> None:
                other = await open_file_store(str(root))
                await put(other, key, data)

            # The store's own event loop is busy reading: another writer has its own.
            writer = threading.Thread(target=asyncio.run, args=(put_elsewhere(),))
            writer.start()
            writer.join()

        yield Interruptions(file_factory(root), cut, lambda: cuts["read"], overwrite)
        return
    server: S3Server = request.getfixturevalue(f"{request.param.split(':')[1]}_server")
    only_these_credentials(monkeypatch, server.access_key, server.secret_key)
    client = server.client()
    with new_bucket(server) as bucket, FaultProxy(server.endpoint) as proxy:
        def cut_s3(at: int, times: int) -> None:
            proxy.reset_stats()
            # The pause lets the client take the bytes sent before the reset lands.
            proxy.inject("truncate-response", times, method="GET", truncate_at=at, delay=0.3)

        yield Interruptions(
            s3_factory(proxy.endpoint, bucket), cut_s3,
            lambda: proxy.stats.body_bytes_downstream,
            lambda key, data: client.put_object(Bucket=bucket, Key=key, Body=data),
        )
    client.close()


def test_get_object_resumes_after_the_connection_drops_mid_body(
    interrupted: Interruptions,
) -> None:
    data = os.urandom(3 * MiB + 5)
    retries: list[TransientStoreError] = []

    async def body(s: ObjectStore) -> None:
        etag = await put(s, "run/last.pt", data, ATTRS)
        interrupted.cut(MiB + 4321, 1)
        async with s.get_object("run/last.pt", chunk_size=256 * 1024) as got:
            assert got.info.etag == etag
            assert b"".join([chunk async for chunk in got]) == data
        assert len(retries) == 1
        # Resumed from the last byte received: no byte of the object was sent twice. (At
        # most: the proxy counts what it handed the kernel before the reset, and moto's
        # closing connections can leave a piece of that uncounted.)
        assert interrupted.transferred() <= len(data)

        # A range is resumed within its bounds.
        interrupted.cut(300_000, 1)
        assert await read(s, "run/last.pt", offset=100_000, end=2 * MiB) == data[100_000:2 * MiB]
        assert len(retries) == 2
        assert interrupted.transferred() <= 2 * MiB - 100_000

    interrupted.factory.run(body, on_retry=lambda exc, attempt, pause: retries.append(exc))


def test_get_object_retries_count_per_chunk(interrupted: Interruptions) -> None:
    """A body that keeps moving is never given up on, however often it drops; one that
    delivers nothing fails after the store's attempts (2 for S3 here, 3 for a directory)."""
    data = os.urandom(MiB)
    retries: list[TransientStoreError] = []

    async def body(s: ObjectStore) -> None:
        await put(s, "k", data)
        interrupted.cut(100_000, 5)  # more drops than attempts, each after some progress
        assert await read(s, "k", chunk_size=16 * 1024) == data
        assert len(retries) == 5
        # At most: the proxy counts what it handed the kernel before each reset, and a
        # server closing its connections (moto, s3rver) can leave a piece of that uncounted.
        assert interrupted.transferred() <= len(data)

        retries.clear()
        interrupted.cut(0, 20)  # every request dies before its first byte
        with pytest.raises(TransientStoreError):
            await read(s, "k")
        assert len(retries) == (1 if interrupted.factory.kind == "s3" else 2)

    interrupted.factory.run(body, on_retry=lambda exc, attempt, pause: retries.append(exc))


def test_get_object_refuses_to_splice_a_changed_object(interrupted: Interruptions) -> None:
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    done: list[bool] = []

    def overwrite_once(exc: TransientStoreError, attempt: int, pause: float) -> None:
        if not done:  # between the drop and the resumed request
            interrupted.overwrite("run/results.csv", new)
            done.append(True)

    async def body(s: ObjectStore) -> None:
        await put(s, "run/results.csv", old)
        interrupted.cut(MiB, 1)
        got: list[bytes] = []
        with pytest.raises(ObjectChanged) as changed:
            async with s.get_object("run/results.csv", chunk_size=64 * 1024) as chunks:
                async for chunk in chunks:
                    got.append(chunk)
        assert done and 0 < len(b"".join(got)) < len(old)
        assert b"".join(got) == old[:len(b"".join(got))]  # only ever the old version's bytes
        assert changed.value.key == "run/results.csv"
        assert "changed" in str(changed.value) or "no longer" in str(changed.value)
        assert await read(s, "run/results.csv") == new  # read again: the new version, whole

    interrupted.factory.run(body, on_retry=overwrite_once)


# -- S3 only: checking the bucket ---------------------------------------------------------


@pytest.mark.s3
@pytest.mark.servers("seaweedfs")  # moto takes any keys, s3rver does not check the secret
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "botocore"])
def test_s3_check_bucket_tells_missing_bucket_and_bad_secret_apart(
    s3_server: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    config = StoreConfig(
        endpoint_url=s3_server.endpoint, region="us-east-1", addressing_style="path",
        max_attempts=2, direct_uploads=direct,
    )

    async def check(name: str, secret: str) -> None:
        from asyncsync.stores.s3 import open_s3_store

        only_these_credentials(monkeypatch, s3_server.access_key, secret)
        store = await open_s3_store(name, config)
        try:
            await store.check_bucket()
        finally:
            await store.close()

    asyncio.run(check(bucket, s3_server.secret_key))
    with pytest.raises(FatalStoreError) as missing:
        asyncio.run(check("no-such-bucket-here", s3_server.secret_key))
    assert missing.value.code == "NoSuchBucket"
    assert "s3://no-such-bucket-here does not exist" in str(missing.value)
    with pytest.raises(FatalStoreError) as bad_secret:
        asyncio.run(check(bucket, "not-the-secret"))
    assert "secret key does not match" in str(bad_secret.value)
    assert "not-the-secret" not in str(bad_secret.value)


class _RegionRedirect(http.server.BaseHTTPRequestHandler):
    """Answers every HEAD as AWS answers a bucket asked for at another region's endpoint."""

    seen: list[tuple[str, str]] = []

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).seen.append((self.path, self.headers.get("Authorization", "")))
        self.send_response(301)
        self.send_header("x-amz-bucket-region", "eu-west-1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_s3_check_bucket_in_another_region_names_the_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SeaweedFS has one region; this is how AWS answers a bucket that lives elsewhere.
    only_these_credentials(monkeypatch, "AKIDEXAMPLE", "example-secret")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RegionRedirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = StoreConfig(
        endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", region="us-east-1",
        addressing_style="path", max_attempts=3,
    )

    async def check() -> None:
        from asyncsync.stores.s3 import open_s3_store

        store = await open_s3_store("far-away", config)
        try:
            await store.check_bucket()
        finally:
            await store.close()

    try:
        with pytest.raises(FatalStoreError) as error:
            asyncio.run(check())
    finally:
        server.shutdown()
        server.server_close()
    assert "the bucket is in region eu-west-1" in str(error.value)
    assert "--region eu-west-1" in str(error.value)
    assert len(_RegionRedirect.seen) == 1  # fatal: not retried
    path, authorization = _RegionRedirect.seen[0]
    assert path == "/far-away"
    assert "Credential=AKIDEXAMPLE/" in authorization and "/us-east-1/s3/" in authorization


@pytest.mark.parametrize(
    ("endpoint", "proxy", "expected"),
    [
        ("http://127.0.0.1:8333", None, {"verify": False}),
        ("HTTP://minio.local:9000", None, {"verify": False}),
        ("https://s3.example.com", None, {}),
        (None, None, {}),
        ("http://minio.local:9000", "https://proxy.example:3128", {}),
    ],
)
def test_tls_verification_is_left_out_only_where_no_tls_is_spoken(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, proxy: str | None,
    expected: dict[str, bool],
) -> None:
    from asyncsync.stores.s3 import tls_verify_override

    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                 "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    assert tls_verify_override(endpoint) == expected


# -- S3 only: a store that stops answering ----------------------------------------------------


@pytest.mark.parametrize(
    ("direct", "size"),
    [(True, 16 * MiB), (True, 100_000), (True, 1000), (False, 1000)],
    ids=["direct-stalled-body", "direct-streamed", "direct-small", "botocore-small"],
)
def test_uploads_to_a_store_that_never_answers_time_out(
    monkeypatch: pytest.MonkeyPatch, direct: bool, size: int
) -> None:
    """aiohttp's sock_read starts only once the body is sent: a body the store stops taking
    (16 MiB into a closed window), or one waiting for a 100 Continue that never comes
    (botocore), must still fail within the read timeout."""
    only_these_credentials(monkeypatch, "AKIDEXAMPLE", "example-secret")
    body = os.urandom(size)

    async def upload(server: SilentServer) -> None:
        from asyncsync.stores.s3 import open_s3_store

        config = StoreConfig(
            endpoint_url=f"http://127.0.0.1:{server.port}", region="us-east-1",
            addressing_style="path", max_attempts=1, direct_uploads=direct,
            connect_timeout=1, read_timeout=1,
        )
        store = await open_s3_store("hung", config)
        try:
            await asyncio.wait_for(
                store.upload_part("k", "u", 1, body, md5_b64=md5_b64(body)), 20
            )
        finally:
            # aiohttp closes a failed connection gracefully: with body bytes still queued
            # it stays open until the store reads them. A reset ends it before the loop closes.
            server.hang_up()
            await asyncio.sleep(0.2)
            await store.close()

    with SilentServer() as server:
        started = time.monotonic()
        with pytest.raises(TransientStoreError) as error:
            asyncio.run(upload(server))
        took = time.monotonic() - started
    assert str(error.value) == (
        f"UploadPart s3://hung/k: no answer from 127.0.0.1:{server.port} within 1 s"
    )
    assert took < 10, took


def test_timeouts_and_connection_failures_are_named_by_host() -> None:
    import aiohttp
    from botocore import exceptions as bce

    from asyncsync.stores.s3errors import endpoint_host, translate_error

    def message(exc: BaseException, endpoint: str = "http://10.0.0.5:9000") -> str:
        translated = translate_error(exc, op="PutObject", key="k", location="s3://b",
                                     endpoint=endpoint, timeouts=(3.0, 45.5))
        assert isinstance(translated, TransientStoreError)
        return str(translated)

    url = "http://10.0.0.5:9000/b/k"
    assert message(bce.ConnectTimeoutError(endpoint_url=url)) == (
        "PutObject s3://b/k: no answer from 10.0.0.5:9000 within 3 s"
    )
    assert message(bce.ReadTimeoutError(endpoint_url=url)) == (
        "PutObject s3://b/k: no answer from 10.0.0.5:9000 within 45.5 s"
    )
    assert message(aiohttp.ServerTimeoutError("Connection timeout to host x")).endswith(
        "within 3 s"
    )
    assert message(aiohttp.ServerTimeoutError("Timeout on reading data from socket")).endswith(
        "within 45.5 s"
    )
    assert message(TimeoutError()).endswith("within 45.5 s")
    assert message(bce.EndpointConnectionError(endpoint_url=url)) == (
        "PutObject s3://b/k: cannot connect to 10.0.0.5:9000"
    )
    # Host and port only: never a path, a user or a password.
    assert endpoint_host("https://user:pw@s3.example.com/base") == "s3.example.com:443"
    assert endpoint_host("http://[::1]:8333") == "[::1]:8333"
    assert endpoint_host("HTTP://minio") == "minio:80"
    assert endpoint_host("") == "the endpoint"


# -- FileStore only ---------------------------------------------------------------------------


def file_store(tmp_path: Path) -> tuple[Path, StoreFactory]:
    root = tmp_path / "store"
    root.mkdir()
    return root, file_factory(root)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(
    "key",
    ["../evil", "a/../../evil", "/abs/evil", "a//b", "./a", "a/./b", "a/", "", "..",
     f"{STATE_DIR}/meta/x.json", "a/.asyncsync-tmp-" + "0" * 32, "nul\x00byte"],
)
def test_file_store_refuses_keys_that_could_escape(tmp_path: Path, key: str) -> None:
    root, factory = file_store(tmp_path)
    outside_before = tree(tmp_path)

    async def body(s: ObjectStore) -> None:
        with pytest.raises(StoreError) as caught:
            await put(s, key, b"escape")
        assert caught.value.code == "InvalidKey"
        for attempt in (
            s.head_object(key),
            read(s, key),
            s.create_multipart_upload(key, attributes=PLAIN),
            s.copy_object("fine", key),
        ):
            with pytest.raises(StoreError):
                await attempt

    factory.run(body)
    assert tree(tmp_path) == outside_before  # nothing written anywhere, inside or out


def test_file_store_layout_and_hidden_state(tmp_path: Path) -> None:
    root, factory = file_store(tmp_path)
    part = os.urandom(10)

    async def body(s: ObjectStore) -> None:
        await put(s, "run/a.txt", b"a", ATTRS)
        upload_id = (await s.create_multipart_upload("run/b.bin", attributes=ATTRS)).upload_id
        await s.upload_part("run/b.bin", upload_id, 1, part, md5_b64=md5_b64(part))
        # A temp file a crash left behind is not an object either.
        (root / "run" / (".asyncsync-tmp-" + "f" * 32)).write_bytes(b"junk")
        assert await keys(s, "") == ["run/a.txt"]
        assert await keys(s, ".asyncsync") == []
        assert await keys(s, f"{STATE_DIR}/") == []
        assert (root / "run" / "a.txt").read_bytes() == b"a"
        assert (root / STATE_DIR / "meta" / "run" / "a.txt.json").is_file()
        assert (root / STATE_DIR / "uploads" / upload_id / "1").read_bytes() == part
        await s.abort_multipart_upload("run/b.bin", upload_id)
        assert not (root / STATE_DIR / "uploads" / upload_id).exists()

    factory.run(body)


def test_file_store_check_bucket(tmp_path: Path) -> None:
    async def check(root: Path) -> None:
        store = await open_file_store(str(root))
        try:
            await store.check_bucket()
        finally:
            await store.close()

    root, _ = file_store(tmp_path)
    asyncio.run(check(root))
    with pytest.raises(FatalStoreError):
        asyncio.run(check(tmp_path / "missing"))
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(FatalStoreError):
        asyncio.run(check(tmp_path / "a-file"))
    assert FileStore(str(root)).location == f"file://{root}"


def test_file_store_never_recreates_a_vanished_root(tmp_path: Path) -> None:
    root, factory = file_store(tmp_path)

    async def body(s: ObjectStore) -> None:
        root.rmdir()  # unmounted, say
        with pytest.raises(FatalStoreError):
            await put(s, "run/a", b"a")
        assert not root.exists()

    factory.run(body)


def test_file_store_key_conflicts_with_a_directory(tmp_path: Path) -> None:
    _, factory = file_store(tmp_path)

    async def body(s: ObjectStore) -> None:
        await put(s, "a/b", b"1")
        # S3 could hold both; a file tree cannot: a plain (per-file, not retried) StoreError.
        for key, code in (("a", "EISDIR"), ("a/b/c", "ENOTDIR")):
            with pytest.raises(StoreError) as caught:
                await put(s, key, b"2")
            assert type(caught.value) is StoreError and caught.value.code == code
        assert await s.head_object("a") is None
        assert await keys(s, "") == ["a/b"]

    factory.run(body)


def test_file_store_stale_sidecar_is_never_paired_with_other_data(tmp_path: Path) -> None:
    """What a crash between the sidecar and the data rename (or a hand edit) leaves behind."""
    root, factory = file_store(tmp_path)

    async def body(s: ObjectStore) -> None:
        await put(s, "run/a", b"old content", ATTRS)
        # New bytes under the old sidecar: the sidecar no longer describes them.
        (root / "run" / "a").write_bytes(b"new content!")
        head = await s.head_object("run/a")
        assert head is not None
        assert (head.etag, dict(head.metadata)) == (plain_etag(b"new content!"), {})
        assert [i.etag async for i in s.list_objects("run/")] == [head.etag]

    factory.run(body)


def test_file_store_complete_checks_parts(tmp_path: Path) -> None:
    _, factory = file_store(tmp_path)
    small, other = b"small part", b"other"

    async def body(s: ObjectStore) -> None:
        key = "run/x"
        upload_id = (await s.create_multipart_upload(key, attributes=PLAIN)).upload_id
        etag1 = await s.upload_part(key, upload_id, 1, small, md5_b64=md5_b64(small))
        etag2 = await s.upload_part(key, upload_id, 2, other, md5_b64=md5_b64(other))
        attempts = {
            "InvalidPart": [UploadedPart(1, plain_etag(b"not it"), len(small))],
            "InvalidPartOrder": [UploadedPart(2, etag2, 5), UploadedPart(1, etag1, 10)],
            "EntityTooSmall": [UploadedPart(1, etag1, 10), UploadedPart(2, etag2, 5)],
            "MalformedXML": [],
        }
        for code, parts in attempts.items():
            with pytest.raises(StoreError) as caught:
                await s.complete_multipart_upload(key, upload_id, parts)
            assert caught.value.code == code
        with pytest.raises(StoreError) as missing:
            await s.complete_multipart_upload(key, upload_id, [UploadedPart(7, etag1, 1)])
        assert missing.value.code == "InvalidPart"
        # Refused completions leave the upload as it was; a single small part is fine.
        assert len(await s.list_parts(key, upload_id)) == 2
        etag = await s.complete_multipart_upload(key, upload_id, [UploadedPart(1, etag1, 10)])
        assert etag == multipart_etag(small)
        assert await read(s, key) == small
        with pytest.raises(NoSuchUpload):
            await s.list_parts(key, upload_id)
        with pytest.raises(NoSuchUpload):
            await s.upload_part(key, upload_id, 3, small, md5_b64=md5_b64(small))
        with pytest.raises(NoSuchUpload):  # an id that is not ours cannot name a directory
            await s.list_parts(key, "../../meta")

    factory.run(body)


def test_file_store_maps_os_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from asyncsync.stores import local as localstore

    root, factory = file_store(tmp_path)
    real_write_all = localstore._write_all
    failures = [errno.ESTALE, errno.ENOSPC]

    def flaky_write_all(fd: int, data: bytes | memoryview) -> None:
        if failures:
            number = failures.pop(0)
            raise OSError(number, os.strerror(number))
        real_write_all(fd, data)

    monkeypatch.setattr(localstore, "_write_all", flaky_write_all)

    async def body(s: ObjectStore) -> None:
        # ESTALE (an NFS hiccup) is transient and retried inside the store, then ENOSPC is not.
        with pytest.raises(StoreError) as caught:
            await put(s, "run/a", b"data")
        assert not isinstance(caught.value, TransientStoreError)
        assert caught.value.code == "ENOSPC"
        assert isinstance(caught.value.__cause__, OSError)
        assert failures == []
        assert await s.head_object("run/a") is None
        assert await put(s, "run/a", b"data") == plain_etag(b"data")

    factory.run(body)
    leftovers = [p for p in tree(root) if ".asyncsync-tmp-" in p]
    assert leftovers == []


# -- S3 only: what a HEAD must confirm where the answers prove nothing ------------------------


class _AnswersProvingNothing:
    """A botocore client stand-in for `S3Store`: uploads answered with ETags of its own
    kind (no MD5), and HEAD answering what the test says the store holds."""

    def __init__(self, stored_size: int, stored_etag: str) -> None:
        self.meta = type("Meta", (), {"endpoint_url": "http://store.test", "region_name": None})
        self.stored_size, self.stored_etag = stored_size, stored_etag
        self.calls: list[str] = []

    async def put_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append("PutObject")
        return {"ETag": '"own-kind-1"'}

    async def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append("CompleteMultipartUpload")
        return {"ETag": '"own-kind-2"'}

    async def head_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append("HeadObject")
        return {"ContentLength": self.stored_size, "ETag": self.stored_etag}

    async def delete_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append("DeleteObject")
        return {}


def _store_over(client: _AnswersProvingNothing) -> Any:
    import contextlib

    from asyncsync.stores.s3 import S3Store

    config = StoreConfig(max_attempts=2, backoff_base=0.0, backoff_cap=0.0,
                         direct_uploads=False)
    return S3Store(client, contextlib.AsyncExitStack(), "b", config, None)


@pytest.mark.parametrize(("stored_size", "stored_etag", "proven"), [
    (5, 'W/"own-kind-1"', True),  # quotes and a weak prefix are a store's spelling
    (4, '"own-kind-1"', False),  # fewer bytes kept than were sent
    (5, '"own-kind-9"', False),  # another object under the key than the PUT answered for
], ids=["same", "short", "other-etag"])
def test_an_unproven_put_is_confirmed_by_the_size_and_etag_a_head_finds(
    stored_size: int, stored_etag: str, proven: bool
) -> None:
    client = _AnswersProvingNothing(stored_size, stored_etag)
    store = _store_over(client)
    put = store.put_object("k", b"12345", md5_b64=base64.b64encode(
        hashlib.md5(b"12345").digest()).decode(), attributes=ObjectAttributes({}))
    if proven:
        assert asyncio.run(put) == '"own-kind-1"'
        assert client.calls == ["PutObject", "HeadObject"]
        return
    with pytest.raises(BadDigest) as error:
        asyncio.run(put)
    assert ("kept 4 bytes of the 5 sent" if stored_size == 4 else
            'has ETag "own-kind-9", the upload was answered with "own-kind-1"') in str(
        error.value)
    # Sent again (BadDigest is retried), then the damaged object is deleted.
    assert client.calls == ["PutObject", "HeadObject"] * 2 + ["DeleteObject"]


@pytest.mark.parametrize(("stored_size", "stored_etag", "proven"), [
    (12, '"own-kind-2"', True),
    (11, '"own-kind-2"', False),
    (12, '"own-kind-1"', False),
], ids=["same", "short", "other-etag"])
def test_an_unproven_multipart_upload_is_confirmed_once_complete(
    stored_size: int, stored_etag: str, proven: bool
) -> None:
    client = _AnswersProvingNothing(stored_size, stored_etag)
    store = _store_over(client)
    store._unproven_uploads.add("u1")  # a part's answer proved nothing
    parts = [UploadedPart(1, '"p1"', 5), UploadedPart(2, '"p2"', 7)]
    complete = store.complete_multipart_upload("k", "u1", parts)
    if proven:
        assert asyncio.run(complete) == '"own-kind-2"'
        assert client.calls == ["CompleteMultipartUpload", "HeadObject"]
        return
    with pytest.raises(BadDigest):
        asyncio.run(complete)
    # The HEAD is asked again (the object may be settling), then the object is deleted.
    assert client.calls == ["CompleteMultipartUpload", "HeadObject", "HeadObject",
                            "DeleteObject"]
