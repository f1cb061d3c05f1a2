"""The lean data path: PutObject and UploadPart signed here and sent with aiohttp.

botocore spends about a millisecond of CPU per request in its generic pipeline; for a tree
of small files that, not the network, is the limit. Only the two requests that carry file
bodies take this path; every control call (HeadBucket, CreateMultipartUpload, Complete,
ListParts, ...) still goes through botocore. What stays botocore's:
- the URL: taken once from a presigned URL botocore builds for a probe key, so endpoint,
  region and path/virtual addressing are exactly what botocore would use;
- the credentials: fetched from botocore's credential chain for every request (refreshable
  credentials such as web identity refresh themselves).

Bodies are streamed in slices so that asyncio's transport never holds a second copy of a
part: memory stays what the byte budget paid for. Each slice is counted as sent (``on_sent``)
as it is handed to the transport, whatever becomes of the attempt: a part cut off by a reset
half-way still cost the bytes that left.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from ..config import StoreConfig
from ..errors import FatalStoreError, StoreError
from .integrity import Answer, headers_encryption
from .protocol import ObjectAttributes
from .s3errors import body_never_left, classify_response, translate_transport_error
from .sigv4 import SigV4Signer, canonical_query, quote_path

PROBE_KEY = "asyncsync-probe"
# A part's CRC32 (base64, big-endian), sent with it and echoed by a store that checked it.
CRC32_HEADER = "x-amz-checksum-crc32"
Pace = Callable[[int], Awaitable[None]]
# Told the number of body bytes handed to the transport, as they are.
Sent = Callable[[int], None]
# Slices of a body handed to the transport at a time; it waits for the socket in between.
STREAM_SLICE = 256 * 1024
# A body this small leaves in one write that never waits for the socket (aiohttp drains
# past 64 KiB), so sock_read times the whole request; larger ones are streamed in slices
# under a stall deadline (`_Stall`).
WHOLE_BODY = 32 * 1024

_XML_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")


class DirectUploads:
    """Sends object and part bodies for one bucket, outside botocore's pipeline."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        base: str,
        signer: SigV4Signer,
        credentials: Any,
        bucket: str,
        endpoint: str,
        proxy: str | None = None,
        pace: Pace | None = None,
        timeouts: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        parts = urlsplit(base)
        self._http = http
        self._proxy = proxy
        # --max-bandwidth: each slice of a body waits for its share of the rate.
        self._pace = pace
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.netloc
        self._path_prefix = parts.path  # "/" (virtual hosted) or "/bucket/" (path style)
        self._signer = signer
        self._credentials = credentials
        self._location = f"s3://{bucket}"
        self._bucket = bucket
        self._endpoint = endpoint
        self._timeouts = timeouts  # (connect, read) seconds

    async def put_object(
        self, key: str, body: bytes, *, md5_b64: str, attributes: ObjectAttributes,
        on_sent: Sent = lambda n: None,
    ) -> Answer:
        headers = {"content-md5": md5_b64, "content-length": str(len(body))}
        for name, value in attributes.metadata.items():
            headers[f"x-amz-meta-{name.lower()}"] = value
        if attributes.content_encoding:
            headers["content-encoding"] = attributes.content_encoding
        if attributes.content_type:
            headers["content-type"] = attributes.content_type
        return await self._put("PutObject", key, {}, headers, body, on_sent)

    async def upload_part(
        self, key: str, upload_id: str, part_number: int, body: bytes, *,
        md5_b64: str | None = None, crc32_b64: str | None = None,
        on_sent: Sent = lambda n: None,
    ) -> Answer:
        headers = {"content-length": str(len(body))}
        if md5_b64 is not None:
            headers["content-md5"] = md5_b64
        if crc32_b64 is not None:
            headers[CRC32_HEADER] = crc32_b64
        query = {"partNumber": str(part_number), "uploadId": upload_id}
        return await self._put("UploadPart", key, query, headers, body, on_sent)

    async def head_bucket(self) -> None:
        """HeadBucket on these connections: a push that needs no control call then never
        opens botocore's own connection pool (nor loads its CA bundle), and the first
        uploads find a connection already made."""
        op = "HeadBucket"
        where = f"{op} {self._location}"
        headers: dict[str, str] = {}
        url = await self._signed("HEAD", op, self._path_prefix.rstrip("/") or "/", {}, headers)
        with _TransportErrors(where, op, "", self._endpoint, self._timeouts, self._bucket,
                              self._origin):
            async with self._http.head(
                url, headers=headers, proxy=self._proxy, allow_redirects=False
            ) as response:
                if response.status == 200:
                    return
                # AWS answers a request for another region's bucket with 301 (regional
                # endpoint) or 400 (signed for the wrong region), naming the right one.
                region = response.headers.get("x-amz-bucket-region")
                if response.status in (301, 400) and region and region != self._signer.region:
                    raise FatalStoreError(
                        f"{where}: the bucket is in region {region}, not"
                        f" {self._signer.region}: pass --region {region}",
                        op=op, code="PermanentRedirect",
                    )
                # A HEAD answer has no body: the status alone says what went wrong.
                raise classify_response(
                    where, op=op, key="", status=response.status, code="", message=""
                )

    async def _signed(
        self, method: str, op: str, unquoted_path: str, query: Mapping[str, str],
        headers: dict[str, str],
    ) -> URL:
        """The request's URL, with ``headers`` signed for it (credentials fetched now)."""
        path = quote_path(unquoted_path)
        query_string = canonical_query(query)
        access_key, secret_key, token = await self._frozen_credentials(op)
        self._signer.sign(
            method, self._host, path, query_string, headers,
            access_key=access_key, secret_key=secret_key, token=token,
        )
        return URL(f"{self._origin}{path}" + (f"?{query_string}" if query_string else ""),
                   encoded=True)

    async def _put(
        self, op: str, key: str, query: Mapping[str, str], headers: dict[str, str], body: bytes,
        on_sent: Sent,
    ) -> Answer:
        where = f"{op} {self._location}/{key}"
        url = await self._signed("PUT", op, self._path_prefix + key, query, headers)
        with _TransportErrors(where, op, key, self._endpoint, self._timeouts, self._bucket,
                              self._origin):
            if len(body) <= WHOLE_BODY and self._pace is None:
                # One write that never waits: sock_read times the whole request, and a
                # small object (most of a run) pays for no deadline of its own. That write
                # follows the connection at once, so the body left unless none was made.
                try:
                    answer = await self._send(where, op, key, url, headers, body)
                except Exception as exc:
                    if not body_never_left(exc):
                        on_sent(len(body))
                    raise
                on_sent(len(body))
                return answer
            async with asyncio.timeout(None) as deadline, _Stall(
                deadline, self._timeouts[1]
            ) as stall:
                return await self._send(where, op, key, url, headers,
                                        _slices(body, self._pace, stall, on_sent))

    async def _send(
        self, where: str, op: str, key: str, url: URL, headers: dict[str, str],
        data: bytes | AsyncIterator[memoryview],
    ) -> Answer:
        async with self._http.put(url, data=data, headers=headers, proxy=self._proxy) as response:
            payload = await response.read()
            if response.status == 200:
                etag = response.headers.get("ETag")
                if not etag:
                    raise StoreError(f"{where}: the store sent no ETag", op=op, key=key)
                # What the store says it kept; `S3Store` compares it with what was sent.
                return Answer(etag, response.headers.get(CRC32_HEADER),
                              headers_encryption(response.headers))
            code, message = _error_fields(payload)
            raise classify_response(
                where, op=op, key=key, status=response.status, code=code, message=message
            )

    async def _frozen_credentials(self, op: str) -> tuple[str, str, str | None]:
        if self._credentials is None:
            raise FatalStoreError(_NO_CREDENTIALS, op=op)
        frozen = await self._credentials.get_frozen_credentials()
        if not frozen.access_key or not frozen.secret_key:
            raise FatalStoreError(_NO_CREDENTIALS, op=op)
        return frozen.access_key, frozen.secret_key, frozen.token

    async def close(self) -> None:
        await self._http.close()


class _TransportErrors:
    """Around one request: a failure that is not a StoreError already (no answer, a dropped
    connection, a timeout) leaves as one, its cause kept. Cancellation passes untouched."""

    __slots__ = ("_where", "_op", "_key", "_endpoint", "_timeouts", "_bucket", "_url")

    def __init__(
        self, where: str, op: str, key: str, endpoint: str, timeouts: tuple[float, float],
        bucket: str = "", url: str = "",
    ) -> None:
        self._where, self._op, self._key, self._endpoint = where, op, key, endpoint
        # The bucket, and the origin actually dialled (BUCKET.host with virtual addressing):
        # what a failure's message names, and how an unresolvable bucket host is told.
        self._timeouts, self._bucket, self._url = timeouts, bucket, url

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, StoreError):
            raise translate_transport_error(
                exc, where=self._where, op=self._op, key=self._key, endpoint=self._endpoint,
                timeouts=self._timeouts, bucket=self._bucket, url=self._url,
            ) from exc


class _Stall:
    """Fails a request whose body stops moving for ``limit`` seconds.

    aiohttp starts sock_read only once the body is sent, so a store that stops reading it
    (its window closed, the socket buffers full) would hold the upload forever. Each slice
    handed over pushes the deadline on; time spent waiting for our own bandwidth share does
    not count, and once the body is out sock_read takes over.
    """

    __slots__ = ("_deadline", "_limit", "_open")

    def __init__(self, deadline: asyncio.Timeout, limit: float) -> None:
        self._deadline, self._limit, self._open = deadline, limit, False

    async def __aenter__(self) -> _Stall:
        self._open = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._open = False

    def _settable(self) -> bool:
        # The body runs in aiohttp's writer task: it may go on after the answer came, or
        # after the deadline fired, when the deadline is no longer ours to move.
        return self._open and not self._deadline.expired()

    def moving(self) -> None:
        if self._limit > 0 and self._settable():
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._limit)

    def waiting(self) -> None:
        if self._settable():
            self._deadline.reschedule(None)


_NO_CREDENTIALS = (
    "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "a profile (AWS_PROFILE/--profile), or run with an instance or web-identity role"
)


async def _slices(
    body: bytes, pace: Pace | None, stall: _Stall, on_sent: Sent
) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), STREAM_SLICE):
        piece = view[start:start + STREAM_SLICE]
        if pace is not None:
            stall.waiting()
            await pace(len(piece))
        stall.moving()
        on_sent(len(piece))  # handed to the transport now (aiohttp writes what it is given)
        yield piece
    stall.waiting()


def _error_fields(payload: bytes) -> tuple[str, str]:
    fields = {name.decode(): value.decode("utf-8", "replace")
              for name, value in _XML_FIELD.findall(payload)}
    return fields.get("Code", ""), fields.get("Message", "")


async def open_direct_uploads(
    client: Any, session: Any, bucket: str, config: StoreConfig, pace: Pace | None = None
) -> DirectUploads:
    """Build the lean path from an open aiobotocore client and its session."""
    credentials = await session.get_credentials()
    if credentials is None:
        raise FatalStoreError(_NO_CREDENTIALS, op="configure")
    probe = await client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": PROBE_KEY}, ExpiresIn=60
    )
    parts = urlsplit(probe)
    if not parts.path.endswith("/" + PROBE_KEY):
        raise FatalStoreError(f"cannot derive the upload URL for s3://{bucket} from {probe!r}")
    base = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(PROBE_KEY)]}"
    region = client.meta.region_name or "us-east-1"
    connector = aiohttp.TCPConnector(
        limit=config.max_connections, ssl=_ssl_context(session) if parts.scheme == "https"
        else False,
    )
    http = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
        ),
        skip_auto_headers=("Content-Type",),
        auto_decompress=False,
        # trust_env would re-read ~/.netrc and the proxy variables on every request (in a
        # thread); the proxy is resolved once instead, below.
        trust_env=False,
    )
    return DirectUploads(
        http, base=base, signer=SigV4Signer(region), credentials=credentials, bucket=bucket,
        endpoint=str(client.meta.endpoint_url or ""), proxy=proxy_for(base), pace=pace,
        timeouts=(config.connect_timeout, config.read_timeout),
    )


def proxy_for(url: str) -> str | None:
    """The HTTP(S)_PROXY that applies to ``url`` (honouring NO_PROXY), as botocore does."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not proxies or bypass(parts.hostname or "", proxies):
        return None
    return proxies.get(parts.scheme)


def _ssl_context(session: Any) -> ssl.SSLContext:
    """Verify TLS with the same CA bundle botocore would use (AWS_CA_BUNDLE, ca_bundle)."""
    bundle = session.get_config_variable("ca_bundle") or os.environ.get("AWS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()
