"""The S3 implementation of `store.ObjectStore`, with aiobotocore.

Three decisions live here and nowhere else:
- credentials come only from botocore's standard chain (environment, shared config and
  profile, container/instance role, web identity); nothing here reads or prints them;
- botocore's own retries are off and `retry.retry_transient` is the single retry layer,
  so attempts never multiply;
- integrity: every PUT carries a Content-MD5, every part a CRC32 (for an upload the store
  confirmed takes them: MD5 costs 1.7 s of CPU per GiB, zlib's CRC32 0.3 s) or a
  Content-MD5, and every answer is checked on this side as well (`integrity`): a CRC32 must
  come back as sent, an MD5 ETag must be the body's, so a store that checks nothing (moto,
  s3rver) cannot keep a damaged body unnoticed. botocore's own flexible checksums are set
  to ``when_required`` so that S3-compatible stores which do not speak them (or their
  aws-chunked trailers) still work.

Bodies (PutObject, UploadPart) go through the lean path of `s3direct` unless
``StoreConfig.direct_uploads`` is off; control calls always go through botocore, and so do
GetObject bodies: ranged requests with If-Match, resumed where a connection dropped by
`retry.ResumableBody`.

botocore is imported lazily (`open_s3_store`): importing it costs a few hundred
milliseconds, and a re-run that finds nothing changed never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..config import StoreConfig
from ..errors import (
    BadDigest,
    FatalStoreError,
    NoSuchUpload,
    NotFound,
    NotSupported,
    ObjectChanged,
    StoreError,
    TransientStoreError,
)
from .capabilities import Capabilities, Capability
from .integrity import Answer, Verdicts, md5_b64_of
from .protocol import (
    GET_CHUNK,
    MultipartUpload,
    ObjectAttributes,
    ObjectBody,
    ObjectInfo,
    UploadedPart,
)
from .retry import Backoff, RangeReader, ResumableBody, retry_transient
from .s3direct import DirectUploads, Pace, open_direct_uploads, proxy_for
from .s3errors import body_never_left, translate_error

T = TypeVar("T")
log = logging.getLogger("asyncsync")
# What a store answers to a CreateMultipartUpload parameter it does not implement.
_UNSUPPORTED_CODES = frozenset({"InvalidArgument", "InvalidRequest", "NotImplemented"})
# If-Match refused (a HEAD answer has no body, so only its status names it).
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
# A Range starting at or past the object's end.
_INVALID_RANGE_CODES = frozenset({"InvalidRange", "416"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

RetryObserver = Callable[[TransientStoreError, int, float], None]


class S3Store:
    """One bucket of an S3-compatible store, through one aiobotocore client."""

    def __init__(
        self,
        client: Any,
        exit_stack: contextlib.AsyncExitStack,
        bucket: str,
        config: StoreConfig,
        on_retry: RetryObserver | None,
        direct: DirectUploads | None = None,
        pace: Pace | None = None,
        capabilities: Capabilities | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._direct = direct
        self._pace = pace
        self._exit_stack = exit_stack
        self._bucket = bucket
        self._config = config
        self._backoff = Backoff(config.backoff_base, config.backoff_cap)
        self._on_retry = on_retry
        self._endpoint = str(getattr(client.meta, "endpoint_url", "") or "")
        self._timeouts = (config.connect_timeout, config.read_timeout)
        self._location = f"s3://{bucket}" + (f" at {self._endpoint}" if self._endpoint else "")
        # What this store was seen to do (CRC32 echo, ListParts...), kept by the pipeline.
        self.capabilities = capabilities if capabilities is not None else Capabilities()
        self._verdicts = Verdicts(self._location, self.capabilities)
        # Uploads with a part nothing proved: their object's size is checked once complete.
        self._unproven_uploads: set[str] = set()
        # Body bytes handed to the transport, every attempt counted whatever its outcome (a
        # body sent again after a 503 or a BadDigest crossed the wire twice; one cut off by
        # a reset cost what had left).
        self._on_sent = on_sent or (lambda n: None)

    @property
    def location(self) -> str:
        return self._location

    @property
    def client(self) -> Any:
        """The aiobotocore client, for requests the Protocol has no place for (`doctor`'s
        probes: a wrong Content-MD5 on purpose, If-None-Match)."""
        return self._client

    async def _call(self, op: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        return await self._retried(lambda: self._attempt(op, key, call))

    async def _attempt(self, op: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """One try of ``call``, its errors translated (the caller decides about retrying)."""
        try:
            return await call()
        except (asyncio.CancelledError, StoreError):
            raise
        except Exception as exc:
            raise self._translated(exc, op, key) from exc

    def _translated(self, exc: BaseException, op: str, key: str) -> StoreError:
        return translate_error(
            exc, op=op, key=key, location=f"s3://{self._bucket}", endpoint=self._endpoint,
            timeouts=self._timeouts,
        )

    async def _retried(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(
            attempt, attempts=self._config.max_attempts, backoff=self._backoff,
            on_retry=self._on_retry,
        )

    async def check_bucket(self) -> None:
        try:
            if self._direct is not None:
                await self._retried(self._direct.head_bucket)
            else:
                await self._call("HeadBucket", "", self._head_bucket)
        except NotFound as exc:
            raise FatalStoreError(
                f"bucket s3://{self._bucket} does not exist", op="HeadBucket", code="NoSuchBucket"
            ) from exc
        except FatalStoreError as exc:
            if exc.code not in ("403", "AccessDenied"):
                raise
            # HEAD responses carry no error body, so a 403 cannot tell bad keys from a
            # policy that allows PutObject but not HeadBucket. A listing's error body can:
            # bad keys are fatal now; AccessDenied leaves it to the first upload.
            try:
                await self._call(
                    "ListObjectsV2", "",
                    lambda: self._client.list_objects_v2(Bucket=self._bucket, MaxKeys=0),
                )
            except FatalStoreError as listing:
                if listing.code not in ("403", "AccessDenied"):
                    raise

    async def _head_bucket(self) -> None:
        """HeadBucket through botocore, naming the bucket's region where the answer does (as
        `s3direct.DirectUploads.head_bucket` does): a 301 or 400 alone says nothing useful."""
        from botocore.exceptions import ClientError

        try:
            await self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {})
            region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
            ours = self._client.meta.region_name or "us-east-1"
            if meta.get("HTTPStatusCode") in (301, 400) and region and region != ours:
                raise FatalStoreError(
                    f"HeadBucket s3://{self._bucket}: the bucket is in region {region}, not"
                    f" {ours}: pass --region {region}", op="HeadBucket", code="PermanentRedirect",
                ) from exc
            raise

    @staticmethod
    def _attribute_args(attributes: ObjectAttributes) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": dict(attributes.metadata)}
        if attributes.content_encoding:
            args["ContentEncoding"] = attributes.content_encoding
        if attributes.content_type:
            args["ContentType"] = attributes.content_type
        return args

    async def put_object(
        self, key: str, body: bytes, *, md5_b64: str, attributes: ObjectAttributes
    ) -> str:
        where = f"PutObject s3://{self._bucket}/{key}"

        async def send() -> Answer:
            if self._direct is not None:
                return await self._direct.put_object(
                    key, body, md5_b64=md5_b64, attributes=attributes, on_sent=self._on_sent
                )
            if self._pace is not None:
                await self._pace(len(body))  # botocore sends a body in one go
            return await self._botocore_body(
                "PutObject", key, len(body),
                lambda: self._client.put_object(
                    Bucket=self._bucket, Key=key, Body=body, ContentMD5=md5_b64,
                    **self._attribute_args(attributes),
                ),
            )

        # Whether an attempt left damaged bytes stored under the key (a store that checked
        # refuses them instead, and the key keeps what it held).
        damaged_stored = False

        async def attempt() -> str:
            nonlocal damaged_stored
            answer = await send()
            try:
                if not self._verdicts.check(where, "PutObject", key, answer.etag, md5_b64,
                                            encrypted=answer.encrypted) and not self._checks_md5:
                    self._verdicts.unproven("PutObject")
                    await self._confirm_stored(where, key, len(body), answer.etag)
            except BadDigest:
                damaged_stored = True
                raise
            return answer.etag

        try:
            return await self._retried(attempt)
        except StoreError:
            if damaged_stored:
                # Damaged bytes under the file's digest: a later --reconcile would adopt
                # them. The key holds nothing rather than that (what it held before was
                # overwritten by them already).
                await self._discard(key)
            raise

    @property
    def _checks_md5(self) -> bool:
        """The store refuses a wrong Content-MD5 (`asyncsync doctor` found it): a body sent
        with one is proven even where the answer cannot say so (an SSE-KMS ETag)."""
        return self.capabilities[Capability.VERIFIES_MD5] is True

    async def _botocore_body(
        self, op: str, key: str, size: int, call: Callable[[], Awaitable[Any]]
    ) -> Answer:
        """One botocore request carrying a body of ``size`` bytes, counted as sent unless no
        connection was made (botocore hands the transport the body in one go)."""
        try:
            response = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not body_never_left(exc):
                self._on_sent(size)
            raise self._translated(exc, op, key) from exc
        self._on_sent(size)
        return Answer.of_response(response)

    async def _confirm_stored(self, where: str, key: str, size: int, etag: str) -> None:
        """For an answer that proves nothing: the object HEAD finds must be the size sent and
        carry the ETag that answer gave (another ETag: another object, or another body,
        took the key in between)."""
        response = await self._attempt(
            "HeadObject", key, lambda: self._client.head_object(Bucket=self._bucket, Key=key)
        )
        stored = int(response["ContentLength"])
        if stored != size:
            raise BadDigest(f"{where}: the store kept {stored} bytes of the {size} sent",
                            op="HeadObject", key=key, code="BadDigest")
        found = str(response.get("ETag") or "")
        if _bare_etag(found) != _bare_etag(etag):
            raise BadDigest(
                f"{where}: the object stored has ETag {found}, the upload was answered"
                f" with {etag}", op="HeadObject", key=key, code="BadDigest",
            )

    async def _discard(self, key: str) -> None:
        try:
            await self.delete_object(key)
        except StoreError as exc:
            log.warning("%s: could not delete the damaged object: %s", key, exc)

    async def delete_object(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call(
                "DeleteObject", key,
                lambda: self._client.delete_object(Bucket=self._bucket, Key=key),
            )

    async def create_multipart_upload(
        self, key: str, *, attributes: ObjectAttributes, crc32: bool = False
    ) -> MultipartUpload:
        extra = self._attribute_args(attributes)
        if crc32 and self.capabilities[Capability.CRC32_ECHO] is not False:
            try:
                response = await self._call(
                    "CreateMultipartUpload", key,
                    lambda: self._client.create_multipart_upload(
                        Bucket=self._bucket, Key=key, ChecksumAlgorithm="CRC32", **extra
                    ),
                )
            except FatalStoreError:
                raise
            except StoreError as exc:
                if exc.code not in _UNSUPPORTED_CODES and not isinstance(exc, NotSupported):
                    raise
                # A store that does not know the parameter: Content-MD5 parts from now on
                # (remembered in the manifest: the next run does not ask again).
                log.info("%s: no CRC32 part checksums (%s); using Content-MD5", self.location,
                         exc.code)
                self.capabilities.learn(Capability.CRC32_ECHO, False)
            else:
                upload_id = str(response["UploadId"])
                # The answer names the algorithm only where the store took it.
                if str(response.get("ChecksumAlgorithm") or "").upper() == "CRC32":
                    return MultipartUpload(upload_id, crc32=True)
                # Silent about it: the store may have ignored the parameter (s3rver) or
                # taken it without saying (then Complete needs every part's CRC32). Parts
                # of this upload carry both checksums, which either kind accepts, and the
                # next uploads ask for no CRC32 (unless a part's answer echoes one). Aborting
                # it instead would leave an orphan where abort is missing, on every run.
                self.capabilities.learn(Capability.CRC32_ECHO, False)
                log.info("%s: no CRC32 part checksums confirmed; using Content-MD5",
                         self.location)
                return MultipartUpload(upload_id, crc32=True)
        response = await self._call(
            "CreateMultipartUpload", key,
            lambda: self._client.create_multipart_upload(Bucket=self._bucket, Key=key, **extra),
        )
        return MultipartUpload(str(response["UploadId"]))

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes, *,
        md5_b64: str | None = None, crc32_b64: str | None = None,
    ) -> str:
        if md5_b64 is None and crc32_b64 is None:
            raise ValueError("a part needs a checksum")
        where = f"UploadPart s3://{self._bucket}/{key}"

        async def send() -> Answer:
            if self._direct is not None:
                return await self._direct.upload_part(
                    key, upload_id, part_number, body, md5_b64=md5_b64, crc32_b64=crc32_b64,
                    on_sent=self._on_sent,
                )
            if self._pace is not None:
                await self._pace(len(body))
            checksums: dict[str, str] = {}
            if md5_b64 is not None:
                checksums["ContentMD5"] = md5_b64
            if crc32_b64 is not None:
                checksums["ChecksumCRC32"] = crc32_b64
            return await self._botocore_body(
                "UploadPart", key, len(body),
                lambda: self._client.upload_part(
                    Bucket=self._bucket, Key=key, UploadId=upload_id,
                    PartNumber=part_number, Body=body, **checksums,
                ),
            )

        async def attempt() -> str:
            answer = await send()
            await self._prove_part(where, key, upload_id, body, answer, md5_b64, crc32_b64)
            return answer.etag

        return await self._retried(attempt)

    async def _prove_part(
        self, where: str, key: str, upload_id: str, body: bytes, answer: Answer,
        md5_b64: str | None, crc32_b64: str | None,
    ) -> None:
        """Is the part the store kept the one sent? A CRC32 echoed is the store's word that
        it checked it; failing that, the ETag must be the body's MD5 (computed now if only a
        CRC32 was sent: cheaper than sending the part again)."""
        if crc32_b64 is not None and answer.crc32 is not None:
            if answer.crc32 != crc32_b64:
                raise BadDigest(
                    f"{where}: the store echoes CRC32 {answer.crc32}, the part's is {crc32_b64}",
                    op="UploadPart", key=key, code="BadDigest",
                )
            self.capabilities.learn(Capability.CRC32_ECHO, True)
            return
        checked_by_store = md5_b64 is not None and self._checks_md5
        if crc32_b64 is not None:
            if self.capabilities.learn(Capability.CRC32_ECHO, False):
                log.info("%s does not echo part checksums: parts are proven by their MD5",
                         self.location)
            if md5_b64 is None:
                md5_b64 = await asyncio.to_thread(md5_b64_of, body)
        if not self._verdicts.check(where, "UploadPart", key, answer.etag, md5_b64,
                                    encrypted=answer.encrypted) and not checked_by_store:
            self._verdicts.unproven("UploadPart")
            self._unproven_uploads.add(upload_id)

    async def list_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        parts: list[UploadedPart] = []
        marker = 0
        while True:
            try:
                page = await self._call(
                    "ListParts", key,
                    lambda m=marker: self._client.list_parts(  # type: ignore[misc]
                        Bucket=self._bucket, Key=key, UploadId=upload_id, PartNumberMarker=m
                    ),
                )
            except NotSupported:
                self.capabilities.learn(Capability.LIST_PARTS, False)
                raise
            self.capabilities.learn(Capability.LIST_PARTS, True)
            for part in page.get("Parts", []):
                parts.append(UploadedPart(
                    int(part["PartNumber"]), str(part["ETag"]), int(part["Size"]),
                    crc32=part.get("ChecksumCRC32"),
                ))
            next_marker = int(page.get("NextPartNumberMarker") or 0)
            # A truncated page without a way forward would restart from the top forever.
            if not page.get("IsTruncated") or next_marker <= marker:
                return parts
            marker = next_marker

    async def complete_multipart_upload(
        self, key: str, upload_id: str, parts: list[UploadedPart]
    ) -> str:
        layout = {"Parts": [
            {"PartNumber": p.part_number, "ETag": p.etag,
             **({"ChecksumCRC32": p.crc32} if p.crc32 else {})}
            for p in parts
        ]}
        response = await self._call(
            "CompleteMultipartUpload", key,
            lambda: self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload=layout
            ),
        )
        etag = str(response["ETag"])
        if upload_id in self._unproven_uploads:
            self._unproven_uploads.discard(upload_id)
            where = f"CompleteMultipartUpload s3://{self._bucket}/{key}"
            try:
                await self._retried(
                    lambda: self._confirm_stored(where, key, sum(p.size for p in parts), etag)
                )
            except BadDigest:
                await self._discard(key)
                raise
        return etag

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        self._unproven_uploads.discard(upload_id)
        try:
            with contextlib.suppress(NoSuchUpload, NotFound):
                await self._call(
                    "AbortMultipartUpload", key,
                    lambda: self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=key, UploadId=upload_id
                    ),
                )
        except NotSupported:
            self.capabilities.learn(Capability.ABORT_MULTIPART, False)
            raise
        self.capabilities.learn(Capability.ABORT_MULTIPART, True)

    async def head_object(self, key: str) -> ObjectInfo | None:
        try:
            response = await self._call(
                "HeadObject", key, lambda: self._client.head_object(Bucket=self._bucket, Key=key)
            )
        except NotFound:
            return None
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            metadata=dict(response.get("Metadata", {})),
            content_encoding=response.get("ContentEncoding"),
            last_modified=_timestamp(response.get("LastModified")),
        )

    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page = await self._call(
                "ListObjectsV2", prefix, lambda a=args: self._client.list_objects_v2(**a)  # type: ignore[misc]
            )
            for item in page.get("Contents", []):
                yield ObjectInfo(str(item["Key"]), int(item["Size"]), str(item["ETag"]),
                                 last_modified=_timestamp(item.get("LastModified")))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def get_object(
        self, key: str, *, offset: int = 0, end: int | None = None, if_match: str | None = None,
        chunk_size: int = GET_CHUNK,
    ) -> ObjectBody:
        return ResumableBody(
            partial(self._open_range, key), key=key, location=f"s3://{self._bucket}",
            offset=offset, end=end, if_match=if_match, chunk_size=chunk_size,
            attempts=self._config.max_attempts, backoff=self._backoff, on_retry=self._on_retry,
        )

    async def _open_range(
        self, key: str, start: int, end: int | None, etag: str | None
    ) -> RangeReader:
        """One GetObject of bytes [start, end), If-Match ``etag``: one attempt, the
        retries and resumption are `ResumableBody`'s."""
        if end is not None and end <= start:
            return await self._empty_range(key, start, etag)  # HTTP cannot ask for no bytes
        args: dict[str, Any] = {"Bucket": self._bucket, "Key": key}
        if etag is not None:
            args["IfMatch"] = etag
        if start or end is not None:  # a whole object is asked for without a Range
            args["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            response = await self._attempt(
                "GetObject", key, lambda: self._client.get_object(**args)
            )
        except StoreError as exc:
            if exc.code in _PRECONDITION_CODES:
                raise self._changed(key, etag) from exc
            if exc.code in _INVALID_RANGE_CODES:
                # No byte at ``start``: an empty object, or a download that is complete.
                return await self._empty_range(key, start, etag)
            raise
        stream = response["Body"]
        try:
            info = ObjectInfo(
                key=key, size=int(response["ContentLength"]), etag=str(response["ETag"]),
                metadata=dict(response.get("Metadata", {})),
                content_encoding=response.get("ContentEncoding"),
            )
            first, last = 0, info.size
            if found := _CONTENT_RANGE.fullmatch(str(response.get("ContentRange") or "")):
                first, last = int(found[1]), int(found[2]) + 1
                total = found[3]
                info = replace(info, size=int(total) if total != "*" else last)
        except BaseException:
            stream.close()
            raise
        return _S3Range(info, first, last, stream, partial(self._translated, op="GetObject",
                                                           key=key), self._pace)

    def _changed(self, key: str, etag: str | None) -> ObjectChanged:
        return ObjectChanged(
            f"GetObject s3://{self._bucket}/{key}: the object is no longer version {etag};"
            " read it again from the start", op="GetObject", key=key, code="ObjectChanged",
        )

    async def _empty_range(self, key: str, start: int, etag: str | None) -> RangeReader:
        """No bytes from ``start``, but the object's attributes (HeadObject)."""
        args: dict[str, Any] = {"Bucket": self._bucket, "Key": key}
        if etag is not None:
            args["IfMatch"] = etag
        try:
            response = await self._attempt(
                "HeadObject", key, lambda: self._client.head_object(**args)
            )
        except StoreError as exc:
            if exc.code in _PRECONDITION_CODES:
                raise self._changed(key, etag) from exc
            raise
        info = ObjectInfo(
            key=key, size=int(response["ContentLength"]), etag=str(response["ETag"]),
            metadata=dict(response.get("Metadata", {})),
            content_encoding=response.get("ContentEncoding"),
        )
        if start > info.size:
            raise StoreError(
                f"GetObject s3://{self._bucket}/{key}: byte {start} lies past the object's end"
                f" ({info.size} bytes)", op="GetObject", key=key, code="InvalidRange",
            )
        return _S3Range(info, start, start, None, partial(self._translated, op="GetObject",
                                                          key=key), None)

    async def copy_object(self, source_key: str, key: str) -> str:
        response = await self._call(
            "CopyObject", key,
            lambda: self._client.copy_object(
                Bucket=self._bucket, Key=key,
                CopySource={"Bucket": self._bucket, "Key": source_key},
                MetadataDirective="COPY",
            ),
        )
        etag = str(response["CopyObjectResult"]["ETag"])
        # Some stores (SeaweedFS) leave the quotes off here but not in HEAD or listings.
        return etag if etag.startswith('"') else f'"{etag}"'

    async def copy_object_as(
        self, source_key: str, key: str, *, attributes: ObjectAttributes, if_match: str
    ) -> str:
        response = await self._copy_call(
            "CopyObject", key, if_match,
            lambda: self._client.copy_object(
                Bucket=self._bucket, Key=key,
                CopySource={"Bucket": self._bucket, "Key": source_key},
                CopySourceIfMatch=if_match, MetadataDirective="REPLACE",
                **self._attribute_args(attributes),
            ),
        )
        return _quoted(str(response["CopyObjectResult"]["ETag"]))

    async def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, source_key: str, *, offset: int,
        end: int, if_match: str,
    ) -> str:
        response = await self._copy_call(
            "UploadPartCopy", key, if_match,
            lambda: self._client.upload_part_copy(
                Bucket=self._bucket, Key=key, UploadId=upload_id, PartNumber=part_number,
                CopySource={"Bucket": self._bucket, "Key": source_key},
                CopySourceIfMatch=if_match, CopySourceRange=f"bytes={offset}-{end - 1}",
            ),
        )
        return _quoted(str(response["CopyPartResult"]["ETag"]))

    async def _copy_call(
        self, op: str, key: str, if_match: str, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        """A copy request (no body leaves): a refused If-Match is `ObjectChanged`."""
        try:
            return await self._call(op, key, call)
        except ObjectChanged:
            raise
        except StoreError as exc:
            if exc.code in _PRECONDITION_CODES:
                raise ObjectChanged(
                    f"{op} s3://{self._bucket}/{key}: the source is no longer version"
                    f" {if_match}", op=op, key=key, code="ObjectChanged",
                ) from exc
            raise

    async def close(self) -> None:
        try:
            if self._direct is not None:
                await self._direct.close()
        finally:
            await self._exit_stack.aclose()

    async def presign_get(self, key: str, *, expires: int) -> str:
        # Signed locally with the client's credentials: no request is sent.
        return str(await self._call("presign", key, lambda: self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=expires)))


class _S3Range:
    """The body of one GetObject answer."""

    __slots__ = ("info", "start", "end", "_stream", "_translate", "_pace")

    def __init__(
        self, info: ObjectInfo, start: int, end: int, stream: Any,
        translate: Callable[[BaseException], StoreError], pace: Pace | None,
    ) -> None:
        self.info, self.start, self.end = info, start, end
        self._stream, self._translate, self._pace = stream, translate, pace

    async def read(self, size: int) -> bytes:
        if self._stream is None:
            return b""
        try:
            chunk = bytes(await self._stream.read(size))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        if chunk and self._pace is not None:
            await self._pace(len(chunk))  # --max-bandwidth holds for downloads too
        return chunk

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            # A body not read to its end cannot go back to the pool: this drops the
            # connection (one read to the end was released at its last byte already).
            stream.close()


def _quoted(etag: str) -> str:
    """A copy's ETag quoted as HEAD shows it (SeaweedFS leaves the quotes off in copy
    answers)."""
    return etag if etag.startswith('"') else f'"{etag}"'


def _bare_etag(etag: str) -> str:
    """An ETag as compared: without the weak prefix and the quotes, which stores add or leave
    off differently in different answers."""
    value = etag.strip()
    return value.removeprefix("W/").strip('"')


def _timestamp(value: Any) -> float | None:
    """botocore's parsed LastModified (a datetime) as seconds since the epoch."""
    return float(value.timestamp()) if hasattr(value, "timestamp") else None


def tls_verify_override(endpoint_url: str | None) -> dict[str, Any]:
    """``verify=False`` for a plain-http endpoint reached without a proxy, else nothing.

    There is no TLS on such a connection to verify, but aiobotocore still loads the CA
    bundle before its first request (about 30 ms, in the way of a push's first
    CreateMultipartUpload). Through a proxy the setting would also reach the proxy's own
    TLS, so then botocore's default stands.
    """
    if endpoint_url and urlsplit(endpoint_url).scheme == "http" and not proxy_for(endpoint_url):
        return {"verify": False}
    return {}


def _send_bodies_at_once(client: Any) -> None:
    """No ``Expect: 100-continue`` on PutObject and UploadPart.

    aiohttp waits for the store's 100 Continue before it sends the body, and starts the read
    timeout only once the body is sent: a store that accepts the connection and never
    answers would hold every upload forever. The lean path (s3direct) never asks either.
    """
    from botocore.handlers import add_expect_header

    client.meta.events.unregister("before-call.s3", add_expect_header)


async def open_s3_store(
    bucket: str, config: StoreConfig, *, on_retry: RetryObserver | None = None,
    pace: Pace | None = None, capabilities: Capabilities | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> S3Store:
    """Create the client (credentials from the standard chain) for one bucket."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession
    from botocore import exceptions as bce

    try:
        session = AioSession(profile=config.profile)
        client_config = AioConfig(
            max_pool_connections=config.max_connections,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": config.addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="asyncsync",
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=config.region,
                endpoint_url=config.endpoint_url,
                config=client_config,
                **tls_verify_override(config.endpoint_url),
            )
        )
    except (bce.ProfileNotFound, bce.NoRegionError, bce.InvalidConfigError) as exc:
        raise FatalStoreError(f"AWS configuration: {exc}", op="configure") from exc
    except ValueError as exc:  # e.g. a malformed endpoint URL
        raise FatalStoreError(f"AWS configuration: {exc}", op="configure") from exc
    _send_bodies_at_once(client)
    direct = None
    if config.direct_uploads:
        try:
            direct = await open_direct_uploads(client, session, bucket, config, pace)
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, bce.BotoCoreError):
                raise translate_error(exc, op="configure", key="", location=f"s3://{bucket}",
                                      endpoint=config.endpoint_url or "") from exc
            raise
    return S3Store(client, stack, bucket, config, on_retry, direct, pace, capabilities,
                   on_sent)
