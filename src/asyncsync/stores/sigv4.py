"""AWS Signature Version 4 for the two requests that carry file bodies.

PutObject and UploadPart are most of what a push sends, and botocore's generic request
pipeline (parameter validation, endpoint rules, event hooks) costs about a millisecond of CPU
for each, which caps small-file throughput far below what the store can take. These two
requests are simple enough to sign directly: the body goes out as UNSIGNED-PAYLOAD (its
integrity is guarded by a signed Content-MD5 or x-amz-checksum-crc32 header, which the server
verifies), and the
derived signing key is cached for the day. Credentials still come from botocore's chain;
nothing here stores or prints them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
ALGORITHM = "AWS4-HMAC-SHA256"


def quote_path(key_path: str) -> str:
    """Percent-encode a URL path the way S3 signs it: once, keeping '/' and unreserved."""
    return quote(key_path, safe="/~")


def quote_query_value(value: str) -> str:
    return quote(value, safe="-_.~")


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(
        f"{quote_query_value(k)}={quote_query_value(v)}" for k, v in sorted(params.items())
    )


class SigV4Signer:
    """Signs S3 requests for one region with credentials supplied per request."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key_cache: tuple[str, str, bytes] | None = None  # (secret id, date, key)

    def _signing_key(self, secret_key: str, date: str) -> bytes:
        # The cache is keyed by a hash, so the secret itself is not kept around longer than
        # botocore's credential object keeps it.
        marker = hashlib.sha256(secret_key.encode()).hexdigest()
        cached = self._key_cache
        if cached is not None and cached[0] == marker and cached[1] == date:
            return cached[2]
        key = _hmac(("AWS4" + secret_key).encode(), date)
        for part in (self.region, self.service, "aws4_request"):
            key = _hmac(key, part)
        self._key_cache = (marker, date, key)
        return key

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        query: str,
        headers: dict[str, str],
        *,
        access_key: str,
        secret_key: str,
        token: str | None,
        now: float | None = None,
    ) -> dict[str, str]:
        """Add x-amz-date, x-amz-content-sha256, the token and Authorization to ``headers``.

        ``path`` is already percent-encoded (`quote_path`), ``query`` already canonical
        (`canonical_query`). Header names must be lowercase.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        date = stamp[:8]
        headers["host"] = host
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = UNSIGNED_PAYLOAD
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        canonical_headers = "".join(f"{n}:{' '.join(headers[n].split())}\n" for n in names)
        signed_headers = ";".join(names)
        canonical_request = "\n".join(
            (method, path, query, canonical_headers, signed_headers, UNSIGNED_PAYLOAD)
        )
        scope = f"{date}/{self.region}/{self.service}/aws4_request"
        string_to_sign = "\n".join(
            (ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest())
        )
        signature = hmac.new(
            self._signing_key(secret_key, date), string_to_sign.encode(), hashlib.sha256
        ).hexdigest()
        headers["authorization"] = (
            f"{ALGORITHM} Credential={access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}"
        )
        return headers


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()
