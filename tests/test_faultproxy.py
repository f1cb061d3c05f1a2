"""Self-tests of the fault proxy: transparent when idle, and injecting exactly what it is told.

Most tests go through the proxy to the session's real SeaweedFS server; the framing tests use a
small stdlib HTTP server instead, because SeaweedFS always answers with Content-Length.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError

from .faultproxy import WRONG_CRC32, FaultProxy

MiB = 1024 * 1024


@pytest.fixture
def proxy(s3_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as running:
        yield running


def bare_client(s3_server: Any, endpoint: str) -> Any:
    """A client like conftest's but with a single attempt, so injected faults reach the test."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.Session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture
def client(s3_server: Any, proxy: FaultProxy) -> Iterator[Any]:
    made = bare_client(s3_server, proxy.endpoint)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def retrying_client(s3_server: Any, proxy: FaultProxy) -> Iterator[Any]:
    made = s3_server.client(endpoint=proxy.endpoint)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.s3
@pytest.mark.servers("seaweedfs", "s3rver")  # moto closes every connection after its answer
def test_objects_round_trip_unchanged(client: Any, proxy: FaultProxy, bucket: str) -> None:
    big = os.urandom(8 * MiB)
    client.put_object(Bucket=bucket, Key="small", Body=b"hello")
    # A file-like body makes botocore send Expect: 100-continue.
    client.put_object(Bucket=bucket, Key="big", Body=io.BytesIO(big))

    assert client.get_object(Bucket=bucket, Key="small")["Body"].read() == b"hello"
    assert client.get_object(Bucket=bucket, Key="big")["Body"].read() == big
    stats = proxy.stats
    assert stats.requests == stats.forwarded == 4
    assert stats.by_method == {"PUT": 2, "GET": 2}
    assert stats.body_bytes_upstream == len(b"hello") + len(big)
    assert stats.faults == 0
    assert stats.connections == 1

    proxy.reset_stats()
    assert proxy.stats.requests == 0


@pytest.mark.s3
@pytest.mark.servers("seaweedfs", "s3rver")  # moto closes every connection after its answer
@pytest.mark.parametrize(
    ("action", "status", "code"), [("503", 503, "SlowDown"), ("500", 500, "InternalError")]
)
def test_error_answers_then_success(
    client: Any, proxy: FaultProxy, bucket: str, action: str, status: int, code: str
) -> None:
    proxy.inject(action, 2, method="PUT")
    for _ in range(2):
        with pytest.raises(ClientError) as caught:
            client.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"x" * 100_000))
        assert caught.value.response["Error"]["Code"] == code
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status

    client.put_object(Bucket=bucket, Key="k", Body=b"third")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"third"
    stats = proxy.stats
    assert stats.faults == 2
    assert stats.faults_by_action == {action: 2}
    assert stats.body_bytes_upstream == len(b"third")
    assert stats.connections == 1  # the error answers kept the connection usable


@pytest.mark.s3
def test_reset_is_a_connection_error(client: Any, proxy: FaultProxy, bucket: str) -> None:
    proxy.inject("reset", 1)
    with pytest.raises(Exception) as caught:
        client.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"x" * MiB))
    assert "Connection" in type(caught.value).__name__

    client.put_object(Bucket=bucket, Key="k", Body=b"after")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"after"
    stats = proxy.stats
    assert stats.faults_by_action == {"reset": 1}
    assert stats.body_bytes_upstream == len(b"after")


def test_reset_sends_rst_not_fin() -> None:
    # The upstream is never contacted: the reset happens before forwarding.
    with FaultProxy("http://127.0.0.1:9") as proxy:
        proxy.inject("reset", 1)
        url = urlsplit(proxy.endpoint)
        with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
            sock.sendall(b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabc")
            # A FIN would read as b""; only an RST raises.
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        assert proxy.stats.faults_by_action == {"reset": 1}
        assert proxy.stats.forwarded == 0


@pytest.mark.s3
def test_delay_then_forward(client: Any, proxy: FaultProxy, bucket: str) -> None:
    proxy.inject("delay", 1, delay=0.5)
    started = time.monotonic()
    client.put_object(Bucket=bucket, Key="k", Body=b"late")
    assert time.monotonic() - started >= 0.5

    started = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"late"
    assert time.monotonic() - started < 0.5
    assert proxy.stats.forwarded == 2


@pytest.mark.s3
def test_peak_in_flight_counts_requests_held_at_once(
    s3_server: Any, proxy: FaultProxy, bucket: str
) -> None:
    proxy.inject("delay", 3, method="PUT", delay=0.5)
    clients = [bare_client(s3_server, proxy.endpoint) for _ in range(3)]
    try:
        threads = [
            threading.Thread(target=c.put_object, kwargs={"Bucket": bucket, "Key": f"p{i}",
                                                          "Body": b"x"})
            for i, c in enumerate(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        clients[0].put_object(Bucket=bucket, Key="after", Body=b"y")  # alone: no new peak
    finally:
        for c in clients:
            c.close()
    assert proxy.stats.peak_in_flight == 3
    assert proxy.stats.forwarded == 4


@pytest.mark.s3
def test_multipart_upload_with_a_retried_part(
    retrying_client: Any, proxy: FaultProxy, bucket: str
) -> None:
    parts_data = [os.urandom(5 * MiB), os.urandom(5 * MiB)]
    proxy.inject("503", 1, method="PUT", query_contains="partNumber=2")

    upload_id = retrying_client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    parts = []
    for number, data in enumerate(parts_data, start=1):
        etag = retrying_client.upload_part(
            Bucket=bucket, Key="mp", UploadId=upload_id, PartNumber=number, Body=data
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    retrying_client.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload_id, MultipartUpload={"Parts": parts}
    )

    assert retrying_client.get_object(Bucket=bucket, Key="mp")["Body"].read() == b"".join(
        parts_data
    )
    stats = proxy.stats
    assert stats.faults == 1  # botocore retried part 2 after the SlowDown
    assert stats.by_method["PUT"] == 3
    # The parts, plus the small XML body of CompleteMultipartUpload.
    assert 10 * MiB < stats.body_bytes_upstream < 10 * MiB + 4096


@pytest.mark.s3
def test_bandwidth_limit_slows_uploads(client: Any, proxy: FaultProxy, bucket: str) -> None:
    proxy.set_bandwidth(2 * MiB)
    started = time.monotonic()
    client.put_object(Bucket=bucket, Key="k", Body=os.urandom(2 * MiB))
    assert time.monotonic() - started >= 0.8

    proxy.set_bandwidth(None)
    started = time.monotonic()
    client.put_object(Bucket=bucket, Key="k", Body=os.urandom(2 * MiB))
    assert time.monotonic() - started < 0.8


@pytest.mark.s3
@pytest.mark.servers("seaweedfs", "s3rver")  # moto closes every connection after its answer
def test_head_of_missing_object_keeps_connection(
    client: Any, proxy: FaultProxy, bucket: str
) -> None:
    client.put_object(Bucket=bucket, Key="present", Body=b"here")
    with pytest.raises(ClientError) as caught:
        client.head_object(Bucket=bucket, Key="missing")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    assert client.get_object(Bucket=bucket, Key="present")["Body"].read() == b"here"
    assert proxy.stats.connections == 1


@pytest.mark.s3
def test_chunked_request_body_is_forwarded(
    client: Any, proxy: FaultProxy, bucket: str
) -> None:
    # A presigned URL carries its signature in the query, so any framing of the body is valid.
    url = urlsplit(client.generate_presigned_url("put_object", {"Bucket": bucket, "Key": "c"}))
    pieces = [b"a" * 70_000, b"b" * 10, b"c" * 100_000]
    conn = http.client.HTTPConnection(url.hostname or "", url.port)
    try:
        conn.request("PUT", f"{url.path}?{url.query}", body=iter(pieces), encode_chunked=True)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()

    assert client.get_object(Bucket=bucket, Key="c")["Body"].read() == b"".join(pieces)
    # On the wire the chunk framing travels too.
    assert proxy.stats.body_bytes_upstream > sum(map(len, pieces))


@pytest.mark.s3
def test_aiobotocore_through_proxy(s3_server: Any, proxy: FaultProxy, bucket: str) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import EndpointConnectionError

    data = os.urandom(3 * MiB)
    config = AioConfig(
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": 1},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )

    async def exercise() -> None:
        async with get_session().create_client(
            "s3",
            endpoint_url=proxy.endpoint,
            region_name="us-east-1",
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key=s3_server.secret_key,
            config=config,
        ) as aio:
            # aiohttp waits without limit for the 100 Continue this file-like body asks for.
            await aio.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(data))
            response = await aio.get_object(Bucket=bucket, Key="k")
            async with response["Body"] as body:
                assert await body.read() == data

            proxy.inject("503", 1, method="PUT")
            with pytest.raises(ClientError, match="SlowDown"):
                await aio.put_object(Bucket=bucket, Key="k", Body=b"x")
            # aiohttp itself resends an idempotent request once after a dropped connection,
            # whatever botocore's retry settings, so one reset alone would go unnoticed.
            proxy.inject("reset", 2)
            with pytest.raises(EndpointConnectionError):
                await aio.put_object(Bucket=bucket, Key="k", Body=b"x")
            proxy.clear_rules()
            await aio.head_object(Bucket=bucket, Key="k")

    asyncio.run(exercise())
    assert proxy.stats.body_bytes_upstream == len(data)


LARGE = bytes(range(256)) * 800  # 204,800 bytes


class _FramingHandler(http.server.BaseHTTPRequestHandler):
    """Answers with the framings SeaweedFS never uses, and echoes chunked bodies back."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        elif self.path == "/large":
            self.send_response(200)
            self.send_header("Content-Length", str(len(LARGE)))
            self.end_headers()
            self.wfile.write(LARGE)
        elif self.path == "/tagged":
            self.send_response(200)
            self.send_header("ETag", TAG)
            self.send_header("x-amz-checksum-crc32", "DUoRhQ==")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"body")
        elif self.path == "/no-content":
            self.send_response(204)
            self.send_header("Content-Length", "10")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"body")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "123456")
        self.end_headers()

    def do_POST(self) -> None:
        """Answers with the body it was sent: what reached the server."""
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


TAG = '"0123456789abcdef0123456789abcdef"'


@pytest.fixture
def framing_proxy() -> Iterator[FaultProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FramingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(f"http://127.0.0.1:{server.server_address[1]}") as running:
            yield running
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_response_framings_on_one_connection(framing_proxy: FaultProxy) -> None:
    url = urlsplit(framing_proxy.endpoint)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    try:
        conn.request("GET", "/chunked")
        assert conn.getresponse().read() == b"hello chunked world"
        conn.request("HEAD", "/anything")
        response = conn.getresponse()
        assert response.read() == b"" and response.getheader("Content-Length") == "123456"
        conn.request("GET", "/no-content")
        response = conn.getresponse()
        assert response.status == 204 and response.read() == b""
        conn.request("GET", "/plain")
        assert conn.getresponse().read() == b"body"
    finally:
        conn.close()
    assert framing_proxy.stats.connections == 1
    assert framing_proxy.stats.requests == 4


def test_unreachable_upstream_answers_502() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with FaultProxy(f"http://127.0.0.1:{dead_port}") as proxy:
        url = urlsplit(proxy.endpoint)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 502
            response.read()
        finally:
            conn.close()


def _until_reset(sock: socket.socket) -> bytes:
    """Everything the peer sent before it reset the connection (a FIN fails the test)."""
    received = b""
    with pytest.raises(ConnectionResetError):
        while True:
            piece = sock.recv(65536)
            assert piece, "closed with a FIN, not reset"
            received += piece
    return received


def test_truncate_response_relays_part_of_the_body_then_resets(
    framing_proxy: FaultProxy,
) -> None:
    url = urlsplit(framing_proxy.endpoint)
    framing_proxy.inject("truncate-response", 1, method="GET", truncate_at=50_000, delay=0.1)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n")
        received = _until_reset(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: %d" % len(LARGE) in head  # the answer promised the whole body
    assert body == LARGE[:50_000]  # exactly the bytes before the cut, none lost to the reset
    stats = framing_proxy.stats
    assert stats.faults_by_action == {"truncate-response": 1}
    assert stats.body_bytes_downstream == 50_000

    # The rule is spent: the next request gets the whole body.
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    try:
        conn.request("GET", "/large")
        assert conn.getresponse().read() == LARGE
    finally:
        conn.close()


def test_truncate_response_past_a_short_body_never_waits_for_more(
    framing_proxy: FaultProxy,
) -> None:
    url = urlsplit(framing_proxy.endpoint)
    framing_proxy.inject("truncate-response", 1, truncate_at=10_000)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        received = _until_reset(sock)
    assert received.endswith(b"\r\n\r\nbody")
    assert time.monotonic() - started < 2
    with pytest.raises(ValueError):
        framing_proxy.inject("truncate-response", 1, truncate_at=-1)


def _get(proxy: FaultProxy, path: str, **headers: str) -> http.client.HTTPResponse:
    url = urlsplit(proxy.endpoint)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_every_request_is_seen_with_its_headers(framing_proxy: FaultProxy) -> None:
    _get(framing_proxy, "/plain?uploads", **{"X-Amz-Checksum-Algorithm": "CRC32"})
    _get(framing_proxy, "/plain?partNumber=1")
    seen = framing_proxy.stats.seen
    assert [(r.method, r.target) for r in seen] == [
        ("GET", "/plain?uploads"), ("GET", "/plain?partNumber=1")]
    assert seen[0].headers["x-amz-checksum-algorithm"] == "CRC32"
    assert "x-amz-checksum-algorithm" not in seen[1].headers
    assert framing_proxy.stats.requests_to("GET", "partNumber=") == [seen[1]]
    framing_proxy.reset_stats()
    assert framing_proxy.stats.seen == []


def test_answers_rewritten_on_the_way_to_the_client(framing_proxy: FaultProxy) -> None:
    plain = _get(framing_proxy, "/tagged")
    assert plain.getheader("ETag") == TAG and plain.getheader("x-amz-checksum-crc32")

    framing_proxy.inject("opaque-etag", 2, path_contains="/tagged")
    opaque = [_get(framing_proxy, "/tagged").getheader("ETag") for _ in range(2)]
    # No MD5 any more, the same length, and the same each time the object is asked for.
    assert opaque[0] == opaque[1] == '"ghijklmnopqrstuvghijklmnopqrstuv"'

    framing_proxy.inject("wrong-checksum", 1, path_contains="/tagged")
    assert _get(framing_proxy, "/tagged").getheader(
        "x-amz-checksum-crc32") == WRONG_CRC32.decode()

    url = urlsplit(framing_proxy.endpoint)
    framing_proxy.inject("corrupt-response", 1, method="GET")
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    try:
        conn.request("GET", "/large")
        damaged = conn.getresponse().read()
        conn.request("GET", "/large")
        intact = conn.getresponse().read()
    finally:
        conn.close()
    assert len(damaged) == len(LARGE) and damaged[0] == LARGE[0] ^ 0xFF
    assert damaged[1:] == LARGE[1:] and intact == LARGE


def test_restore_etag_spells_the_etags_of_a_request_body_back(
    framing_proxy: FaultProxy,
) -> None:
    """A CompleteMultipartUpload naming opaque part ETags reaches the store naming its own."""
    body = (b"<CompleteMultipartUpload><Part><ETag>&quot;ghijklmnopqrstuvghijklmnopqrstuv"
            b"&quot;</ETag><PartNumber>1</PartNumber></Part></CompleteMultipartUpload>")
    framing_proxy.inject("restore-etag", 1, method="POST")
    url = urlsplit(framing_proxy.endpoint)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    try:
        conn.request("POST", "/key?uploadId=1", body=body)
        received = conn.getresponse().read()
    finally:
        conn.close()
    assert received == body.replace(b"ghijklmnopqrstuvghijklmnopqrstuv",
                                    b"0123456789abcdef0123456789abcdef")
