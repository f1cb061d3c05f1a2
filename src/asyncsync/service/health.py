"""The daemon's HTTP face for Kubernetes and Prometheus: /healthz, /readyz and /metrics.

`HealthServer` is a small aiohttp server started and stopped inside the daemon's own event loop
(no thread), so /healthz answering at all is the proof that the loop is alive; /readyz asks a
readiness callback (store reachable, manifest open, ...) and answers 503 with its reason, which
makes Kubernetes stop routing to the pod without restarting it; /metrics serves the process's
`Metrics`. The reason names the endpoint, bucket or path at fault, so it is only said on a
server bound to loopback alone; bound to any other address, /readyz says "not ready" and at most
which part is at fault, and the detail goes to the log. `parse_listen_address` turns the CLI's
``--metrics-addr HOST:PORT`` into the pair the server binds. Problems an operator must fix (a
malformed address, a port already taken) are raised as `ConfigError`, one line naming the
address and the cause.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from types import TracebackType

from aiohttp import web

from ..errors import ConfigError
from .metrics import Metrics

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], tuple[bool, str]]
"""Returns (True, anything) when the daemon can do its work, else (False, the reason why)."""

# A DNS name (RFC 1123 labels); digits-and-dots strings are checked as IPv4 addresses instead,
# so that 999.1.1.1 is refused here rather than sent to the resolver.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_EXAMPLES = "expected HOST:PORT, e.g. 127.0.0.1:9100, 0.0.0.0:9100, :9100 or [::1]:9100"

# What /readyz may say about an unready daemon on a non-loopback address: these leading words
# of a reason (the daemon snapshot's readiness(): "store unreachable: <what failed, naming the
# endpoint>", "manifest not open") name no endpoint, bucket, key or path. Any other reason is
# just "not ready".
PUBLIC_REASONS = ("store unreachable", "manifest not open")

# In-flight probes and scrapes take milliseconds; a scraper that keeps a slow request open
# must not hold up the daemon's shutdown for aiohttp's default minute.
_SHUTDOWN_TIMEOUT = 2.0


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port). An empty host (``:9100``) means every interface.

    IPv6 addresses go in brackets (``[::1]:9100``) and come back without them. Port 0 asks the
    system for a free port.
    """
    bad = f"listen address {text!r}"
    host, sep, port_text = text.rpartition(":")
    if not sep or (text.startswith("[") and "]:" not in text):
        raise ConfigError(f"{bad}: no port; {_EXAMPLES}")
    if not _PORT.fullmatch(port_text):
        raise ConfigError(f"{bad}: port {port_text!r} is not a number; {_EXAMPLES}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{bad}: port {port} is outside 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{bad}: {host!r} in brackets is not an IPv6 address") from None
        return host, port
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{bad}: {_EXAMPLES}") from None
        raise ConfigError(f"{bad}: put an IPv6 address in brackets, e.g. [::1]:9100")
    if host == "":
        return host, port
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{bad}: {host!r} is not an IPv4 address") from None
        return host, port
    if not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"{bad}: {host!r} is not a host name or IP address; {_EXAMPLES}")
    return host, port


def format_listen_address(host: str, port: int) -> str:
    """The inverse of `parse_listen_address`, for messages."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def public_reason(reason: str) -> str:
    """What /readyz says on a non-loopback address for an unready daemon with this reason:
    "not ready", followed by a `PUBLIC_REASONS` entry when the reason starts with one."""
    for public in PUBLIC_REASONS:
        if reason == public or reason.startswith(public + ":"):
            return f"not ready: {public}"
    return "not ready"


def _is_loopback(host: object) -> bool:
    """Whether a bound socket's address (as getsockname gives it) is a loopback address."""
    try:
        address = ipaddress.ip_address(str(host))
    except ValueError:
        return False  # not an IP address (a UNIX socket path, say): not known to be local
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def start_listening(app: web.Application, host: str, port: int,
                          address: str) -> web.AppRunner:
    """``app`` served on ``host:port`` (``address`` as the user wrote it, for the error),
    without an access log or signal handling of its own; a port that cannot be had is a
    ConfigError. The caller cleans the runner up."""
    # access_log=None: an access line per probe, every few seconds forever, would bury the
    # daemon's own log lines in Kubernetes' log store.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    # An empty host would reach asyncio as "all interfaces" too, but None says so plainly
    # and binds IPv4 and IPv6 alike.
    site = web.TCPSite(runner, host or None, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        cause = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"cannot listen on {address}: {cause}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class HealthServer:
    """/healthz, /readyz and /metrics on ``host:port``, inside the running event loop.

    Use as ``async with HealthServer(...) as server:`` or call `start` and `stop`.
    """

    def __init__(self, host: str, port: int, metrics: Metrics, ready: ReadinessCheck) -> None:
        self._host = host
        self._requested_port = port
        self._metrics = metrics
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        # Whether /readyz may give the readiness reason itself: only while every socket is
        # bound to loopback, where only this machine can ask.
        self._detailed = False
        self._withheld = ""  # the last reason answered without its detail, logged once

    @property
    def address(self) -> str:
        """The address as asked for, e.g. ``127.0.0.1:9100``, ``:0`` or ``[::1]:9100``."""
        return format_listen_address(self._host, self._requested_port)

    @property
    def port(self) -> int:
        """The port actually bound: the one asked for, or the one the system chose for 0."""
        if self._port is None:
            raise RuntimeError("HealthServer is not started")
        return self._port

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("HealthServer is already started")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_page)
        runner = await start_listening(app, self._host, self._requested_port, self.address)
        self._runner = runner
        # With host "" and port 0 each interface family gets its own free port; the first
        # one is as good as any for a caller that asked for "some port".
        self._port = int(runner.addresses[0][1])
        # Judged by the sockets actually bound, so that "localhost" counts as loopback and
        # "" (every interface) does not. The client's address is not used instead: behind a
        # proxy in the pod (a service mesh sidecar) remote requests arrive from 127.0.0.1.
        self._detailed = all(_is_loopback(address[0]) for address in runner.addresses)
        log.info(
            "serving /healthz, /readyz and /metrics on %s%s", self._bound_address(),
            "" if self._detailed else " (not loopback: /readyz gives no details; they are logged)",
        )

    async def stop(self) -> None:
        """Close the listening socket and any open connections. Safe to call twice."""
        runner, self._runner = self._runner, None
        self._port = None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _bound_address(self) -> str:
        return format_listen_address(self._host, self.port)

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all is the check: a wedged event loop never gets here, and the
        # liveness probe times out and restarts the pod.
        return web.Response(text="ok")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, reason = self._ready()
        except Exception as exc:
            # A broken check must read as "not ready" rather than a 500. The traceback goes to
            # the log, where an operator looks; only the exception's type goes out on the wire,
            # since its text may carry paths or endpoints.
            log.warning("readiness check raised", exc_info=True)
            return web.Response(status=503, text=f"readiness check failed: {type(exc).__name__}")
        if ready:
            self._withheld = ""
            return web.Response(text="ready")
        if self._detailed:
            return web.Response(status=503, text=reason or "not ready")
        if reason and reason != self._withheld:
            # Probes come every few seconds: log a reason when it changes, not per probe.
            log.info("/readyz: not ready: %s", reason)
        self._withheld = reason
        return web.Response(status=503, text=public_reason(reason))

    async def _metrics_page(self, request: web.Request) -> web.Response:
        # The content type carries a charset, which aiohttp's content_type= refuses; set the
        # header whole instead.
        return web.Response(
            body=self._metrics.exposition(),
            headers={"Content-Type": self._metrics.content_type},
        )
