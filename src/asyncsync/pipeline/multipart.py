"""Stage 4, transfer, for a large file: one multipart upload, resumable.

One reader walks the file in order, re-hashing exactly what it sends, and hands each part
to its own task, keeping a steady window of parts in flight (never lockstep batches).
Before publishing, the re-hash must equal the digest taken before the upload and the
file's identity must be unchanged; otherwise the upload is aborted and the file is read
again. Each part carries a CRC32 where the store confirmed the upload takes them (a
Content-MD5 otherwise). Progress lives in the manifest (upload id, part size, each part's
ETag and checksum), so a run killed half-way resumes with the parts that are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from ..config import TransferConfig
from ..errors import (
    AsyncsyncError,
    BadDigest,
    FatalStoreError,
    ManifestError,
    ManifestFull,
    NoSuchUpload,
    NotSupported,
    SourceChanged,
    StoreError,
    first_error,
)
from ..stores.capabilities import Capability
from ..stores.protocol import META_DIGEST, ObjectAttributes, ObjectStore, UploadedPart
from .budget import ByteBudget
from .digest import (
    FileIdentity,
    crc32_b64_of,
    md5_b64,
    new_digest,
    read_part,
)
from .manifest import Manifest, PendingUpload, RecordedPart, Scope
from .plan import content_type_for, part_count, part_size_for, part_window_for
from .scan import ScannedFile
from .source import OpenedSource, open_source, stat_source

log = logging.getLogger("asyncsync")

StoreGetter = Callable[[], Awaitable[ObjectStore]]
# A part as read: its bytes, and its Content-MD5 and CRC32 where they were asked for.
PartRead = tuple[bytes, str | None, str | None]


@dataclass(frozen=True, slots=True)
class UploadContext:
    """What a `LargeUpload` works with, lent by the uploader that runs it. Built once per
    run, so a large file costs one reference to it, and a part nothing at all."""

    store: StoreGetter
    manifest: Manifest
    scope: Scope
    config: TransferConfig
    budget: ByteBudget  # bodies in memory, shared with every other upload of the run
    threads: Executor  # the uploader's pool for file reads and hashing


class LargeUpload:
    """One multipart upload of one file: create or resume, send parts, verify, complete."""

    def __init__(
        self, context: UploadContext, scanned: ScannedFile, key: str, body_path: str | None,
        body_size: int, identity: FileIdentity, digest: str, encoding: str | None,
    ) -> None:
        self.context = context
        self.scanned = scanned
        self.key = key
        self.body_path = body_path
        self.body_size = body_size
        self.identity = identity
        self.digest = digest
        self.encoding = encoding
        self.part_size = part_size_for(body_size, context.config.part_size)
        self.sent = 0
        self.crc32 = False  # the upload takes CRC32 part checksums (the store confirmed it)

    async def run(self) -> tuple[str, int, int, int]:
        """Return (ETag, bytes sent now, parts resumed from an earlier run, part count)."""
        manifest, scope = self.context.manifest, self.context.scope
        store = await self.context.store()
        upload_id, done = await self._resume_or_create(store)
        try:
            parts = await self._send_parts(store, upload_id, done)
            self._check_still_same()
            etag = await self._complete(store, upload_id, parts)
        except ManifestFull:
            # The state directory is full: the manifest may lose this upload's row when its
            # transaction cannot commit, and an upload nobody remembers is billed forever.
            # Aborted now; the file is sent afresh once there is room.
            await self._abort(store, upload_id)
            raise
        except (asyncio.CancelledError, FatalStoreError, ManifestError):
            # Interrupted, or nothing can reach the store: keep the upload for the next run.
            raise
        except BaseException:
            await self._abort(store, upload_id)
            raise
        manifest.forget_upload(scope, self.key, upload_id)
        return etag, self.sent, len(done), len(parts)

    async def _complete(
        self, store: ObjectStore, upload_id: str, parts: list[UploadedPart]
    ) -> str:
        try:
            return await store.complete_multipart_upload(self.key, upload_id, parts)
        except (FatalStoreError, BadDigest):
            raise
        except StoreError:
            # A retried Complete whose first answer was lost finds the upload gone because it
            # succeeded (NoSuchUpload; s3rver says InternalError). The object then carries
            # exactly our digest and size.
            head = await store.head_object(self.key)
            if (
                head is not None
                and head.metadata.get(META_DIGEST) == self.digest
                and head.size == self.body_size
                # A multipart ETag names its part count (s3rver's is a plain MD5).
                and ("-" not in head.etag or head.etag.endswith(f'-{len(parts)}"'))
            ):
                return head.etag
            raise

    async def _resume_or_create(self, store: ObjectStore) -> tuple[str, dict[int, UploadedPart]]:
        manifest, scope = self.context.manifest, self.context.scope
        pending = manifest.pending_upload(scope, self.key)
        if pending is not None:
            if self._can_resume(pending):
                done = await self._parts_already_sent(store, pending)
                if done is not None:
                    log.info("%s: resuming upload, %d part(s) already sent",
                             self.scanned.relative, len(done))
                    return pending.upload_id, done
            else:
                await self._abort_stale(store, pending.upload_id)
        upload = await store.create_multipart_upload(
            self.key, crc32=True,
            attributes=ObjectAttributes.of_content(
                self.digest, self.identity.size, self.encoding,
                content_type_for(self.scanned.relative, self.context.config),
            ),
        )
        self.crc32 = upload.crc32
        try:
            self._remember(manifest, scope, upload.upload_id, upload.crc32)
        except ManifestError:
            # Not remembered, it could never be resumed nor aborted by a later run.
            with contextlib.suppress(Exception):
                await store.abort_multipart_upload(self.key, upload.upload_id)
            raise
        return upload.upload_id, {}

    def _remember(self, manifest: Manifest, scope: Scope, upload_id: str, crc32: bool) -> None:
        manifest.begin_upload(
            scope,
            PendingUpload(
                self.key, upload_id, self.scanned.path, self.identity.size,
                self.identity.mtime_ns, self.identity.inode, self.digest, self.part_size,
                self.encoding, time.time(), "crc32" if crc32 else None,
            ),
        )

    def _can_resume(self, pending: PendingUpload) -> bool:
        return (
            pending.source == self.scanned.path
            and FileIdentity(pending.size, pending.mtime_ns, pending.inode) == self.identity
            and pending.digest == self.digest
            and pending.part_size == self.part_size
            and pending.content_encoding == self.encoding
        )

    async def _parts_already_sent(
        self, store: ObjectStore, pending: PendingUpload
    ) -> dict[int, UploadedPart] | None:
        """Parts both the store and the manifest know, with the same ETag and size (and,
        in an upload with CRC32 checksums, the CRC32 recorded for Complete)."""
        if store.capabilities[Capability.LIST_PARTS] is False:
            listed = None
        else:
            try:
                listed = await store.list_parts(self.key, pending.upload_id)
            except NoSuchUpload:
                self.context.manifest.forget_upload(self.context.scope, self.key,
                                                    pending.upload_id)
                return None
            except NotSupported:
                listed = None
        if listed is None:
            # Without ListParts nothing says which parts the store kept: start over, once the
            # old upload is aborted (or forgotten, where the store cannot abort at all).
            await self._abort_stale(store, pending.upload_id)
            log.warning("%s: %s cannot list the parts of an upload: sending the file again"
                        " from its first part", self.scanned.relative, store.location)
            return None
        self.crc32 = pending.checksum == "crc32"
        recorded = self.context.manifest.recorded_parts(pending.upload_id)
        done = {}
        for part in listed:
            mine = recorded.get(part.part_number)
            if mine is None or mine.etag != part.etag or mine.size != part.size:
                continue
            if self.crc32:
                if not mine.crc32:
                    continue
                part = UploadedPart(part.part_number, part.etag, part.size, crc32=mine.crc32)
            done[part.part_number] = part
        return done

    async def _send_parts(
        self, store: ObjectStore, upload_id: str, done: dict[int, UploadedPart]
    ) -> list[UploadedPart]:
        config, budget, threads = self.context.config, self.context.budget, self.context.threads
        loop = asyncio.get_running_loop()
        count = part_count(self.body_size, self.part_size)
        window = asyncio.Semaphore(part_window_for(self.body_size, self.part_size, config))
        # Re-hash what is sent, in file order, unless the body is our own gzip temp file
        # (a private snapshot: it cannot change under us).
        hasher = new_digest() if self.encoding is None else None
        finished: dict[int, UploadedPart] = dict(done)
        source: OpenedSource | None = None
        if self.body_path is None:
            # The file itself: opened beneath its root, and it must still be the file the
            # hashing pass read (a symlink swapped in meanwhile is never read).
            source = await loop.run_in_executor(threads, open_source, self.scanned)
            fd = source.fd
        else:  # our own gzip temp file
            fd = os.open(self.body_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        reading: Future[PartRead] | None = None
        abandoned: Future[PartRead] | None = None  # a read cancelled while the thread reads
        try:
            async with asyncio.TaskGroup() as tasks:
                for number in range(1, count + 1):
                    offset = (number - 1) * self.part_size
                    length = min(self.part_size, self.body_size - offset)
                    if number in done and hasher is None:
                        continue
                    await window.acquire()
                    grant = await budget.acquire(length)
                    reading = threads.submit(
                        _read_hash_part, fd, offset, length, hasher,
                        self._checksums(store) if number not in done else (False, False),
                    )
                    try:
                        data, md5, crc32 = await asyncio.wrap_future(reading)
                        reading = None  # done, it holds the part as its result
                        if len(data) != length:
                            raise SourceChanged(f"{self.scanned.path}: shrank while it was read")
                    except BaseException as exc:
                        # This frame, and a read's that failed half-way, live on in the
                        # traceback of what is raised (for as long as an abort takes): they
                        # must not keep a part whose grant goes back.
                        _free_frames(exc)
                        data = b""
                        window.release()
                        if reading is not None and not reading.done():
                            # Cancelled while the thread reads: the part it is filling stays
                            # paid for, and the file open, until the thread is done with them.
                            _refund_when_done(reading, budget, grant, loop)
                            abandoned = reading
                        else:
                            budget.release(grant)
                        reading = None
                        raise
                    if number in done:
                        del data
                        budget.release(grant)
                        window.release()
                        continue
                    tasks.create_task(
                        self._send_part(store, upload_id, number, data, (md5, crc32), grant,
                                        window, finished)
                    )
                    # The task owns the buffer now; a reference left here would outlive the
                    # task's grant while this loop waits for the next one.
                    del data
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        finally:
            close = source.close if source is not None else functools.partial(os.close, fd)
            if abandoned is None:
                close()
            else:
                # Closed now, the descriptor's number could be reused before the thread reads
                # from it: it would read another file.
                abandoned.add_done_callback(lambda _: close())
                abandoned = None  # done, it holds the part as its result
        if hasher is not None and hasher.hexdigest() != self.digest:
            raise SourceChanged(f"{self.scanned.path}: changed while it was uploaded")
        return [finished[n] for n in sorted(finished)]

    def _checksums(self, store: ObjectStore) -> tuple[bool, bool]:
        """Which checksums a part is sent with: (Content-MD5, CRC32). An upload created with
        CRC32 checksums needs one on every part; where the store does not echo it, the part
        is proven by its ETag, so the MD5 is computed while the part is read."""
        if not self.crc32:
            return True, False
        return store.capabilities[Capability.CRC32_ECHO] is False, True

    async def _send_part(
        self, store: ObjectStore, upload_id: str, number: int, data: bytes,
        checksums: tuple[str | None, str | None], grant: int, window: asyncio.Semaphore,
        finished: dict[int, UploadedPart],
    ) -> None:
        md5, crc32 = checksums
        size = len(data)
        try:
            etag = await store.upload_part(self.key, upload_id, number, data,
                                           md5_b64=md5, crc32_b64=crc32)
        except BaseException as exc:
            # The store's frames, kept by the traceback, still hold the part; the error lives
            # on for as long as the upload's abort takes, its grant long back in the budget.
            _free_frames(exc)
            raise
        finally:
            # This frame is in that traceback too.
            del data
            self.context.budget.release(grant)
            window.release()
        self.context.manifest.record_part(
            upload_id, RecordedPart(number, etag, md5 or "", size, crc32)
        )
        finished[number] = UploadedPart(number, etag, size, crc32=crc32)
        self.sent += size

    def _check_still_same(self) -> None:
        now = stat_source(self.scanned.path, self.scanned.root)
        if FileIdentity.of(now) != self.identity or now.st_dev != self.scanned.device:
            raise SourceChanged(f"{self.scanned.path}: changed while it was uploaded")

    async def _abort(self, store: ObjectStore, upload_id: str) -> None:
        """Abort and forget this failed upload, if the store lets us: otherwise the manifest
        keeps it, and the file's next upload aborts it first (`_abort_stale`). The error
        that failed the upload is what the caller raises, not this one."""
        try:
            await self._discard(store, upload_id)
        except (asyncio.CancelledError, ManifestError):
            raise
        except Exception as exc:  # noqa: BLE001 - the record stays for the next try
            log.warning("%s: could not abort upload %s (%s); it is aborted before the file"
                        " is sent again", self.scanned.relative, upload_id, exc)

    async def _abort_stale(self, store: ObjectStore, upload_id: str) -> None:
        """Abort and forget an earlier upload of this key that cannot be resumed, before a
        new one starts. The new one's row replaces the old one's (the manifest keeps one per
        key): an upload still open then would be remembered by nobody, and billed for ever.
        So if the abort fails, nothing is sent: the store's error fails the file for now,
        and the abort is tried again the next time the file is sent."""
        try:
            await self._discard(store, upload_id)
        except (asyncio.CancelledError, ManifestError):
            raise
        except Exception as exc:
            log.warning("%s: could not abort its earlier upload %s (%s); not sent until that"
                        " upload is aborted", self.scanned.relative, upload_id, exc)
            raise

    async def _discard(self, store: ObjectStore, upload_id: str) -> None:
        """Abort the upload, then forget it. Forgotten without an abort only where the store
        cannot abort at all: kept, it would block every later run of this file, and only
        the bucket's lifecycle rules can reclaim it. Any other failure propagates, the
        upload still remembered."""
        if store.capabilities[Capability.ABORT_MULTIPART] is False:
            # Said once, when the store first refused; asking again only fails again.
            log.info("%s: %s cannot abort upload %s; forgetting it",
                     self.scanned.relative, store.location, upload_id)
        else:
            try:
                await store.abort_multipart_upload(self.key, upload_id)
            except NotSupported as exc:
                log.warning("%s: %s; the upload is left to the bucket's lifecycle rules",
                            self.scanned.relative, exc)
        self.context.manifest.forget_upload(self.context.scope, self.key, upload_id)


def _free_frames(error: BaseException) -> None:
    """Let go of the frames that the tracebacks of ``error``, and of the errors it links to
    (its cause, its context, a group's members), keep. Below a failed send or read they
    hold the part: in their locals, and in the closures of the functions they ran (a
    cleared frame still keeps its function, so clearing is not enough where the store sends
    from a closure, as s3.py does). A store's error, a read's and a cancellation are
    reported by their message alone: their tracebacks go. Any other error is a bug, whose
    traceback is reported: kept, with its frames' locals cleared (the frames still running,
    this one and its callers, cannot be and need not be)."""
    reported_by_message = isinstance(error, AsyncsyncError | OSError | asyncio.CancelledError)
    seen: set[int] = set()
    linked: list[BaseException | None] = [error]
    while linked:
        exc = linked.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if reported_by_message:
            exc.__traceback__ = None
        else:
            traceback.clear_frames(exc.__traceback__)
        linked += (exc.__cause__, exc.__context__)
        if isinstance(exc, BaseExceptionGroup):
            linked += exc.exceptions


def _refund_when_done(
    reading: Future[PartRead], budget: ByteBudget, grant: int, loop: asyncio.AbstractEventLoop
) -> None:
    """Give ``grant`` back once the thread filling the part it pays for is done with it."""
    def refund(_: Future[PartRead]) -> None:
        # Called in the thread that finished the read (or here, if it is already done).
        with contextlib.suppress(RuntimeError):  # the loop is closed: no budget left to keep
            loop.call_soon_threadsafe(budget.release, grant)

    reading.add_done_callback(refund)


def _read_hash_part(
    fd: int, offset: int, length: int, hasher: object | None, checksums: tuple[bool, bool]
) -> PartRead:
    """The part's bytes (fed to ``hasher`` too) and the checksums asked for: (Content-MD5,
    CRC32), each base64 or None."""
    data = read_part(fd, offset, length)
    if hasher is not None:
        hasher.update(data)  # type: ignore[attr-defined]
    want_md5, want_crc32 = checksums
    return (data, md5_b64(data) if want_md5 else None,
            crc32_b64_of(data) if want_crc32 else None)

