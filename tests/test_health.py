"""HealthServer on loopback, probed over real HTTP; parse_listen_address on good and bad input."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncsync.errors import ConfigError
from asyncsync.pipeline.events import FileOutcome, Status
from asyncsync.service.health import HealthServer, parse_listen_address, public_reason
from asyncsync.service.metrics import Metrics


def always_ready() -> tuple[bool, str]:
    return True, ""


async def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    """(status, content type header, body) of GET path."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}{path}") as resp:
            return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def test_healthz_answers_ok() -> None:
    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, Metrics(), always_ready) as server:
            assert server.port > 0
            status, _, body = await get(server, "/healthz")
            assert (status, body) == (200, "ok")

    asyncio.run(main())


def test_readyz_follows_the_readiness_callback() -> None:
    state = {"ready": False, "reason": "store unreachable: connection refused"}

    def ready() -> tuple[bool, str]:
        return bool(state["ready"]), str(state["reason"])

    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, Metrics(), ready) as server:
            status, _, body = await get(server, "/readyz")
            assert (status, body) == (503, "store unreachable: connection refused")
            # Liveness does not depend on readiness: an unready pod must not be restarted.
            assert (await get(server, "/healthz"))[0] == 200

            state["ready"] = True
            status, _, body = await get(server, "/readyz")
            assert (status, body) == (200, "ready")

            state.update(ready=False, reason="manifest locked")
            status, _, body = await get(server, "/readyz")
            assert (status, body) == (503, "manifest locked")

    asyncio.run(main())


SECRET_REASON = (
    "store unreachable: cannot reach http://10.1.2.3:8333 (bucket s3://secret-bucket/runs,"
    " key exp/weights/last.pt): connection refused"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# "" binds IPv4 and IPv6, each on a port of its own when asked for port 0: a free port is
# asked for by number, so that 127.0.0.1 reaches it.
@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_readyz_off_loopback_names_no_endpoint_bucket_or_key(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bound to every interface, anyone who reaches the port may ask: the answer says what
    is wrong in general words, the detail goes to the log (once, not per probe)."""
    state = {"reason": SECRET_REASON}

    def ready() -> tuple[bool, str]:
        return False, state["reason"]

    async def main() -> None:
        async with HealthServer(host, free_port(), Metrics(), ready) as server:
            # Asked from loopback too: what the server is bound to decides, not who asks.
            for _ in range(3):
                status, _, body = await get(server, "/readyz")
                assert (status, body) == (503, "not ready: store unreachable")
            state["reason"] = "manifest not open"
            assert (await get(server, "/readyz"))[2] == "not ready: manifest not open"
            state["reason"] = "/var/lib/asyncsync/manifest.db: locked"
            assert (await get(server, "/readyz"))[2] == "not ready"

    with caplog.at_level(logging.INFO, logger="asyncsync.service.health"):
        asyncio.run(main())
    assert caplog.text.count(SECRET_REASON) == 1
    assert "not loopback: /readyz gives no details" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_readyz_on_loopback_gives_the_reason(host: str) -> None:
    async def main() -> None:
        # By number again: "localhost" may resolve to ::1 as well, each on its own port 0.
        server = HealthServer(host, free_port(), Metrics(), lambda: (False, SECRET_REASON))
        async with server:
            assert await get(server, "/readyz") == (
                503, "text/plain; charset=utf-8", SECRET_REASON)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("reason", "public"),
    [
        ("store unreachable", "not ready: store unreachable"),
        ("store unreachable: s3://b/k", "not ready: store unreachable"),
        ("manifest not open", "not ready: manifest not open"),
        ("store unreachableness at http://h", "not ready"),
        ("secret-bucket: store unreachable", "not ready"),
        ("", "not ready"),
    ],
)
def test_public_reason_keeps_only_known_words(reason: str, public: str) -> None:
    assert public_reason(reason) == public


def test_readyz_is_503_when_the_callback_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("s3://secret-bucket/key")

    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, Metrics(), broken) as server:
            status, _, body = await get(server, "/readyz")
            assert status == 503
            assert body == "readiness check failed: RuntimeError"

    with caplog.at_level(logging.WARNING, logger="asyncsync.service.health"):
        asyncio.run(main())
    assert "readiness check raised" in caplog.text


def test_metrics_serves_the_exposition() -> None:
    metrics = Metrics()
    metrics.outcome(FileOutcome("detect/train/a", "a", Status.UPLOADED, "new", 123))

    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, metrics, always_ready) as server:
            status, content_type, body = await get(server, "/metrics")
            assert status == 200
            assert content_type == metrics.content_type
            values = {
                s.name: s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }
            assert values["asyncsync_bytes_sent_total"] == 0
            assert 'asyncsync_bytes_uploaded_total{outcome="new"} 123.0' in body
            # Served live, not a snapshot taken at start.
            metrics.outcome(FileOutcome("b", "b", Status.UPLOADED, "new", 7))
            _, _, body = await get(server, "/metrics")
            assert 'asyncsync_bytes_uploaded_total{outcome="new"} 130.0' in body

    asyncio.run(main())


def test_unknown_paths_are_404() -> None:
    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, Metrics(), always_ready) as server:
            for path in ("/", "/health", "/metrics/extra", "/readyz/", "/favicon.ico"):
                status, _, _ = await get(server, path)
                assert status == 404, path

    asyncio.run(main())


def test_probes_write_no_access_log(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, Metrics(), always_ready) as server:
            for path in ("/healthz", "/readyz", "/metrics", "/nope"):
                await get(server, path)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.name.startswith("aiohttp.access")]


def test_port_in_use_is_a_config_error() -> None:
    async def main() -> None:
        async with HealthServer("127.0.0.1", 0, Metrics(), always_ready) as first:
            second = HealthServer("127.0.0.1", first.port, Metrics(), always_ready)
            with pytest.raises(ConfigError) as info:
                await second.start()
            message = str(info.value)
            assert f"127.0.0.1:{first.port}" in message
            assert "in use" in message.lower()
            # The failed server holds nothing: stopping it is harmless, the first still serves.
            await second.stop()
            assert (await get(first, "/healthz"))[0] == 200

    asyncio.run(main())


def test_start_stop_lifecycle() -> None:
    async def main() -> None:
        server = HealthServer("127.0.0.1", 0, Metrics(), always_ready)
        with pytest.raises(RuntimeError):
            _ = server.port
        await server.start()
        port = server.port
        with pytest.raises(RuntimeError):
            await server.start()
        await server.stop()
        await server.stop()
        with pytest.raises(RuntimeError):
            _ = server.port
        # The socket is closed once stop returns.
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        (":9100", ("", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:9100", ("::", 9100)),
        ("localhost:9100", ("localhost", 9100)),
        ("metrics.node-1.example:8080", ("metrics.node-1.example", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":65535", ("", 65535)),
    ],
)
def test_parse_listen_address_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "9100",
        "127.0.0.1",
        "127.0.0.1:",
        ":",
        "127.0.0.1:65536",
        "127.0.0.1:99999999",
        "127.0.0.1:-1",
        "127.0.0.1:+80",
        "127.0.0.1:http",
        "127.0.0.1: 9100",
        " 127.0.0.1:9100",
        "127.0.0.1:9100 ",
        "127.0.0.1:\u0669\u0661\u0660\u0660",  # Arabic-Indic digits: int() would take them
        "999.1.1.1:9100",
        "1.2.3:9100",
        "::1:9100",
        "[::1]",
        "[127.0.0.1]:9100",
        "[not-v6]:9100",
        "[::1:9100",
        "bad_host:9100",
        "-leading.example:9100",
        "http://127.0.0.1:9100",
        "127.0.0.1:9100/metrics",
    ],
)
def test_parse_listen_address_refuses(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen_address(text)
    message = str(info.value)
    assert repr(text) in message
    assert "\n" not in message
