"""Store errors, translated once into the domain hierarchy of `errors.py`.

Both S3 request paths (botocore for control calls, `s3direct` for bodies) map what went
wrong here, so a SlowDown or an expired key means the same thing whichever path saw it.
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

from ..errors import (
    FatalStoreError,
    NoSuchUpload,
    NotFound,
    NotSupported,
    StoreError,
    TransientStoreError,
)

_FATAL_CODES = {
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the credentials have expired",
    "TokenRefreshRequired": "the credentials have expired",
    "InvalidToken": "the session token is invalid",
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access to the bucket is disabled",
    "AccountProblem": "the account has a problem",
    "NoSuchBucket": "the bucket does not exist",
    "AuthorizationHeaderMalformed": "the request's region or credentials are malformed",
    "PermanentRedirect": "the bucket is in another region or needs another endpoint",
    "RequestTimeTooSkewed": "this machine's clock is too far off the store's",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestTimeout", "InternalError", "ServiceUnavailable",
    "BadDigest",  # the body was damaged on the way: sending it again is the cure
    "IncompleteBody", "OperationAborted",
}
# getaddrinfo's answers that the name has no address: asking again will not change that,
# unlike EAI_AGAIN (the resolver could not be reached), which is worth retrying.
_NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def translate_error(
    exc: BaseException, *, op: str, key: str, location: str, endpoint: str = "",
    timeouts: tuple[float, float] = (0.0, 0.0),
) -> StoreError:
    """Map a botocore/aiohttp exception to the domain hierarchy (the caller keeps the cause).
    ``timeouts`` are the (connect, read) seconds the request was given, for the message."""
    from botocore import exceptions as bce

    where = f"{op} {location}/{key}" if key else f"{op} {location}"
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return classify_response(
            where, op=op, key=key, status=status, code=str(error.get("Code", "")),
            message=str(error.get("Message", "")),
        )
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return FatalStoreError(
            "no usable AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile (AWS_PROFILE/--profile), or run with an instance or web-identity role",
            op=op,
        )
    if isinstance(exc, bce.ProfileNotFound):
        return FatalStoreError(f"AWS profile not found: {exc}", op=op)
    bucket = location.removeprefix("s3://").partition("/")[0]
    return translate_transport_error(
        exc, where=where, op=op, key=key, endpoint=endpoint, timeouts=timeouts, bucket=bucket
    )


def translate_transport_error(
    exc: BaseException, *, where: str, op: str, key: str, endpoint: str,
    timeouts: tuple[float, float] = (0.0, 0.0), bucket: str = "", url: str = "",
) -> StoreError:
    """Connection-level failures (no HTTP answer): worth retrying, except a bucket's
    virtual-hosted name that does not resolve, which only another addressing style cures.

    ``endpoint`` is the configured endpoint URL; ``url`` the one the request went to, if the
    caller knows it (virtual-hosted, it starts with the bucket). Messages name the host the
    exception says was dialled, else ``url``'s, else ``endpoint``'s."""
    import aiohttp
    from botocore import exceptions as bce

    host = dialled_host(exc) or endpoint_host(url or endpoint)
    waited = _timed_out(exc, timeouts)
    if waited is not None:
        within = f" within {waited:g} s" if waited else ""
        return TransientStoreError(f"{where}: no answer from {host}{within}", op=op, key=key)
    if isinstance(exc, aiohttp.ClientConnectorError | bce.EndpointConnectionError):
        lookup = _name_lookup_failure(exc)
        if lookup is None:
            return TransientStoreError(f"{where}: cannot connect to {host}", op=op, key=key)
        name = _hostname(host)
        if isinstance(lookup, socket.gaierror) and lookup.errno not in _NO_SUCH_NAME:
            return TransientStoreError(
                f"{where}: cannot connect to {host}: looking up {name} failed ({lookup.strerror})",
                op=op, key=key,
            )
        # Only a name the client made up (bucket + endpoint host) is a settings mistake:
        # the endpoint's own name may yet appear in DNS (a store still starting), so retry it.
        base = urlsplit(endpoint).hostname or ""
        dialled = name.lower()
        if base and (dialled == f"{bucket}.{base}" if bucket else dialled.endswith(f".{base}")):
            return FatalStoreError(
                f"{where}: the host name {name} does not resolve: virtual-hosted addressing "
                f"puts the bucket in the host name, which needs DNS entries for *.{base}; "
                "use --addressing-style path",
                op=op, key=key,
            )
        return TransientStoreError(
            f"{where}: cannot connect to {host}: the name {name} does not resolve",
            op=op, key=key,
        )
    if isinstance(exc, bce.BotoCoreError | asyncio.TimeoutError | OSError | aiohttp.ClientError):
        detail = str(exc) or "no answer"
        return TransientStoreError(f"{where}: {type(exc).__name__}: {detail}", op=op, key=key)
    return StoreError(f"{where}: {type(exc).__name__}: {exc}", op=op, key=key)


def body_never_left(exc: BaseException) -> bool:
    """Whether a request failed before any of its body could be handed to the transport:
    no connection was made (refused, unresolvable, timed out connecting). Any other failure
    came after the request was under way, its body (or part of it) on the wire."""
    import aiohttp
    from botocore import exceptions as bce

    connect_timeout = getattr(aiohttp, "ConnectionTimeoutError", None)  # aiohttp >= 3.10
    if connect_timeout is not None and isinstance(exc, connect_timeout):
        return True
    return isinstance(exc, aiohttp.ClientConnectorError | bce.ConnectionError)


def _timed_out(exc: BaseException, timeouts: tuple[float, float]) -> float | None:
    """The timeout (connect or read, in seconds) ``exc`` ran into, or None if it is not
    a timeout. Checked before connection errors: botocore's ConnectTimeoutError is one."""
    import aiohttp
    from botocore import exceptions as bce

    connect, read = timeouts
    if isinstance(exc, bce.ConnectTimeoutError):
        return connect
    if isinstance(exc, bce.ReadTimeoutError):
        return read
    if isinstance(exc, aiohttp.ServerTimeoutError):
        # aiohttp says which by the message ("Connection timeout to host ..."), as
        # aiobotocore reads it too; ConnectionTimeoutError is only in aiohttp >= 3.10.
        return connect if str(exc).lower().startswith("connect") else read
    if isinstance(exc, asyncio.TimeoutError):  # s3direct's stalled-body deadline
        return read
    return None


def dialled_host(exc: BaseException) -> str:
    """'host:port' the failed request dialled, as the exception records it; "" if it does
    not. botocore keeps the URL (without credentials: it signs in headers), aiohttp the
    connection key (through a proxy, the proxy's: that is what was dialled)."""
    import aiohttp
    from botocore import exceptions as bce

    if isinstance(exc, aiohttp.ClientConnectorError):
        host = f"[{exc.host}]" if ":" in exc.host else exc.host
        return f"{host}:{exc.port}" if exc.port else host
    if isinstance(exc, bce.BotoCoreError):
        url = getattr(exc, "kwargs", {}).get("endpoint_url")
        if isinstance(url, str) and urlsplit(url).hostname:
            return endpoint_host(url)
    return ""


def _name_lookup_failure(exc: BaseException) -> OSError | None:
    """The resolver's error under a failed connection, if looking the host up is what
    failed: a socket.gaierror, or whatever aiohttp's resolver raised (aiodns's carries no
    code). Followed through botocore's wrapper and aiohttp's, and explicit causes."""
    import aiohttp
    from botocore import exceptions as bce

    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)  # aiohttp >= 3.11
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return current
        if isinstance(current, aiohttp.ClientConnectorError):
            os_error: OSError = current.os_error
            if dns_error is not None and isinstance(current, dns_error):
                return os_error
            current = os_error
        elif isinstance(current, bce.EndpointConnectionError):
            wrapped = getattr(current, "kwargs", {}).get("error")
            current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
        else:
            current = current.__cause__
    return None


def _hostname(host: str) -> str:
    """'host:port' (as `endpoint_host` writes it) -> the name that was looked up."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def endpoint_host(endpoint: str) -> str:
    """'host:port' of an endpoint URL for messages: never its user or password, if any."""
    parts = urlsplit(endpoint)
    if not parts.hostname:
        return "the endpoint"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = parts.port
    except ValueError:
        port = None
    port = port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return f"{host}:{port}" if port else host


def classify_response(
    where: str, *, op: str, key: str, status: int, code: str, message: str
) -> StoreError:
    """An error answer from the store (status and S3 error code) as a domain error."""
    message = message or code or f"HTTP {status}"
    if code == "NoSuchUpload":
        return NoSuchUpload(f"{where}: upload no longer exists", op=op, key=key, code=code)
    if code in _FATAL_CODES:
        return FatalStoreError(f"{where}: {_FATAL_CODES[code]} ({code})", op=op, key=key, code=code)
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return NotFound(f"{where}: not found", op=op, key=key, code=code or "404")
    if code in ("NotImplemented", "MethodNotAllowed") or status in (405, 501):
        return NotSupported(
            f"{where}: the store does not support this ({code or status})", op=op, key=key,
            code=code or str(status),
        )
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        # The status stands in for a missing code: a bare 503 is the server's, not the
        # network's (`errors.store_cause`).
        return TransientStoreError(
            f"{where}: {message} ({code or status})", op=op, key=key, code=code or str(status)
        )
    if status == 403:
        return FatalStoreError(
            f"{where}: access denied ({code or 403})", op=op, key=key, code=code or "403"
        )
    return StoreError(f"{where}: {message} ({code or status})", op=op, key=key, code=code)
