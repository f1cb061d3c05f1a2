"""Stage 4, transfer: send one planned file to the store, or prove it need not be sent.

Small files (up to the multipart threshold) are read once into memory, hashed, and sent in
one PUT. Larger files get a hashing pass first (the digest goes into the object metadata,
which S3 takes before the body), then a multipart upload (`multipart.LargeUpload`). Every
upload that fails is aborted, unless it was interrupted (then the manifest owns it and the
next run resumes it). A file whose content the bucket already holds is copied there
server-side instead (`dedup.ServerCopy`, unless ``--no-dedup``), once it was read and
verified unchanged like any other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

from ..config import TransferConfig
from ..errors import (
    BadDigest,
    FatalStoreError,
    ManifestError,
    SourceChanged,
    SourceNotRegular,
    SourceVanished,
    StoreError,
    store_cause,
)
from ..stores.protocol import META_DIGEST, META_SIZE, ObjectAttributes, ObjectStore
from .budget import ByteBudget
from .dedup import Copied, ServerCopy
from .digest import (
    HASH_CHUNK,
    FileIdentity,
    gzip_to_temp,
    hash_chunk_for,
    hash_file,
    read_small,
)
from .events import Failure, FileOutcome, Status
from .inline import InlineGate
from .manifest import Manifest, ObjectRecord, Scope, make_state_dir
from .multipart import LargeUpload, StoreGetter, UploadContext
from .plan import (
    Action,
    Decision,
    content_type_for,
    uses_multipart,
    wants_gzip,
)
from .readback import verify_object
from .scan import ScannedFile
from .source import stat_source

log = logging.getLogger("asyncsync")

# Files up to this size are read and hashed on the event loop's own thread (see inline.py).
INLINE_READ_MAX = 256 * 1024
P = ParamSpec("P")
R = TypeVar("R")


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
    ) -> None:
        self._store = store
        self._manifest = manifest
        self._scope = scope
        self._config = config
        self._budget = budget
        self._temp_dir = temp_dir
        self._temp_ready = False
        self._dry_run = dry_run
        # A pool of our own for file reads and hashing: submitting to it directly costs a
        # fraction of a generic to_thread call, which matters at thousands of files a second.
        self._inline_reads = InlineGate(slow_seconds=0.01, strikes=8)
        self._io = ThreadPoolExecutor(
            max_workers=max(4, min(64, config.workers + config.part_concurrency)),
            thread_name_prefix="asyncsync-io",
        )
        self._large_context = UploadContext(store, manifest, scope, config, budget, self._io)
        # None: every file is sent (--no-dedup, or --dry-run, which sends nothing anyway).
        self._copies = ServerCopy(self._large_context) if config.dedup and not dry_run else None

    @property
    def budget(self) -> ByteBudget:
        """The byte budget of the bodies in memory (read by the metrics)."""
        return self._budget

    def _gzip_dir(self) -> Path:
        """The temp directory, made on first need by the uploader itself (watch once forgot
        to make it, and every large compressible file failed with "cannot read")."""
        if not self._temp_ready:
            make_state_dir(self._temp_dir)  # 0700 whatever the umask: the bodies are ours
            self._temp_ready = True
        return self._temp_dir

    async def in_thread(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run blocking file work off the event loop."""
        assert not kwargs, "positional arguments only"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, fn, *args)

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)

    async def sync(self, scanned: ScannedFile, key: str, decision: Decision) -> FileOutcome:
        """Upload one file (or prove it unchanged). Per-file problems become a failed
        outcome (kept in the manifest until the file goes up: `asyncsync status` counts
        them); fatal store errors and manifest errors propagate and stop the run."""
        try:
            outcome = await self._sync(scanned, key, decision, time.monotonic())
        finally:
            if self._copies is not None:
                self._copies.release(key)
        if self._dry_run:
            return outcome
        if outcome.status is Status.FAILED:
            self._manifest.record_failure(
                self._scope, key, scanned.path, str(outcome.failure or ""), outcome.error or ""
            )
        else:  # up, proven unchanged, or gone: nothing failed any more
            self._manifest.forget_failure(self._scope, key)
        return outcome

    async def _sync(
        self, scanned: ScannedFile, key: str, decision: Decision, started: float
    ) -> FileOutcome:
        """``started``: when this file's upload began (its outcome's duration)."""
        for attempt in range(self._config.changed_retries + 1):
            try:
                outcome = await self._sync_once(scanned, key, decision, started)
                return replace(outcome, torn_reads=attempt) if attempt else outcome
            except SourceChanged as exc:
                if attempt == self._config.changed_retries:
                    return replace(self._failed(
                        scanned, key, decision, f"{exc}; not published", failure=Failure.CHANGED
                    ), torn_reads=attempt + 1)
                log.info("%s: changed while uploading, reading it again", scanned.relative)
                await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
                try:
                    now = stat_source(scanned.path, scanned.root)
                except SourceVanished:
                    return FileOutcome(scanned.relative, key, Status.SKIPPED, "vanished", 0)
                except SourceNotRegular as not_regular:
                    return FileOutcome(scanned.relative, key, Status.SKIPPED, str(not_regular), 0)
                scanned = replace(
                    scanned, size=now.st_size, mtime_ns=now.st_mtime_ns, inode=now.st_ino,
                    device=now.st_dev,
                )
            except SourceVanished:
                return FileOutcome(scanned.relative, key, Status.SKIPPED, "vanished", scanned.size)
            except SourceNotRegular as exc:
                # Swapped for a symlink (or a FIFO...) since the scan: never read. The next
                # scan sees what it is now.
                return FileOutcome(scanned.relative, key, Status.SKIPPED, str(exc), scanned.size)
            except (FatalStoreError, ManifestError):
                raise
            except StoreError as exc:
                return replace(
                    self._failed(scanned, key, decision, str(exc), failure=Failure.STORE),
                    cause=store_cause(exc),
                )
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                return self._failed(
                    scanned, key, decision, f"cannot read: {reason}", failure=Failure.READ
                )
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _failed(
        scanned: ScannedFile, key: str, decision: Decision, error: str, *, failure: Failure
    ) -> FileOutcome:
        return FileOutcome(
            scanned.relative, key, Status.FAILED, decision.reason, scanned.size, error=error,
            failure=failure,
        )

    async def _sync_once(
        self, scanned: ScannedFile, key: str, decision: Decision, started: float
    ) -> FileOutcome:
        if decision.action is Action.ADOPT:
            decision = await self._adopt(key, decision)
        compress = wants_gzip(scanned.relative, scanned.size, self._config)
        if uses_multipart(scanned.size, self._config):
            return await self._sync_large(scanned, key, decision, compress, started)
        return await self._sync_small(scanned, key, decision, compress, started)

    async def _adopt(self, key: str, decision: Decision) -> Decision:
        """The bucket has the key but the manifest does not: take its digest from HEAD."""
        store = await self._store()
        head = await store.head_object(key)
        digest = head.metadata.get(META_DIGEST) if head else None
        if head is None or not digest:
            return Decision(Action.UPLOAD, "not verifiable in bucket")
        size = int(head.metadata.get(META_SIZE, head.size))
        # Adopted: its bytes were never seen by this manifest, so never copied from.
        record = ObjectRecord(
            key, "", size, 0, 0, digest, head.etag, head.size, head.content_encoding, 0.0,
            adopted=True,
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
        return FileOutcome(scanned.relative, key, Status.UNCHANGED, "same content",
                           identity.size, identity=identity)

    async def _read_back(self, store: ObjectStore, key: str, digest: str, etag: str) -> None:
        """--verify-after-upload: the object, read back whole, must hold the file's content;
        one that does not is deleted, so no later run (nor --reconcile) takes it for it."""
        if not self._config.verify_after_upload:
            return
        try:
            await verify_object(store, key, digest, etag=etag)
        except BadDigest:
            try:
                await store.delete_object(key)
            except StoreError as exc:
                log.warning("%s: could not delete the damaged object: %s", key, exc)
            raise

    async def _copied(
        self, scanned: ScannedFile, key: str, decision: Decision, identity: FileIdentity,
        digest: str, started: float,
    ) -> FileOutcome | None:
        """The file's object made by a server-side copy of the same content, recorded like
        an upload; None when there is none to make (the file is then sent)."""
        if self._copies is None:
            return None
        copied: Copied | None = await self._copies.copy(
            scanned, key, digest, identity,
            lambda: content_type_for(scanned.relative, self._config),  # only when copying
        )
        if copied is None:
            return None
        try:
            await self._read_back(await self._store(), key, digest, copied.etag)
        except BadDigest as exc:  # the copy was deleted: the file's own bytes go up instead
            log.info("%s: the server-side copy read back wrong (%s); uploading it",
                     scanned.relative, exc)
            return None
        self._manifest.record_object(
            self._scope,
            ObjectRecord(
                key, scanned.path, identity.size, identity.mtime_ns, identity.inode, digest,
                copied.etag, copied.object_size, copied.content_encoding, time.time(),
            ),
        )
        return FileOutcome(
            scanned.relative, key, Status.UPLOADED, decision.reason, identity.size,
            parts=copied.parts, identity=identity, seconds=time.monotonic() - started,
            copied_from=copied.source_key,
        )

    # -- small files: one read, one PUT ---------------------------------------------------

    async def _sync_small(
        self, scanned: ScannedFile, key: str, decision: Decision, compress: bool, started: float
    ) -> FileOutcome:
        grant = await self._budget.acquire(scanned.size)
        try:
            if scanned.size <= INLINE_READ_MAX and not compress and self._inline_reads.open:
                started = time.perf_counter()
                snap = read_small(scanned, self._config.multipart_threshold, False)
                self._inline_reads.record(time.perf_counter() - started)
            else:
                snap = await self.in_thread(
                    read_small, scanned, self._config.multipart_threshold, compress
                )
            _check_as_scanned(scanned, snap.identity)
            unchanged = self._unchanged(scanned, key, decision, snap.identity, snap.digest)
            if unchanged:
                return unchanged
            if self._dry_run:
                return FileOutcome(scanned.relative, key, Status.WOULD_UPLOAD, decision.reason,
                                   snap.identity.size)
            copied = await self._copied(scanned, key, decision, snap.identity, snap.digest,
                                        started)
            if copied:
                return copied
            store = await self._store()
            etag = await store.put_object(
                key, snap.body, md5_b64=snap.body_md5_b64,
                attributes=ObjectAttributes.of_content(
                    snap.digest, snap.identity.size, snap.content_encoding,
                    content_type_for(scanned.relative, self._config),
                ),
            )
        finally:
            self._budget.release(grant)
        await self._read_back(store, key, snap.digest, etag)
        self._manifest.record_object(
            self._scope,
            ObjectRecord(
                key, scanned.path, snap.identity.size, snap.identity.mtime_ns,
                snap.identity.inode, snap.digest, etag, len(snap.body), snap.content_encoding,
                time.time(),
            ),
        )
        return FileOutcome(
            scanned.relative, key, Status.UPLOADED, decision.reason, snap.identity.size,
            bytes_sent=len(snap.body), identity=snap.identity,
            seconds=time.monotonic() - started,
        )

    # -- large files: hash, then a resumable multipart upload -----------------------------

    async def _sync_large(
        self, scanned: ScannedFile, key: str, decision: Decision, compress: bool, started: float
    ) -> FileOutcome:
        temp: BinaryIO | None = None
        try:
            # The hashing pass holds one read buffer (gzip: about two); pay for them.
            chunk = hash_chunk_for(scanned.size)
            grant = await self._budget.acquire(2 * HASH_CHUNK if compress else chunk)
            try:
                body_path: str | None
                encoding: str | None
                if compress:
                    packed, digest, identity, gz = await self.in_thread(
                        gzip_to_temp, scanned, str(self._gzip_dir())
                    )
                    body_path, body_size, encoding = packed, os.path.getsize(packed), "gzip"
                    if body_size >= identity.size:  # did not shrink: send the file itself
                        gz.close()
                        body_path, body_size, encoding = None, identity.size, None
                    else:
                        temp = gz
                else:
                    digest, identity = await self.in_thread(hash_file, scanned, chunk)
                    # The body is read from the source again, opened as safely (multipart).
                    body_path, body_size, encoding = None, identity.size, None
            finally:
                self._budget.release(grant)
            _check_as_scanned(scanned, identity)
            unchanged = self._unchanged(scanned, key, decision, identity, digest)
            if unchanged:
                return unchanged
            if self._dry_run:
                return FileOutcome(
                    scanned.relative, key, Status.WOULD_UPLOAD, decision.reason, identity.size
                )
            copied = await self._copied(scanned, key, decision, identity, digest, started)
            if copied:
                return copied
            upload = LargeUpload(
                self._large_context, scanned, key, body_path, body_size, identity, digest, encoding
            )
            etag, sent, resumed, parts = await upload.run()
        finally:
            if temp is not None:
                temp.close()
        await self._read_back(await self._store(), key, digest, etag)
        self._manifest.record_object(
            self._scope,
            ObjectRecord(
                key, scanned.path, identity.size, identity.mtime_ns, identity.inode, digest,
                etag, body_size, encoding, time.time(),
            ),
        )
        return FileOutcome(
            scanned.relative, key, Status.UPLOADED,
            "resumed" if resumed else decision.reason, identity.size,
            bytes_sent=sent, parts=parts, resumed_parts=resumed, identity=identity,
            seconds=time.monotonic() - started,
        )


def _check_as_scanned(scanned: ScannedFile, identity: FileIdentity) -> None:
    """What was read must be the version the scan saw: what to do with a file (settle it,
    hold an emptied checkpoint back, keep a shrunken results.csv's object aside) was decided
    on that version. A file truncated in between (torch.save starting over last.pt) holds
    still while it is read, so no torn-read check would see it: read again, or, under watch,
    wait for it to settle."""
    if (identity.size, identity.mtime_ns, identity.inode) != (
            scanned.size, scanned.mtime_ns, scanned.inode):
        raise SourceChanged(f"{scanned.path}: changed since it was scanned")
