"""An HTTP/1.1 fault-injecting proxy for testing asyncsync against a real S3 server.

The proxy sits between an S3 client (botocore, aiobotocore, or an `asyncsync` subprocess whose
AWS_ENDPOINT_URL points at `FaultProxy.endpoint`) and a real S3 server such as the embedded
SeaweedFS, and lets a test make chosen requests fail the way real object stores and networks
fail: throttling (503 SlowDown), server errors (500), connection resets (before a request is
forwarded, or in the middle of the response body), latency, and a slow uplink. Everything
else is forwarded byte for byte (bar the Expect header, which the proxy answers itself), so
SigV4 signatures stay valid: the client signs the proxy's Host header and the proxy passes
it through unchanged.

The proxy runs its own asyncio event loop in a daemon thread, so synchronous tests and
subprocesses can use it alike. Bodies are streamed in bounded pieces, never held whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import re
import socket
import struct
import termios
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

ACTIONS = ("503", "500", "reset", "delay", "lose-response", "strip-checksum",
           "truncate-response", "corrupt-body", "opaque-etag", "restore-etag",
           "wrong-checksum", "corrupt-response")
# Actions that forward the request and change it or its answer on the way.
_REWRITES = frozenset({"strip-checksum", "corrupt-body", "opaque-etag", "restore-etag",
                       "wrong-checksum", "corrupt-response"})

_PIECE = 64 * 1024
_MAX_HEAD = 1024 * 1024
_HEADERS_NOT_FORWARDED = frozenset({b"expect"})

# "opaque-etag" spells an ETag's hex digits as the letters g-v: the same length, no MD5, and
# "restore-etag" turns them back (so a CompleteMultipartUpload naming them still holds).
_OPAQUE = bytes.maketrans(b"0123456789abcdef", b"ghijklmnopqrstuv")
_CLEAR = bytes.maketrans(b"ghijklmnopqrstuv", b"0123456789abcdef")
_XML_ETAG = re.compile(rb"<ETag>[^<]*</ETag>")
_OPAQUE_MD5 = re.compile(rb"[g-v]{32}")
# The CRC32 "wrong-checksum" answers with, in place of the one the store echoed.
WRONG_CRC32 = base64.b64encode(b"\xde\xad\xbe\xef")
_MAX_REWRITTEN_BODY = 1024 * 1024

_ERRORS = {
    "503": (503, b"Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, b"Internal Server Error", "InternalError", "We encountered an internal error."),
}


@dataclass
class ProxyStats:
    """What the proxy has seen since it started or since `reset_stats()`.

    `FaultProxy.stats` hands out a copy, so a test can keep one and compare it with a later one.
    """

    connections: int = 0  # client connections accepted; few of them means keep-alive works
    requests: int = 0
    forwarded: int = 0
    faults: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    # Request body bytes written to the server, as on the wire (chunk framing included).
    body_bytes_upstream: int = 0
    # Response body bytes relayed to clients, likewise: a download resumed where it was cut
    # off costs the object's size, one started again costs more.
    body_bytes_downstream: int = 0
    faults_by_action: dict[str, int] = field(default_factory=dict)
    # The most requests the proxy was handling at once (read, delayed, forwarded, answered).
    peak_in_flight: int = 0
    # Every request's method, target and headers (names lower-cased), in arrival order.
    seen: list[SeenRequest] = field(default_factory=list)

    def requests_to(self, method: str, query_contains: str = "") -> list[SeenRequest]:
        """The requests seen with this method whose query holds ``query_contains``."""
        return [r for r in self.seen
                if r.method == method and query_contains in r.target.partition("?")[2]]


@dataclass(frozen=True)
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class _Rule:
    action: str
    remaining: int
    method: str | None
    path_contains: str | None
    query_contains: str | None
    delay: float
    truncate_at: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
            and (self.query_contains is None or self.query_contains in query)
        )


@dataclass
class _Request:
    method: str
    target: str
    version: bytes
    header_lines: list[bytes]  # raw "Name: value" lines, to forward exactly as the client sent
    headers: dict[bytes, bytes]  # lower-cased names, for decisions only

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    @property
    def chunked(self) -> bool:
        return b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()

    @property
    def content_length(self) -> int:
        return int(self.headers.get(b"content-length", b"0") or b"0")

    @property
    def expects_continue(self) -> bool:
        return self.headers.get(b"expect", b"").lower() == b"100-continue"

    @property
    def wants_close(self) -> bool:
        connection = self.headers.get(b"connection", b"").lower()
        if self.version == b"HTTP/1.0":
            return b"keep-alive" not in connection
        return b"close" in connection


class _UpstreamError(Exception):
    """The server could not be reached or dropped the connection mid-request."""


class _Upstream:
    """The one server connection that belongs to one client connection, opened lazily."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure_open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # A server may close an idle keep-alive connection; that shows as EOF on the reader
        # by the time the next request comes, so reopen rather than write into a dead socket.
        if self.reader is None or self.writer is None or self.reader.at_eof() or (
            self.writer.is_closing()
        ):
            await self.close()
            try:
                self.reader, self.writer = await asyncio.open_connection(
                    self._host, self._port, limit=_MAX_HEAD
                )
            except OSError as exc:
                raise _UpstreamError(f"cannot connect to {self._host}:{self._port}") from exc
        return self.reader, self.writer

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            await _close_writer(writer)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One message head up to and including the blank line; None on a clean EOF before it."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise ConnectionError("connection closed inside a message head") from exc
        return None


def _split_head(head: bytes) -> tuple[bytes, list[bytes], dict[bytes, bytes]]:
    start, *lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return start, lines, headers


def _parse_request(head: bytes) -> _Request:
    start, lines, headers = _split_head(head)
    method, target, version = start.split(b" ", 2)
    return _Request(method.decode("ascii"), target.decode("latin-1"), version, lines, headers)


Send = Callable[[bytes], Awaitable[None]]


async def _discard(data: bytes) -> None:
    pass


def _send_to(writer: asyncio.StreamWriter) -> Send:
    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return send


async def _copy_exact(reader: asyncio.StreamReader, send: Send, length: int) -> None:
    """Stream `length` bytes from reader to send, a bounded piece at a time."""
    remaining = length
    while remaining:
        piece = await reader.readexactly(min(remaining, _PIECE))
        remaining -= len(piece)
        await send(piece)


async def _copy_chunked(reader: asyncio.StreamReader, send: Send) -> None:
    """Stream a chunked body, framing and trailers included, so the receiver sees it intact."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        await send(size_line)
        if size == 0:
            while True:
                trailer = await reader.readuntil(b"\r\n")
                await send(trailer)
                if trailer == b"\r\n":
                    return
        await _copy_exact(reader, send, size)
        await send(await reader.readexactly(2))


async def _sent(sock: socket.socket, timeout: float = 5.0) -> None:
    """Wait until the kernel has sent (and the peer acknowledged) everything written to
    ``sock`` (Linux: SIOCOUTQ), so a reset that follows discards none of it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return  # not a TCP socket, or not Linux: nothing to wait for
        if struct.unpack("i", queued)[0] == 0:
            return
        await asyncio.sleep(0.005)


def _simple_response(status: int, reason: bytes, body: bytes, *, close: bool) -> bytes:
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"Content-Type: application/xml",
        b"Content-Length: %d" % len(body),
        b"x-amz-request-id: " + uuid.uuid4().hex[:16].upper().encode(),
    ]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _rewritten_head(head: bytes, rewrite: str) -> bytes:
    """A response head as "strip-checksum", "opaque-etag" or "wrong-checksum" relays it."""
    lines = []
    for line in head[:-4].split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if rewrite == "strip-checksum" and name.startswith(b"x-amz-checksum-"):
            continue
        if rewrite == "opaque-etag" and name == b"etag":
            line = b"ETag: " + value.strip().translate(_OPAQUE)
        if rewrite == "wrong-checksum" and name == b"x-amz-checksum-crc32":
            line = b"x-amz-checksum-crc32: " + WRONG_CRC32
        lines.append(line)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _first_byte_flipped(send: Send) -> Send:
    """``send`` with the first byte of what it is given inverted: a body damaged on its way
    to the client, its length unchanged."""
    pending = [True]

    async def flipped(data: bytes) -> None:
        if pending[0] and data:
            data, pending[0] = bytes([data[0] ^ 0xFF]) + data[1:], False
        await send(data)

    return flipped


def _error_xml(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()


class FaultProxy:
    """A loopback HTTP/1.1 proxy in front of `upstream` that injects queued faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._stats = ProxyStats()
        self._in_flight = 0
        self._bytes_per_second: float | None = None
        # Shared by all connections, so the limit holds for the upload as a whole.
        self._next_send_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._port: int | None = None

    # -- lifecycle, called from the test thread ------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FaultProxy:
        if self._loop is not None:
            raise RuntimeError("FaultProxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"faultproxy-{self._upstream_port}", daemon=True
        )
        self._thread.start()
        try:
            self._port = asyncio.run_coroutine_threadsafe(self._listen(), loop).result(10)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = None
            self._port = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- control, called from the test thread --------------------------------------------

    def inject(
        self,
        action: str,
        count: int,
        *,
        method: str | None = None,
        path_contains: str | None = None,
        query_contains: str | None = None,
        delay: float = 0.0,
        truncate_at: int = 0,
    ) -> None:
        """Give `action` to the next `count` requests that match every filter given.

        Rules are tried in the order they were added; a request takes the first one that
        matches and still has count left. Under aiobotocore, aiohttp resends an idempotent
        request (GET, PUT, HEAD, DELETE) once by itself after a dropped connection, so it takes
        a reset with count=2 for the client to see one. "lose-response" forwards the request,
        lets the server act on it, and resets the client instead of relaying the answer.
        "strip-checksum" relays the answer without its x-amz-checksum-* headers, as a store
        that ignores checksums would send it. "corrupt-body" forwards the request with the
        first byte of its (Content-Length) body inverted, as a faulty network or middlebox
        would: the signature still holds for UNSIGNED-PAYLOAD requests. "opaque-etag" relays
        the answer with its ETag's hex digits spelt as the letters g-v (no MD5, as a store
        with ETags of its own kind, or SSE-KMS, answers; the same ETag always reads the same,
        in a PUT's answer and a HEAD's alike); "restore-etag" forwards a request with the
        ETags its XML body names spelt back (a CompleteMultipartUpload listing opaque part
        ETags). "wrong-checksum" relays the answer with another x-amz-checksum-crc32 than
        the store echoed. "corrupt-response" relays a successful (Content-Length) answer
        with the first byte of its body inverted: a download damaged on the way.
        "truncate-response" forwards the request, relays
        the answer's head and its first `truncate_at` body bytes, waits until the client has
        them (the kernel's send queue is empty, then `delay` seconds more, for the client to
        take them from its own buffers: aiohttp drops what it has buffered but not handed
        out once a reset arrives), then resets the client: a connection lost mid-download.
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
        if count < 1:
            raise ValueError("count must be at least 1")
        if action == "delay" and delay <= 0:
            raise ValueError("a delay rule needs delay > 0")
        if truncate_at < 0:
            raise ValueError("truncate_at must be at least 0")
        rule = _Rule(
            action, count, method.upper() if method else None, path_contains, query_contains,
            delay, truncate_at,
        )
        with self._lock:
            self._rules.append(rule)

    def clear_rules(self) -> None:
        """Drop every rule that still has count left."""
        with self._lock:
            self._rules.clear()

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """Limit request body bytes sent to the server, over all connections (None: no limit)."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive or None")
        with self._lock:
            self._bytes_per_second = bytes_per_second
            self._next_send_at = 0.0

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return replace(
                self._stats,
                by_method=dict(self._stats.by_method),
                faults_by_action=dict(self._stats.faults_by_action),
                seen=list(self._stats.seen),
            )

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ProxyStats()

    # -- bookkeeping shared with the proxy thread ----------------------------------------

    def _admit(self, request: _Request) -> _Rule | None:
        """Count a new request and take the fault it is due, if any."""
        with self._lock:
            s = self._stats
            s.requests += 1
            self._in_flight += 1
            s.peak_in_flight = max(s.peak_in_flight, self._in_flight)
            s.by_method[request.method] = s.by_method.get(request.method, 0) + 1
            s.seen.append(SeenRequest(request.method, request.target, {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in request.headers.items()}))
            for rule in self._rules:
                if rule.matches(request.method, request.path, request.query):
                    rule.remaining -= 1
                    s.faults += 1
                    s.faults_by_action[rule.action] = s.faults_by_action.get(rule.action, 0) + 1
                    self._rules = [r for r in self._rules if r.remaining > 0]
                    return rule
        return None

    def _finished(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _count_forwarded(self) -> None:
        with self._lock:
            self._stats.forwarded += 1

    def _count_body_bytes(self, n: int) -> None:
        with self._lock:
            self._stats.body_bytes_upstream += n

    def _count_downstream(self, n: int) -> None:
        with self._lock:
            self._stats.body_bytes_downstream += n

    def _send_down(self, writer: asyncio.StreamWriter) -> Send:
        """Relays response body bytes to the client, counted."""
        send = _send_to(writer)

        async def counted(data: bytes) -> None:
            await send(data)
            self._count_downstream(len(data))

        return counted

    async def _pace(self, n: int) -> None:
        """Wait for this piece's slot under the bandwidth limit before it goes upstream."""
        with self._lock:
            rate = self._bytes_per_second
            if rate is None:
                return
            now = time.monotonic()
            start = max(now, self._next_send_at)
            self._next_send_at = start + n / rate
            wait = self._next_send_at - now
        await asyncio.sleep(wait)

    # -- the proxy thread ----------------------------------------------------------------

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(
            self._serve_client, "127.0.0.1", 0, limit=_MAX_HEAD
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        # A connection accepted just before the close has its handler task only scheduled.
        await asyncio.sleep(0)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # A hostname upstream resolves through the default executor; stop its threads too.
        await asyncio.get_running_loop().shutdown_default_executor()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with self._lock:
            self._stats.connections += 1
        upstream = _Upstream(self._upstream_host, self._upstream_port)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                request = _parse_request(head)
                rule = self._admit(request)
                try:
                    if not await self._handle(request, rule, reader, writer, upstream):
                        return
                finally:
                    self._finished()
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass  # the client went away or spoke garbage; nothing to answer
        except asyncio.CancelledError:
            pass  # close() is shutting the proxy down
        finally:
            await upstream.close()
            await _close_writer(writer)
            self._handlers.discard(task)

    async def _handle(
        self,
        request: _Request,
        rule: _Rule | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
    ) -> bool:
        """Answer one request as its rule says; False when the connection is done."""
        if rule is not None and rule.action == "reset":
            await self._reset(request, reader, writer)
            return False
        if rule is not None and rule.action == "lose-response":
            await self._forward_then_reset(request, reader, writer, upstream)
            return False
        if rule is not None and rule.action == "truncate-response":
            await self._forward_truncated(request, rule, reader, writer, upstream)
            return False
        if rule is not None and rule.action in _ERRORS:
            await self._answer_error(rule.action, request, reader, writer)
            return not request.wants_close
        if rule is not None and rule.action == "delay":
            await asyncio.sleep(rule.delay)
        rewrite = rule.action if rule is not None and rule.action in _REWRITES else None
        return await self._forward(request, reader, writer, upstream, rewrite)

    async def _reset(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.expects_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if request.chunked or request.content_length:
            # Take a little of the body so the client is mid-send when the reset lands.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(_PIECE), 0.2)
        sock = writer.get_extra_info("socket")
        # Linger on with a zero timeout makes close() send RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _answer_error(
        self,
        action: str,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        status, reason, code, message = _ERRORS[action]
        if request.expects_continue:
            # The client may hold the body back until it hears 100; take it and discard it
            # so the connection stays in step for the next request.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if request.chunked:
            await _copy_chunked(reader, _discard)
        else:
            await _copy_exact(reader, _discard, request.content_length)
        body = _error_xml(code, message, request.path)
        response = _simple_response(status, reason, body, close=request.wants_close)
        if request.method == "HEAD":
            response = response[: len(response) - len(body)]
        writer.write(response)
        await writer.drain()

    async def _forward(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
        rewrite: str | None = None,
    ) -> bool:
        """Send one request upstream and relay its response, changed as ``rewrite`` (one of
        _REWRITES) says; False when the client is done."""
        try:
            up_reader, up_writer = await self._send_upstream(request, reader, writer, upstream,
                                                             rewrite)
            close_after = await self._relay_response(request, up_reader, writer, rewrite)
        except _UpstreamError:
            # This includes a server that answers early and hangs up mid-body (a bad signature
            # on a large PUT): asyncio drops its answer with the reset, much as a client
            # talking to the server directly would usually lose it.
            await upstream.close()
            body = _error_xml("BadGateway", "The proxy lost its connection to the server.", "")
            writer.write(_simple_response(502, b"Bad Gateway", body, close=True))
            await writer.drain()
            return False
        if close_after:
            await upstream.close()
            return False
        return not request.wants_close

    async def _send_upstream(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
        rewrite: str | None = None,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Send the request head and body to the server; return the upstream streams."""
        up_reader, up_writer = await upstream.ensure_open()
        # The proxy answers the client's Expect itself and drops the header upstream
        # (SigV4 never signs it): that keeps interim responses out of the relay logic
        # and still lets clients that wait for 100 (aiohttp waits forever) send the body.
        lines = [
            line
            for line in request.header_lines
            if line.partition(b":")[0].strip().lower() not in _HEADERS_NOT_FORWARDED
        ]
        start = b"%s %s %s" % (
            request.method.encode("ascii"),
            request.target.encode("latin-1"),
            request.version,
        )
        up_writer.write(b"\r\n".join([start, *lines]) + b"\r\n\r\n")
        self._count_forwarded()
        if request.expects_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        await self._forward_body(request, reader, up_writer, rewrite)
        return up_reader, up_writer

    async def _forward_then_reset(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
    ) -> None:
        """The server does the work but its answer never arrives: the client must find out
        for itself whether the request took effect (a lost CompleteMultipartUpload reply)."""
        with contextlib.suppress(_UpstreamError):
            up_reader, _ = await self._send_upstream(request, reader, writer, upstream)
            with contextlib.suppress(ConnectionError, asyncio.LimitOverrunError):
                await _read_head(up_reader)
        await upstream.close()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _forward_truncated(
        self,
        request: _Request,
        rule: _Rule,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
    ) -> None:
        """The answer starts, and the connection dies part-way through its body."""
        with contextlib.suppress(_UpstreamError, ConnectionError, asyncio.LimitOverrunError,
                                 asyncio.IncompleteReadError):
            up_reader, _ = await self._send_upstream(request, reader, writer, upstream)
            head = await _read_head(up_reader)
            if head is not None:
                writer.write(head)
                await writer.drain()
                send = self._send_down(writer)
                _, _, headers = _split_head(head)
                remaining = rule.truncate_at
                if request.method == "HEAD":
                    remaining = 0
                elif b"content-length" in headers:
                    # Never wait for more than the server sends (a short error answer).
                    remaining = min(remaining, int(headers[b"content-length"]))
                while remaining and (piece := await up_reader.read(min(remaining, _PIECE))):
                    remaining -= len(piece)
                    await send(piece)
        # The rest of the answer is still on its way from the server: that connection is done.
        await upstream.close()
        sock = writer.get_extra_info("socket")
        await _sent(sock)
        if rule.delay:
            await asyncio.sleep(rule.delay)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _forward_body(
        self, request: _Request, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
        rewrite: str | None = None,
    ) -> None:
        flip = [rewrite == "corrupt-body" and not request.chunked]

        async def send_upstream(data: bytes) -> None:
            if flip[0] and data:
                # Damage on the way: the body's first byte inverted, its length unchanged.
                data, flip[0] = bytes([data[0] ^ 0xFF]) + data[1:], False
            await self._pace(len(data))
            try:
                up_writer.write(data)
                await up_writer.drain()
            except OSError as exc:
                raise _UpstreamError("server dropped the connection during the body") from exc
            self._count_body_bytes(len(data))

        if request.chunked:
            await _copy_chunked(reader, send_upstream)
        elif rewrite == "restore-etag" and request.content_length <= _MAX_REWRITTEN_BODY:
            # The ETags a CompleteMultipartUpload names, as the store gave them: the same
            # length, so Content-Length holds (a store that checks the payload's signed
            # SHA-256 would still refuse the body).
            body = await reader.readexactly(request.content_length)
            await send_upstream(_XML_ETAG.sub(lambda etag: _OPAQUE_MD5.sub(
                lambda opaque: opaque[0].translate(_CLEAR), etag[0]), body))
        else:
            await _copy_exact(reader, send_upstream, request.content_length)
        try:
            await up_writer.drain()  # the head alone, when there is no body
        except OSError as exc:
            raise _UpstreamError("server dropped the connection") from exc

    async def _relay_response(
        self, request: _Request, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        rewrite: str | None = None,
    ) -> bool:
        """Relay one final response; True when the connection must end after it."""
        while True:
            try:
                head = await _read_head(up_reader)
            except (ConnectionError, asyncio.LimitOverrunError) as exc:
                raise _UpstreamError("bad response head from the server") from exc
            if head is None:
                raise _UpstreamError("server closed the connection without a response")
            start, _, headers = _split_head(head)
            status = int(start.split(b" ", 2)[1])
            # The proxy already sent the client its own 100 if one was wanted.
            if 100 <= status < 200 and status != 101:
                continue
            break
        if rewrite in ("strip-checksum", "opaque-etag", "wrong-checksum"):
            head = _rewritten_head(head, rewrite)
        writer.write(head)
        await writer.drain()
        close_after = b"close" in headers.get(b"connection", b"").lower()
        send = self._send_down(writer)
        try:
            if request.method == "HEAD" or status in (204, 304):
                pass
            elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                await _copy_chunked(up_reader, send)
            elif b"content-length" in headers:
                if rewrite == "corrupt-response" and 200 <= status < 300:
                    send = _first_byte_flipped(send)
                await _copy_exact(up_reader, send, int(headers[b"content-length"]))
            else:
                # No framing: the body runs to the end of the connection.
                while piece := await up_reader.read(_PIECE):
                    await send(piece)
                close_after = True
        except asyncio.IncompleteReadError:
            # The head is already out, so a 502 is no longer possible: cut the client off.
            close_after = True
            writer.transport.abort()
        return close_after
