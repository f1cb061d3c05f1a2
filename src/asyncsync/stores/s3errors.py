"""Store errors, translated once into the domain hierarchy of `errors.py`.

Both S3 request paths (botocore for control calls, `s3direct` for bodies) map what went
wrong here, so a SlowDown or an expired key means the same thing whichever path saw it.
"""

from __future__ import annotations

import asyncio
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
    return translate_transport_error(
        exc, where=where, op=op, key=key, endpoint=endpoint, timeouts=timeouts
    )


def translate_transport_error(
    exc: BaseException, *, where: str, op: str, key: str, endpoint: str,
    timeouts: tuple[float, float] = (0.0, 0.0),
) -> StoreError:
    """Connection-level failures (no HTTP answer): all worth retrying."""
    import aiohttp
    from botocore import exceptions as bce

    waited = _timed_out(exc, timeouts)
    if waited is not None:
        within = f" within {waited:g} s" if waited else ""
        return TransientStoreError(
            f"{where}: no answer from {endpoint_host(endpoint)}{within}", op=op, key=key
        )
    if isinstance(exc, aiohttp.ClientConnectorError | bce.EndpointConnectionError):
        return TransientStoreError(
            f"{where}: cannot connect to {endpoint_host(endpoint)}", op=op, key=key
        )
    if isinstance(exc, bce.BotoCoreError | asyncio.TimeoutError | OSError | aiohttp.ClientError):
        detail = str(exc) or "no answer"
        return TransientStoreError(f"{where}: {type(exc).__name__}: {detail}", op=op, key=key)
    return StoreError(f"{where}: {type(exc).__name__}: {exc}", op=op, key=key)


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
        return TransientStoreError(
            f"{where}: {message} ({code or status})", op=op, key=key, code=code
        )
    if status == 403:
        return FatalStoreError(
            f"{where}: access denied ({code or 403})", op=op, key=key, code=code or "403"
        )
    return StoreError(f"{where}: {message} ({code or status})", op=op, key=key, code=code)
