"""`pipeline.multipart`: a large file's multipart upload, when it fails.

What S3 does is tested against the real servers, through the fault proxy (an upload whose
abort fails is never forgotten while it is open). What only our own code decides (how long
a part's buffer lives) is tested in-process, with a small store of the methods a
`LargeUpload` calls: parts fail on cue, and an abort waits for the test.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import tracemalloc
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asyncsync.config import MiB, TransferConfig
from asyncsync.errors import TransientStoreError
from asyncsync.pipeline import digest
from asyncsync.pipeline.budget import ByteBudget
from asyncsync.pipeline.manifest import Manifest, Scope
from asyncsync.pipeline.multipart import LargeUpload, UploadContext
from asyncsync.pipeline.scan import ScannedFile
from asyncsync.pipeline.source import SourceRoot
from asyncsync.stores.capabilities import Capabilities, Capability
from asyncsync.stores.protocol import MultipartUpload, ObjectAttributes

from .conftest import S3Server, open_uploads, read_object, run_cli
from .faultproxy import FaultProxy

PART = 5 * MiB  # the smallest part S3 takes


# -- an upload whose abort fails stays remembered until it is aborted ---------------------


def _push(s3_server: S3Server, proxy: FaultProxy, src: Path, dest: str, state: Path) -> Any:
    return run_cli("push", src, dest, "--state-dir", state, "--json", "--retries", "1",
                   "--multipart-threshold", "8MiB", "--part-size", "8MiB",
                   env=s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint))


def _forget_that_the_store_lists_parts(state: Path) -> None:
    """As if the store had answered ListParts with NotImplemented (the proxy cannot)."""
    with sqlite3.connect(state / "manifest.db") as db:
        (store, bucket), = db.execute("SELECT store, bucket FROM uploads").fetchall()
    manifest = Manifest.open(state)
    try:
        manifest.learn_capability(Scope(store, bucket), Capability.LIST_PARTS.value, False)
        manifest.commit()
    finally:
        manifest.close()


@pytest.mark.s3
@pytest.mark.servers("seaweedfs", "moto")  # s3rver cannot abort: its uploads are forgotten
@pytest.mark.parametrize("stale", ["changed", "unlistable"])
def test_an_upload_whose_abort_fails_is_not_forgotten_until_it_is_aborted(
    s3_server: S3Server, bucket: str, tmp_path: Path, stale: str
) -> None:
    """Every AbortMultipartUpload answered 503. A failed upload is kept in the manifest;
    the file's next run cannot resume it (the file changed, or nothing lists its parts)
    and cannot abort it either: the file fails again rather than start an upload whose row
    would replace the open one's. Once the store heals, the old upload is aborted and the
    file goes up: no upload is left open in the bucket."""
    src = tmp_path / "runs"
    src.mkdir()
    path = src / "w.pt"
    path.write_bytes(os.urandom(20 * MiB))
    state = tmp_path / "state"
    dest = f"s3://{bucket}/m"
    client = s3_server.client()
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.inject("503", 10_000, method="DELETE")
        proxy.inject("503", 10_000, method="PUT", query_contains="partNumber=2")
        failed = _push(s3_server, proxy, src, dest, state)
        assert failed.returncode == 1, failed.stderr
        assert failed.files("failed") == ["w.pt"]
        assert "could not abort upload" in failed.stderr
        [first] = open_uploads(client, bucket)

        if stale == "changed":
            path.write_bytes(os.urandom(20 * MiB))
        else:
            _forget_that_the_store_lists_parts(state)
        proxy.clear_rules()
        proxy.reset_stats()
        proxy.inject("503", 10_000, method="DELETE")
        again = _push(s3_server, proxy, src, dest, state)
        assert again.returncode == 1, again.stderr
        assert again.files("failed") == ["w.pt"]
        assert f"could not abort its earlier upload {first['UploadId']}" in again.stderr
        assert "AbortMultipartUpload" in again.records[0]["error"]
        # Nothing new was started while the old one could not be aborted.
        assert open_uploads(client, bucket) == [first]
        assert proxy.stats.requests_to("POST", "uploads") == []

        proxy.clear_rules()
        healed = _push(s3_server, proxy, src, dest, state)
    assert healed.returncode == 0, healed.stderr
    assert healed.files("uploaded") == ["w.pt"]
    assert read_object(client, bucket, "m/w.pt") == path.read_bytes()
    assert open_uploads(client, bucket) == []


# -- no part buffer outlives the grant that pays for it ----------------------------------


class PartsFailStore:
    """The store methods a failing `LargeUpload` calls. Once ``in_flight`` parts are being
    sent, part ``failing`` fails (as the store's retries would end) and the others hang
    until cancelled; part numbers in ``succeeding`` are stored at once. An abort waits
    for ``abort_may_end``."""

    location = "fake://bucket"

    def __init__(self, in_flight: int, failing: int, succeeding: frozenset[int] = frozenset()):
        self.capabilities = Capabilities()
        self.in_flight = in_flight
        self.failing = failing
        self.succeeding = succeeding
        self.sending = 0
        self.fail_now = asyncio.Event()  # set by the test, or once ``in_flight`` are sending
        self.aborting = asyncio.Event()
        self.abort_may_end = asyncio.Event()
        self.aborted: list[str] = []

    async def create_multipart_upload(
        self, key: str, *, attributes: ObjectAttributes, crc32: bool = False
    ) -> MultipartUpload:
        return MultipartUpload("upload-1")

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes, *,
        md5_b64: str | None = None, crc32_b64: str | None = None,
    ) -> str:
        # As in a real store (s3.py), the part is sent by a closure: the frames below a
        # failed send hold it in their locals, and in the cells of the functions they ran.
        async def send() -> str:
            return await self._send(key, part_number, body)

        return await send()

    async def _send(self, key: str, part_number: int, body: bytes) -> str:
        if part_number in self.succeeding:
            return f'"etag-{part_number}"'
        self.sending += 1
        if self.sending == self.in_flight:
            self.fail_now.set()
        await self.fail_now.wait()
        if part_number == self.failing:
            raise TransientStoreError(f"UploadPart {key}: SlowDown", op="UploadPart", key=key,
                                      code="SlowDown")
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("unreachable")

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        self.aborting.set()
        await self.abort_may_end.wait()
        self.aborted.append(upload_id)


def _large_upload(
    tmp_path: Path, store: PartsFailStore, parts: int, part_concurrency: int,
    threads: ThreadPoolExecutor,
) -> tuple[LargeUpload, ByteBudget, Manifest]:
    src = tmp_path / "runs"
    src.mkdir()
    path = src / "w.pt"
    with path.open("wb") as file:
        file.truncate(parts * PART)  # sparse: read back as zeros, allocated all the same
    st = path.stat()
    scanned = ScannedFile(str(path), "w.pt", st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev,
                          SourceRoot(str(src)))
    file_digest, identity = digest.hash_file(scanned)
    manifest = Manifest.open(tmp_path / "state")
    budget = ByteBudget(64 * MiB)

    async def get_store() -> Any:
        return store

    context = UploadContext(
        get_store, manifest, Scope("fake", "bucket"),
        TransferConfig(part_size=PART, part_concurrency=part_concurrency, max_memory=64 * MiB),
        budget, threads,
    )
    upload = LargeUpload(context, scanned, "runs/w.pt", None, st.st_size, identity, file_digest,
                         None)
    return upload, budget, manifest


def _part_buffers_alive() -> int:
    """How many part-sized buffers `digest.read_part` allocated are still alive."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, digest.__file__)]
    )
    return sum(1 for trace in snapshot.traces if trace.size >= PART)


def _traced(scenario: Callable[[], Any]) -> Any:
    """Run ``scenario`` (a coroutine function) with allocations traced, and without the
    cycle collector: a buffer the test finds freed was freed by its last reference going,
    at once, not by a collection that happened to run."""
    import gc

    tracing = tracemalloc.is_tracing()
    collecting = gc.isenabled()
    if not tracing:
        tracemalloc.start()
    gc.disable()
    try:
        return asyncio.run(scenario())
    finally:
        if collecting:
            gc.enable()
        if not tracing:
            tracemalloc.stop()


def test_no_part_buffer_outlives_its_grant_while_a_failed_upload_aborts(
    tmp_path: Path,
) -> None:
    """Three parts in flight, one fails: the upload is aborted, and the abort takes as
    long as the store makes it. Meanwhile every grant is back in the budget, and no part
    buffer may still be alive: not in the failed send's frames, nor the cancelled ones',
    nor in the store's beneath them (their locals, their closures' cells), which the
    error's traceback keeps."""
    store = PartsFailStore(in_flight=3, failing=2)
    with ThreadPoolExecutor(1) as threads:
        # All the file's parts in flight at once: no read is under way when one fails.
        upload, budget, manifest = _large_upload(tmp_path, store, parts=3,
                                                 part_concurrency=3, threads=threads)

        async def scenario() -> tuple[int, int]:
            running = asyncio.create_task(upload.run())
            await store.aborting.wait()
            # The pool's thread drops its last call (whose result was a part) only once it
            # runs again: it has when it runs the next.
            await asyncio.wrap_future(threads.submit(lambda: None))
            seen = budget.in_use, _part_buffers_alive()
            store.abort_may_end.set()
            with pytest.raises(TransientStoreError, match="SlowDown"):
                await running
            return seen

        try:
            in_use, alive = _traced(scenario)
        finally:
            manifest.close()
    assert store.aborted == ["upload-1"]
    assert in_use == 0
    assert alive == 0


class HeldRead(ThreadPoolExecutor):
    """Runs the ``held``-th call it is given only once ``may_read`` is set, and notes how
    many bytes of the budget are paid for when that call has read its part, and what it
    raised, if anything."""

    def __init__(self, held: int) -> None:
        super().__init__(2)
        self.held = held
        self.calls = 0
        self.started = threading.Event()
        self.may_read = threading.Event()
        self.finished = threading.Event()
        self.budget: ByteBudget | None = None
        self.paid_when_read: int | None = None
        self.error: BaseException | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls += 1
        if self.calls != self.held:
            return super().submit(fn, *args, **kwargs)

        def held() -> Any:
            self.started.set()
            self.may_read.wait(30)
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                self.error = exc
                raise
            finally:
                assert self.budget is not None
                self.paid_when_read = self.budget.in_use
                self.finished.set()

        return super().submit(held)


def test_a_read_cancelled_half_way_keeps_its_grant_until_the_thread_is_done(
    tmp_path: Path,
) -> None:
    """Part 1 is stored, so part 3 is read; while the thread reads it, part 2 fails and
    the reader is cancelled. The buffer the thread is filling comes into being after that:
    its grant stays out until the thread is done with it, then comes back; and the file
    stays open for the read (closed, its descriptor's number could be another file's)."""
    store = PartsFailStore(in_flight=99, failing=2, succeeding=frozenset({1}))
    threads = HeldRead(held=4)  # the file is opened in the pool, then parts 1, 2 and 3 read
    with threads:
        upload, budget, manifest = _large_upload(tmp_path, store, parts=4,
                                                 part_concurrency=2, threads=threads)
        threads.budget = budget

        async def scenario() -> tuple[int, int | None, int]:
            running = asyncio.create_task(upload.run())
            assert await asyncio.to_thread(threads.started.wait, 30)
            store.fail_now.set()
            await store.aborting.wait()
            paid_while_reading = budget.in_use
            threads.may_read.set()
            assert await asyncio.to_thread(threads.finished.wait, 30)
            store.abort_may_end.set()
            with pytest.raises(TransientStoreError, match="SlowDown"):
                await running
            # The reading thread hands the refund to the loop just after it sets its result,
            # which this side may see first: how soon it comes is not what is tested.
            for _ in range(500):
                if budget.in_use == 0:
                    break
                await asyncio.sleep(0.01)
            return paid_while_reading, threads.paid_when_read, budget.in_use

        try:
            paid_while_reading, paid_when_read, paid_after = asyncio.run(scenario())
        finally:
            manifest.close()
    assert threads.error is None
    assert paid_while_reading == PART
    assert paid_when_read == PART
    assert paid_after == 0
