"""Stage 4, transfer: send one planned file to the store, or prove it need not be sent.

Small files (up to the multipart threshold) are read once into memory, hashed, and sent in
one PUT. Larger files get a hashing pass first (the digest goes into the object metadata,
which S3 takes before the body), then a multipart upload: one reader walks the file in
order, re-hashing exactly what it sends, and hands each part to its own task, keeping a
steady window of parts in flight (never lockstep batches). Before publishing, the re-hash
must equal the first digest and the file's identity must be unchanged; otherwise the
upload is aborted and the file is read again.

Multipart progress lives in the manifest (upload id, part size, each part's ETag), so a
run killed half-way resumes with the parts that are missing. Every upload that fails is
aborted, unless it was interrupted (then the manifest owns it and the next run resumes it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

from .budget import ByteBudget
from .config import TransferConfig
from .digest import (
    HASH_CHUNK,
    FileIdentity,
    crc32_b64_of,
    gzip_to_temp,
    hash_file,
    md5_b64,
    new_digest,
    read_part,
    read_small,
    stat_identity,
)
from .errors import (
    ChecksumNotConfirmed,
    FatalStoreError,
    ManifestError,
    NoSuchUpload,
    SourceChanged,
    SourceVanished,
    StoreError,
    first_error,
)
from .inline import InlineGate
from .manifest import Manifest, ObjectRecord, PendingUpload, RecordedPart, Scope
from .plan import (
    Action,
    Decision,
    part_count,
    part_size_for,
    part_window_for,
    uses_multipart,
    wants_gzip,
)
from .scan import ScannedFile
from .store import META_DIGEST, META_SIZE, ObjectAttributes, ObjectStore, UploadedPart

log = logging.getLogger("asyncsync")

StoreGetter = Callable[[], Awaitable[ObjectStore]]
# Files up to this size are read and hashed on the event loop's own thread (see inline.py).
INLINE_READ_MAX = 256 * 1024
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class FileOutcome:
    relative: str
    key: str
    status: str  # "uploaded", "unchanged", "would-upload", "skipped", "failed"
    reason: str
    size: int
    bytes_sent: int = 0
    parts: int = 0
    resumed_parts: int = 0
    error: str | None = None
    # Why a failed file failed: "store" (worth retrying later), "read" (local I/O),
    # "changed" (still being written: wait for it to settle). None when not failed.
    failure: str | None = None


class Uploader:
    """Sends planned files; shared by every worker of one run."""

    def __init__(
        self,
        *,
        store: StoreGetter,
        manifest: Manifest,
        scope: Scope,
        config: TransferConfig,
        budget: ByteBudget,
        temp_dir: Path,
        dry_run: bool = False,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._store = store
        self._manifest = manifest
        self._scope = scope
        self._config = config
        self._budget = budget
        self._temp_dir = temp_dir
        self._dry_run = dry_run
        self._on_bytes = on_bytes
        # A pool of our own for file reads and hashing: submitting to it directly costs a
        # fraction of a generic to_thread call, which matters at thousands of files a second.
        self._inline_reads = InlineGate(slow_seconds=0.01, strikes=8)
        # Set when the store did not confirm a part's CRC32: from then on parts carry a
        # Content-MD5 beside it.
        self.md5_with_crc32 = False
        self._io = ThreadPoolExecutor(
            max_workers=max(4, min(64, config.workers + config.part_concurrency)),
            thread_name_prefix="asyncsync-io",
        )

    async def in_thread(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run blocking file work off the event loop."""
        assert not kwargs, "positional arguments only"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, fn, *args)

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)

    async def sync(self, scanned: ScannedFile, key: str, decision: Decision) -> FileOutcome:
        """Upload one file (or prove it unchanged). Per-file problems become a failed
        outcome; fatal store errors and manifest errors propagate and stop the run."""
        for attempt in range(self._config.changed_retries + 1):
            try:
                return await self._sync_once(scanned, key, decision)
            except SourceChanged as exc:
                if attempt == self._config.changed_retries:
                    return self._failed(
                        scanned, key, decision, f"{exc}; not published", failure="changed"
                    )
                log.info("%s: changed while uploading, reading it again", scanned.relative)
                await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
                try:
                    now = stat_identity(scanned.path)
                except SourceVanished:
                    return FileOutcome(scanned.relative, key, "skipped", "vanished", 0)
                scanned = replace(
                    scanned, size=now.size, mtime_ns=now.mtime_ns, inode=now.inode
                )
            except SourceVanished:
                return FileOutcome(scanned.relative, key, "skipped", "vanished", scanned.size)
            except (FatalStoreError, ManifestError):
                raise
            except StoreError as exc:
                return self._failed(scanned, key, decision, str(exc), failure="store")
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                return self._failed(
                    scanned, key, decision, f"cannot read: {reason}", failure="read"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _failed(
        scanned: ScannedFile, key: str, decision: Decision, error: str, *, failure: str
    ) -> FileOutcome:
        return FileOutcome(
            scanned.relative, key, "failed", decision.reason, scanned.size, error=error,
            failure=failure,
        )

    async def _sync_once(self, scanned: ScannedFile, key: str, decision: Decision) -> FileOutcome:
        if decision.action is Action.ADOPT:
            decision = await self._adopt(key, decision)
        compress = wants_gzip(scanned.relative, self._config)
        if uses_multipart(scanned.size, self._config):
            return await self._sync_large(scanned, key, decision, compress)
        return await self._sync_small(scanned, key, decision, compress)

    async def _adopt(self, key: str, decision: Decision) -> Decision:
        """The bucket has the key but the manifest does not: take its digest from HEAD."""
        store = await self._store()
        head = await store.head_object(key)
        digest = head.metadata.get(META_DIGEST) if head else None
        if head is None or not digest:
            return Decision(Action.UPLOAD, "not verifiable in bucket")
        size = int(head.metadata.get(META_SIZE, head.size))
        record = ObjectRecord(
            key, "", size, 0, 0, digest, head.etag, head.size, head.content_encoding, 0.0
        )
        return Decision(Action.VERIFY, "in bucket, not in manifest", record)

    def _unchanged(
        self, scanned: ScannedFile, key: str, decision: Decision, identity: FileIdentity,
        digest: str,
    ) -> FileOutcome | None:
        """If the content equals the recorded object, refresh the manifest row and say so."""
        record = decision.record
        if decision.action is not Action.VERIFY or record is None or record.digest != digest:
            return None
        if record.size != identity.size:
            return None
        self._manifest.record_object(
            self._scope,
            replace(
                record, source=scanned.path, size=identity.size, mtime_ns=identity.mtime_ns,
                inode=identity.inode, uploaded_at=record.uploaded_at or time.time(),
            ),
        )
        return FileOutcome(scanned.relative, key, "unchanged", "same content", identity.size)

    # -- small files: one read, one PUT ---------------------------------------------------

    async def _sync_small(
        self, scanned: ScannedFile, key: str, decision: Decision, compress: bool
    ) -> FileOutcome:
        grant = await self._budget.acquire(scanned.size)
        try:
            if scanned.size <= INLINE_READ_MAX and not compress and self._inline_reads.open:
                started = time.perf_counter()
                snap = read_small(scanned.path, self._config.multipart_threshold, False)
                self._inline_reads.record(time.perf_counter() - started)
            else:
                snap = await self.in_thread(
                    read_small, scanned.path, self._config.multipart_threshold, compress
                )
            unchanged = self._unchanged(scanned, key, decision, snap.identity, snap.digest)
            if unchanged:
                return unchanged
            if self._dry_run:
                return FileOutcome(scanned.relative, key, "would-upload", decision.reason,
                                   snap.identity.size)
            store = await self._store()
            etag = await store.put_object(
                key, snap.body, md5_b64=snap.body_md5_b64,
                attributes=_attributes(snap.digest, snap.identity.size, snap.content_encoding),
            )
        finally:
            self._budget.release(grant)
        self._on_bytes(len(snap.body))
        self._manifest.record_object(
            self._scope,
            ObjectRecord(
                key, scanned.path, snap.identity.size, snap.identity.mtime_ns,
                snap.identity.inode, snap.digest, etag, len(snap.body), snap.content_encoding,
                time.time(),
            ),
        )
        return FileOutcome(
            scanned.relative, key, "uploaded", decision.reason, snap.identity.size,
            bytes_sent=len(snap.body),
        )

    # -- large files: hash, then a resumable multipart upload -----------------------------

    async def _sync_large(
        self, scanned: ScannedFile, key: str, decision: Decision, compress: bool
    ) -> FileOutcome:
        temp: BinaryIO | None = None
        try:
            # The hashing pass holds one chunk buffer (gzip: about two); pay for them.
            grant = await self._budget.acquire(HASH_CHUNK * (2 if compress else 1))
            try:
                if compress:
                    body_path, digest, identity, temp = await self.in_thread(
                        gzip_to_temp, scanned.path, str(self._temp_dir)
                    )
                    body_size = os.path.getsize(body_path)
                    encoding: str | None = "gzip"
                else:
                    digest, identity = await self.in_thread(hash_file, scanned.path)
                    body_path, body_size, encoding = scanned.path, identity.size, None
            finally:
                self._budget.release(grant)
            unchanged = self._unchanged(scanned, key, decision, identity, digest)
            if unchanged:
                return unchanged
            if self._dry_run:
                return FileOutcome(
                    scanned.relative, key, "would-upload", decision.reason, identity.size
                )
            upload = _LargeUpload(
                self, scanned, key, body_path, body_size, identity, digest, encoding
            )
            etag, sent, resumed, parts = await upload.run()
        finally:
            if temp is not None:
                temp.close()
        self._manifest.record_object(
            self._scope,
            ObjectRecord(
                key, scanned.path, identity.size, identity.mtime_ns, identity.inode, digest,
                etag, body_size, encoding, time.time(),
            ),
        )
        return FileOutcome(
            scanned.relative, key, "uploaded",
            "resumed" if resumed else decision.reason, identity.size,
            bytes_sent=sent, parts=parts, resumed_parts=resumed,
        )


def _attributes(digest: str, size: int, encoding: str | None) -> ObjectAttributes:
    return ObjectAttributes(
        metadata={META_DIGEST: digest, META_SIZE: str(size)}, content_encoding=encoding
    )


class _LargeUpload:
    """One multipart upload of one file: create or resume, send parts, verify, complete."""

    def __init__(
        self, uploader: Uploader, scanned: ScannedFile, key: str, body_path: str,
        body_size: int, identity: FileIdentity, digest: str, encoding: str | None,
    ) -> None:
        self.up = uploader
        self.scanned = scanned
        self.key = key
        self.body_path = body_path
        self.body_size = body_size
        self.identity = identity
        self.digest = digest
        self.encoding = encoding
        self.part_size = part_size_for(body_size, uploader._config.part_size)
        self.sent = 0
        self.crc32 = False  # the upload takes CRC32 part checksums (the store confirmed it)

    async def run(self) -> tuple[str, int, int, int]:
        """Return (ETag, bytes sent now, parts resumed from an earlier run, part count)."""
        manifest, scope = self.up._manifest, self.up._scope
        store = await self.up._store()
        upload_id, done = await self._resume_or_create(store)
        try:
            parts = await self._send_parts(store, upload_id, done)
            self._check_still_same()
            etag = await self._complete(store, upload_id, parts)
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
        except NoSuchUpload:
            # A retried Complete whose first answer was lost finds the upload gone because it
            # succeeded. The object then carries exactly our digest and size.
            head = await store.head_object(self.key)
            if (
                head is not None
                and head.metadata.get(META_DIGEST) == self.digest
                and head.size == self.body_size
                and head.etag.endswith(f'-{len(parts)}"')
            ):
                return head.etag
            raise

    async def _resume_or_create(self, store: ObjectStore) -> tuple[str, dict[int, UploadedPart]]:
        manifest, scope = self.up._manifest, self.up._scope
        pending = manifest.pending_upload(scope, self.key)
        if pending is not None:
            if self._can_resume(pending):
                done = await self._parts_already_sent(store, pending)
                if done is not None:
                    log.info("%s: resuming upload, %d part(s) already sent",
                             self.scanned.relative, len(done))
                    return pending.upload_id, done
            else:
                await self._abort(store, pending.upload_id)
        upload = await store.create_multipart_upload(
            self.key, attributes=_attributes(self.digest, self.identity.size, self.encoding),
            crc32=True,
        )
        self.crc32 = upload.crc32
        manifest.begin_upload(
            scope,
            PendingUpload(
                self.key, upload.upload_id, self.scanned.path, self.identity.size,
                self.identity.mtime_ns, self.identity.inode, self.digest, self.part_size,
                self.encoding, time.time(), "crc32" if upload.crc32 else None,
            ),
        )
        return upload.upload_id, {}

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
        try:
            listed = await store.list_parts(self.key, pending.upload_id)
        except NoSuchUpload:
            self.up._manifest.forget_upload(self.up._scope, self.key, pending.upload_id)
            return None
        self.crc32 = pending.checksum == "crc32"
        recorded = self.up._manifest.recorded_parts(pending.upload_id)
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
        config, budget = self.up._config, self.up._budget
        count = part_count(self.body_size, self.part_size)
        window = asyncio.Semaphore(part_window_for(self.body_size, self.part_size, config))
        # Re-hash what is sent, in file order, unless the body is our own gzip temp file
        # (a private snapshot: it cannot change under us).
        hasher = new_digest() if self.encoding is None else None
        finished: dict[int, UploadedPart] = dict(done)
        fd = os.open(self.body_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            async with asyncio.TaskGroup() as tasks:
                for number in range(1, count + 1):
                    offset = (number - 1) * self.part_size
                    length = min(self.part_size, self.body_size - offset)
                    if number in done and hasher is None:
                        continue
                    await window.acquire()
                    grant = await budget.acquire(length)
                    try:
                        data, md5, crc32 = await self.up.in_thread(
                            _read_hash_part, fd, offset, length, hasher,
                            self._checksums() if number not in done else (False, False),
                        )
                        if len(data) != length:
                            raise SourceChanged(f"{self.scanned.path}: shrank while it was read")
                    except BaseException:
                        budget.release(grant)
                        window.release()
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
            os.close(fd)
        if hasher is not None and hasher.hexdigest() != self.digest:
            raise SourceChanged(f"{self.scanned.path}: changed while it was uploaded")
        return [finished[n] for n in sorted(finished)]

    def _checksums(self) -> tuple[bool, bool]:
        """Which checksums a part is sent with: (Content-MD5, CRC32)."""
        if not self.crc32:
            return True, False
        return self.up.md5_with_crc32, True

    async def _send_part(
        self, store: ObjectStore, upload_id: str, number: int, data: bytes,
        checksums: tuple[str | None, str | None], grant: int, window: asyncio.Semaphore,
        finished: dict[int, UploadedPart],
    ) -> None:
        md5, crc32 = checksums
        try:
            try:
                etag = await store.upload_part(self.key, upload_id, number, data,
                                               md5_b64=md5, crc32_b64=crc32)
            except ChecksumNotConfirmed as exc:
                # Stored, but nothing says the store checked the CRC32: send the part again
                # with a Content-MD5, and every later part with both.
                if md5 is not None:
                    raise
                log.warning("%s; sending parts with Content-MD5 as well", exc)
                self.up.md5_with_crc32 = True
                md5 = await self.up.in_thread(md5_b64, data)
                etag = await store.upload_part(self.key, upload_id, number, data,
                                               md5_b64=md5, crc32_b64=crc32)
        finally:
            self.up._budget.release(grant)
            window.release()
        self.up._manifest.record_part(
            upload_id, RecordedPart(number, etag, md5 or "", len(data), crc32)
        )
        finished[number] = UploadedPart(number, etag, len(data), crc32=crc32)
        self.sent += len(data)
        self.up._on_bytes(len(data))

    def _check_still_same(self) -> None:
        if stat_identity(self.scanned.path) != self.identity:
            raise SourceChanged(f"{self.scanned.path}: changed while it was uploaded")

    async def _abort(self, store: ObjectStore, upload_id: str) -> None:
        """Abort and forget; if even that fails, the manifest keeps it for the next run."""
        try:
            await store.abort_multipart_upload(self.key, upload_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - best effort; the record stays
            log.warning("%s: could not abort upload (%s); will retry next run",
                        self.scanned.relative, exc)
            return
        self.up._manifest.forget_upload(self.up._scope, self.key, upload_id)


def _read_hash_part(
    fd: int, offset: int, length: int, hasher: object | None, checksums: tuple[bool, bool]
) -> tuple[bytes, str | None, str | None]:
    """The part's bytes (fed to ``hasher`` too) and the checksums asked for: (Content-MD5,
    CRC32), each base64 or None."""
    data = read_part(fd, offset, length)
    if hasher is not None:
        hasher.update(data)  # type: ignore[attr-defined]
    want_md5, want_crc32 = checksums
    return (data, md5_b64(data) if want_md5 else None,
            crc32_b64_of(data) if want_crc32 else None)

