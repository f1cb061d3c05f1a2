"""Unit tests for asyncsync.stores.s3errors: connection failures are named by the host that
was dialled, and a virtual-hosted bucket name that does not resolve is a configuration error.

The exceptions are the clients' own, from real attempts: names under ``.invalid`` never
resolve (RFC 2606), and a bound socket that does not listen refuses connections."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncsync.errors import FatalStoreError, StoreError, TransientStoreError
from asyncsync.stores.s3errors import (
    dialled_host,
    endpoint_host,
    translate_error,
    translate_transport_error,
)

from .conftest import run_cli

ENDPOINT = "http://nonexistent.invalid:9"
VIRTUAL_HOST = "bucket-a.nonexistent.invalid"
FATAL_DNS = (
    f"the host name {VIRTUAL_HOST} does not resolve: virtual-hosted addressing puts the "
    "bucket in the host name, which needs DNS entries for *.nonexistent.invalid; "
    "use --addressing-style path"
)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port bound by nobody's listener: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def aiohttp_failure(url: str) -> BaseException:
    """What aiohttp raises when it tries ``url`` (s3direct's path)."""
    import aiohttp

    async def attempt() -> BaseException:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.head(url, timeout=aiohttp.ClientTimeout(total=10)):
                    pass
            except aiohttp.ClientError as exc:
                return exc
        raise AssertionError(f"{url} answered")

    return asyncio.run(attempt())


def botocore_failure(endpoint: str, bucket: str, style: str) -> BaseException:
    """What aiobotocore raises for a HeadBucket at ``endpoint`` (the control path)."""
    from aiobotocore.session import get_session
    from botocore.config import Config

    async def attempt() -> BaseException:
        config = Config(s3={"addressing_style": style}, retries={"total_max_attempts": 1},
                        connect_timeout=5, read_timeout=5)
        async with get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", config=config,
            aws_access_key_id="x", aws_secret_access_key="y",
        ) as client:
            try:
                await client.head_bucket(Bucket=bucket)
            except Exception as exc:
                return exc
        raise AssertionError(f"{endpoint} answered")

    return asyncio.run(attempt())


def translated(exc: BaseException, endpoint: str = ENDPOINT) -> StoreError:
    return translate_error(exc, op="HeadBucket", key="", location="s3://bucket-a",
                           endpoint=endpoint)


# -- the virtual-hosted name does not resolve: exit 2, whichever path saw it ------------------


def test_an_unresolvable_virtual_hosted_name_from_aiohttp_is_a_configuration_error() -> None:
    exc = aiohttp_failure(f"http://{VIRTUAL_HOST}:9/")
    assert dialled_host(exc) == f"{VIRTUAL_HOST}:9"
    error = translated(exc)
    assert isinstance(error, FatalStoreError)
    assert str(error) == f"HeadBucket s3://bucket-a: {FATAL_DNS}"
    # s3direct's call gives no bucket (yet): the endpoint's host with a name in front will do.
    direct = translate_transport_error(exc, where="HeadBucket s3://bucket-a", op="HeadBucket",
                                       key="", endpoint=ENDPOINT)
    assert isinstance(direct, FatalStoreError) and str(direct) == str(error)


def test_an_unresolvable_virtual_hosted_name_from_botocore_is_a_configuration_error() -> None:
    from botocore.exceptions import EndpointConnectionError

    exc = botocore_failure(ENDPOINT, "bucket-a", "virtual")
    assert isinstance(exc, EndpointConnectionError)
    assert dialled_host(exc) == f"{VIRTUAL_HOST}:9"
    error = translated(exc)
    assert isinstance(error, FatalStoreError)
    assert str(error) == f"HeadBucket s3://bucket-a: {FATAL_DNS}"


def test_an_unresolvable_endpoint_stays_transient_and_says_the_name_does_not_resolve() -> None:
    # Path style dials the endpoint itself: a name not (yet) in DNS is worth retrying.
    for exc in (aiohttp_failure(f"{ENDPOINT}/bucket-a"),
                botocore_failure(ENDPOINT, "bucket-a", "path")):
        error = translated(exc)
        assert type(error) is TransientStoreError, exc
        assert str(error) == (
            "HeadBucket s3://bucket-a: cannot connect to nonexistent.invalid:9: "
            "the name nonexistent.invalid does not resolve"
        )


def test_a_name_that_is_not_this_bucket_before_the_endpoint_stays_transient() -> None:
    exc = aiohttp_failure("http://other.nonexistent.invalid:9/")
    error = translated(exc)
    assert type(error) is TransientStoreError
    assert "cannot connect to other.nonexistent.invalid:9: the name" in str(error)
    unrelated = translated(exc, endpoint="http://elsewhere.invalid:9")
    assert type(unrelated) is TransientStoreError


def test_a_resolver_that_cannot_be_reached_is_retried_even_for_a_virtual_host() -> None:
    import aiohttp

    # EAI_AGAIN cannot be provoked without breaking this machine's resolver: built by hand,
    # as aiohttp's connector builds it from getaddrinfo's error.
    key = aiohttp_failure(f"http://{VIRTUAL_HOST}:9/")
    assert isinstance(key, aiohttp.ClientConnectorError)
    lookup = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    exc = type(key)(key._conn_key, lookup)
    error = translated(exc)
    assert type(error) is TransientStoreError
    assert str(error) == (
        f"HeadBucket s3://bucket-a: cannot connect to {VIRTUAL_HOST}:9: looking up "
        f"{VIRTUAL_HOST} failed (Temporary failure in name resolution)"
    )


# -- messages name the host that was dialled ---------------------------------------------------


def test_a_refused_connection_names_the_host_aiohttp_dialled(refusing_port: int) -> None:
    exc = aiohttp_failure(f"http://127.0.0.1:{refusing_port}/")
    # The configured endpoint is not what was dialled (as when the bucket is in the name).
    error = translated(exc, endpoint="http://localhost:9700")
    assert type(error) is TransientStoreError
    assert str(error) == f"HeadBucket s3://bucket-a: cannot connect to 127.0.0.1:{refusing_port}"


def test_a_refused_connection_names_the_host_botocore_dialled(refusing_port: int) -> None:
    exc = botocore_failure(f"http://127.0.0.1:{refusing_port}", "bucket-a", "path")
    # s3.py's configure step passes no endpoint at all: the exception's URL still names it.
    error = translated(exc, endpoint="")
    assert type(error) is TransientStoreError
    assert str(error) == f"HeadBucket s3://bucket-a: cannot connect to 127.0.0.1:{refusing_port}"


def test_an_ipv6_host_is_bracketed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.socket(socket.AF_INET6) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
        port = sock.getsockname()[1]
        exc = aiohttp_failure(f"http://[::1]:{port}/")
    assert dialled_host(exc) == f"[::1]:{port}"
    assert str(translated(exc, endpoint="http://localhost:9700")).endswith(
        f"cannot connect to [::1]:{port}"
    )


def test_timeouts_name_the_dialled_host_too() -> None:
    import aiohttp
    from botocore import exceptions as bce

    url = f"http://{VIRTUAL_HOST}:9000/k"
    error = translate_error(bce.ConnectTimeoutError(endpoint_url=url), op="PutObject",
                            key="k", location="s3://bucket-a", endpoint="http://nonexistent.invalid:9000",
                            timeouts=(3.0, 45.5))
    assert str(error) == f"PutObject s3://bucket-a/k: no answer from {VIRTUAL_HOST}:9000 within 3 s"
    # aiohttp's timeouts carry no host: the URL the caller sent to names it, if given.
    stall = aiohttp.ServerTimeoutError("Timeout on reading data from socket")
    where = "PutObject s3://bucket-a/k"
    named = translate_transport_error(stall, where=where, op="PutObject", key="k",
                                      endpoint=ENDPOINT, timeouts=(3.0, 45.5),
                                      url=f"http://{VIRTUAL_HOST}:9/")
    assert str(named) == f"{where}: no answer from {VIRTUAL_HOST}:9 within 45.5 s"
    unnamed = translate_transport_error(stall, where=where, op="PutObject", key="k",
                                        endpoint=ENDPOINT, timeouts=(3.0, 45.5))
    assert str(unnamed) == f"{where}: no answer from nonexistent.invalid:9 within 45.5 s"


def test_messages_never_carry_a_user_or_password() -> None:
    from botocore import exceptions as bce

    exc = bce.EndpointConnectionError(endpoint_url="http://user:secret@bucket-a.h.invalid:9/k")
    error = translated(exc, endpoint="http://user:secret@h.invalid:9")
    assert str(error) == "HeadBucket s3://bucket-a: cannot connect to bucket-a.h.invalid:9"
    assert endpoint_host("https://user:pw@s3.example.com/base") == "s3.example.com:443"


# -- through the real CLI ----------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "ASYNCSYNC_")) and not k.lower().endswith("_proxy")}
    env.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1",
               **extra)
    return env


@pytest.mark.parametrize("path", [[], ["--no-direct-uploads"]], ids=["direct", "botocore"])
def test_push_with_an_unresolvable_virtual_host_exits_2_at_once(
    tmp_path: Path, path: list[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    result = run_cli("push", src, "s3://bucket-a/x", "--state-dir", tmp_path / "state",
                     "--endpoint-url", ENDPOINT, "--addressing-style", "virtual", *path,
                     env=cli_env(), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"asyncsync: error: HeadBucket s3://bucket-a: {FATAL_DNS}"], result.stderr


def test_push_with_an_unresolvable_endpoint_is_retried_and_exits_1(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    result = run_cli("push", src, "s3://bucket-a/x", "--state-dir", tmp_path / "state",
                     "--addressing-style", "path", "--retries", "2",
                     env=cli_env(AWS_ENDPOINT_URL=ENDPOINT), timeout=60)
    assert result.returncode == 1, result.stderr
    assert (
        "cannot connect to nonexistent.invalid:9: the name nonexistent.invalid does not "
        "resolve (gave up after 2 attempts)"
    ) in result.stderr
