"""Dedup: a file whose content the bucket already holds is copied there server-side instead
of being sent again (Ultralytics writes the same checkpoint bytes to last.pt and best.pt; a
run directory copied under another name holds nothing new).

The transfer stage asks `ServerCopy.copy` once a file is read and its digest verified (the
torn-read checks are the upload's own). The source must be a row this manifest wrote for an
upload to the same bucket (never one adopted from an object's metadata), found with one
query on the manifest's digest index, and a HEAD must still show that very object: its
size, ``xxh128`` and size metadata, content encoding and ETag. The copy names that ETag
(If-Match), carries the new object's own metadata, and its answer is proven: the new ETag
equal to the source's where both are MD5s, else a HEAD of the new object (its size,
digest and ETag). Up to 5 GiB it is one CopyObject, beyond that a multipart upload of
UploadPartCopy parts. Whatever goes wrong, the caller uploads the file as usual: dedup
never fails a file, and a copy it cannot prove is deleted rather than recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import (
    BadDigest,
    FatalStoreError,
    ManifestError,
    NotSupported,
    StoreError,
    first_error,
)
from ..names import printable
from ..stores.integrity import copy_proven_by_etag
from ..stores.protocol import (
    META_DIGEST,
    META_SIZE,
    ObjectAttributes,
    ObjectInfo,
    ObjectStore,
    UploadedPart,
)
from . import plan
from .digest import FileIdentity
from .manifest import ObjectRecord, PendingUpload
from .multipart import UploadContext
from .plan import copy_ranges, uses_part_copy
from .scan import ScannedFile

log = logging.getLogger("asyncsync")


@dataclass(frozen=True, slots=True)
class Copied:
    """A new object made by a server-side copy, proven to hold the source's bytes."""

    source_key: str
    etag: str
    object_size: int  # the body's size (the source's: gzip data where it was compressed)
    content_encoding: str | None
    parts: int  # UploadPartCopy parts; 0 for one CopyObject


class ServerCopy:
    """Server-side copies of content already in the bucket; one per uploader."""

    def __init__(self, context: UploadContext) -> None:
        self.context = context
        # The store refused copies for good (no CopyObject, or a policy without GetObject):
        # the rest of the run uploads without asking again.
        self.refused = False
        # Content being sent right now, by (digest, size): the key sending it and what its
        # end sets. Ultralytics writes last.pt and best.pt with the same bytes at once; the
        # second waits for the first and copies it instead of sending the bytes alongside.
        self._sending: dict[tuple[str, int], tuple[str, asyncio.Event]] = {}
        self._sent_by: dict[str, tuple[str, int]] = {}

    def release(self, key: str) -> None:
        """The upload of ``key`` is over (whatever its outcome): whoever waits for the same
        content looks in the manifest again."""
        content = self._sent_by.pop(key, None)
        if content is not None:
            _, ended = self._sending.pop(content)
            ended.set()

    async def copy(
        self, scanned: ScannedFile, key: str, digest: str, identity: FileIdentity,
        content_type: Callable[[], str],
    ) -> Copied | None:
        """The object ``key`` made from a copy of the same content, or None: nothing to copy
        from, or the copy could not be made or proven (then the file is uploaded, and
        `release` must be called when that is over)."""
        if self.refused or identity.size == 0:  # an empty file costs one PUT either way
            return None
        self.release(key)  # read again after a torn read: its earlier content is not sent
        content = (digest, identity.size)
        while (twin := self._sending.get(content)) is not None and twin[0] != key:
            await twin[1].wait()
        manifest, scope = self.context.manifest, self.context.scope
        candidates = manifest.copy_sources(scope, digest, identity.size, besides=key)
        if not candidates:
            self._sending[content] = (key, asyncio.Event())
            self._sent_by[key] = content
            return None
        if manifest.pending_upload(scope, key) is not None:
            # A multipart upload of this key is under way: resuming it is the upload's job
            # (and a copy a killed run left is aborted there).
            return None
        store = await self.context.store()
        for record in candidates:
            try:
                head = await store.head_object(record.key)
                if not _same_object(record, head):
                    log.debug("%s: %s no longer holds the recorded content; not copied from",
                              printable(scanned.relative), printable(record.key))
                    continue
                assert head is not None
                return await self._copy(store, scanned, key, record, head, digest, identity,
                                        content_type())
            except (asyncio.CancelledError, ManifestError):
                raise
            except (FatalStoreError, NotSupported) as exc:
                # Denied or not implemented: the upload finds out for itself whether it may.
                self.refused = True
                log.info("%s: no server-side copies (%s); uploading files in full",
                         store.location, printable(str(exc)))
                return None
            except StoreError as exc:
                log.info("%s: server-side copy from %s failed (%s); uploading it",
                         printable(scanned.relative), printable(record.key),
                         printable(str(exc)))
                return None
        return None

    async def _copy(
        self, store: ObjectStore, scanned: ScannedFile, key: str, record: ObjectRecord,
        head: ObjectInfo, digest: str, identity: FileIdentity, content_type: str,
    ) -> Copied:
        attributes = ObjectAttributes.of_content(digest, identity.size, record.content_encoding,
                                                 content_type)
        where = f"copy of {record.key} to {key}"
        parts = 0
        try:
            # The limits are read from plan at each copy (a test lowers them to take the
            # UploadPartCopy path without a 5 GiB file).
            if uses_part_copy(head.size, plan.MAX_COPY_OBJECT_SIZE):
                etag, parts = await self._copy_parts(store, scanned, key, record, head,
                                                     attributes, digest, identity)
                proven = False
            else:
                etag = await store.copy_object_as(record.key, key, attributes=attributes,
                                                  if_match=head.etag)
                proven = copy_proven_by_etag(head.etag, etag, where=where, key=key)
            if not proven:
                await _confirm_copy(store, where, key, etag, head.size, digest)
        except BadDigest:
            # Something stands under the key that claims the file's digest and is not proven
            # to hold its bytes: gone, rather than left for a failed upload to keep.
            try:
                await store.delete_object(key)
            except StoreError as exc:
                log.warning("%s: could not delete the unproven copy: %s", printable(key), exc)
            raise
        return Copied(record.key, etag, head.size, record.content_encoding, parts)

    async def _copy_parts(
        self, store: ObjectStore, scanned: ScannedFile, key: str, record: ObjectRecord,
        head: ObjectInfo, attributes: ObjectAttributes, digest: str, identity: FileIdentity,
    ) -> tuple[str, int]:
        """A multipart upload of UploadPartCopy parts; aborted on any failure."""
        manifest, scope = self.context.manifest, self.context.scope
        upload = await store.create_multipart_upload(key, attributes=attributes)
        # Recorded so that a run killed meanwhile leaves no orphan: part size 0 never
        # resumes, so the next upload of the key aborts it.
        manifest.begin_upload(scope, PendingUpload(
            key, upload.upload_id, scanned.path, identity.size, identity.mtime_ns,
            identity.inode, digest, 0, record.content_encoding, time.time(),
        ))
        ranges = copy_ranges(head.size, plan.COPY_PART_SIZE)
        window = asyncio.Semaphore(self.context.config.part_concurrency)
        done: dict[int, UploadedPart] = {}

        async def copy_part(number: int, offset: int, end: int) -> None:
            async with window:
                etag = await store.upload_part_copy(
                    key, upload.upload_id, number, record.key, offset=offset, end=end,
                    if_match=head.etag,
                )
            done[number] = UploadedPart(number, etag, end - offset)

        try:
            try:
                async with asyncio.TaskGroup() as tasks:
                    for number, (offset, end) in enumerate(ranges, start=1):
                        tasks.create_task(copy_part(number, offset, end))
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            etag = await store.complete_multipart_upload(
                key, upload.upload_id, [done[n] for n in sorted(done)]
            )
        except asyncio.CancelledError:
            raise  # the manifest keeps the upload: the next run aborts it
        except BaseException:
            try:
                await store.abort_multipart_upload(key, upload.upload_id)
            except StoreError as exc:
                log.info("%s: could not abort the copy's upload (%s); the next run will",
                         printable(key), exc)
            else:
                manifest.forget_upload(scope, key, upload.upload_id)
            raise
        manifest.forget_upload(scope, key, upload.upload_id)
        return etag, len(ranges)


def _bare(etag: str) -> str:
    return etag.strip().removeprefix("W/").strip('"')


def _same_object(record: ObjectRecord, head: ObjectInfo | None) -> bool:
    """Whether HEAD shows the very object the row records: same ETag, body size, encoding,
    and the content digest and size in its metadata."""
    return (
        head is not None
        and _bare(head.etag) == _bare(record.etag)
        and head.size == record.object_size
        and head.metadata.get(META_DIGEST) == record.digest
        and head.metadata.get(META_SIZE, str(head.size)) == str(record.size)
        and (head.content_encoding or None) == record.content_encoding
    )


async def _confirm_copy(
    store: ObjectStore, where: str, key: str, etag: str, size: int, digest: str
) -> None:
    """For a copy whose ETag proves nothing: HEAD must find the object the copy answered
    for (its ETag), of the source's size and with the file's digest."""
    found = await store.head_object(key)
    if (
        found is None
        or _bare(found.etag) != _bare(etag)
        or found.size != size
        or found.metadata.get(META_DIGEST) != digest
    ):
        raise BadDigest(f"{where}: the object stored is not the copy asked for",
                        op="HeadObject", key=key, code="BadDigest")
