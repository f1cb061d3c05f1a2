"""Did the store keep what was sent? The client's half of integrity.

A store that checks the Content-MD5 (or CRC32) it is sent refuses a damaged body itself. Not
every store does: moto and s3rver store whatever arrives. Their answer still holds the
evidence: for a PutObject or an UploadPart stored without SSE-KMS or SSE-C, the ETag is the
MD5 of the bytes the store kept, and a store that checked a CRC32 echoes it. Both request
paths (`s3` and `s3direct`) compare that answer with what was sent, through `checked_etag`,
so a damaged body is a `BadDigest` (retried, never recorded) on every store.

A store whose ETags are not MD5s (encryption with KMS or a customer key, some gateways) and
that echoes no checksum leaves nothing to compare: that is said once per store, and the
object's size is checked with a HEAD after the upload (`--verify-after-upload` reads every
object back in full for those who want proof).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import BadDigest
from .capabilities import Capabilities, Capability

log = logging.getLogger("asyncsync")

_MD5_HEX = re.compile(r"[0-9a-f]{32}")
# Server-side encryption whose ETag is not the MD5 of the body (SSE-S3's still is).
_OPAQUE_SSE = ("aws:kms", "aws:kms:dsse")


@dataclass(frozen=True, slots=True)
class Answer:
    """What a store said of one PutObject or UploadPart it accepted."""

    etag: str
    crc32: str | None  # the CRC32 it echoed (base64), if any
    encrypted: bool  # stored with SSE-KMS or SSE-C: the ETag is no MD5 of the body

    @classmethod
    def of_response(cls, response: Mapping[str, object]) -> Answer:
        """From botocore's parsed answer."""
        crc32 = response.get("ChecksumCRC32")
        return cls(
            str(response["ETag"]), str(crc32) if crc32 else None,
            opaque_encryption(str(response.get("ServerSideEncryption") or ""),
                              str(response.get("SSECustomerAlgorithm") or "")),
        )


def md5_b64_of(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")  # noqa: S324


def md5_hex_of(md5_b64: str) -> str:
    """The hex form of a base64 Content-MD5, as an MD5 ETag spells it."""
    return base64.b64decode(md5_b64).hex()


def etag_md5(etag: str) -> str | None:
    """The MD5 an ETag spells (lowercase hex, quotes and weak prefix dropped), or None when
    it is no MD5 (a multipart ETag ``"...-N"``, or a store's own kind)."""
    value = etag.strip()
    if value.startswith("W/"):
        value = value[2:]
    value = value.strip('"').lower()
    return value if _MD5_HEX.fullmatch(value) else None


def copy_proven_by_etag(source_etag: str, copy_etag: str, *, where: str, key: str) -> bool:
    """Whether the ETag a server-side copy answered proves it holds the source's bytes: both
    are MD5s and equal. False when either is no MD5 (a multipart source, an encrypted
    store: a HEAD has to confirm the copy instead); `BadDigest` when both are MD5s and
    differ (the store copied other bytes)."""
    source, copy = etag_md5(source_etag), etag_md5(copy_etag)
    if source is None or copy is None:
        return False
    if source != copy:
        raise BadDigest(
            f"{where}: the copy's ETag {copy} is not the source's MD5 {source}",
            op="CopyObject", key=key, code="BadDigest",
        )
    return True


def opaque_encryption(sse: str | None, customer_algorithm: str | None) -> bool:
    """Whether an answer's encryption makes its ETag something other than the body's MD5."""
    return bool(customer_algorithm) or (sse or "").lower() in _OPAQUE_SSE


def multipart_etag_of(part_etags: Iterable[str]) -> str | None:
    """The ETag S3 gives an object completed from these parts (MD5 of the parts' binary
    MD5s, ``-N``), or None if a part's ETag is no MD5."""
    digests = []
    for etag in part_etags:
        md5 = etag_md5(etag)
        if md5 is None:
            return None
        digests.append(binascii.unhexlify(md5))
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"  # noqa: S324


def headers_encryption(headers: Mapping[str, str]) -> bool:
    """`opaque_encryption` of an HTTP answer's headers."""
    return opaque_encryption(
        headers.get("x-amz-server-side-encryption"),
        headers.get("x-amz-server-side-encryption-customer-algorithm"),
    )


class Verdicts:
    """Per store: turns each upload answer into proven, unproven, or `BadDigest`, and says
    once that a store leaves uploads unproven."""

    def __init__(self, location: str, capabilities: Capabilities) -> None:
        self._location = location
        self.capabilities = capabilities
        self._warned = False

    def check(
        self, where: str, op: str, key: str, etag: str, md5_b64: str | None, *,
        encrypted: bool,
    ) -> bool:
        """Compare the ETag the store answered with the MD5 of what was sent (``md5_b64``).
        True: the ETag proves the body. False: it proves nothing (no MD5 to compare: the
        ETag is not one, or no MD5 was computed). Raises `BadDigest` on a mismatch."""
        if md5_b64 is None:
            return False
        stored = None if encrypted else etag_md5(etag)
        if stored is None:
            if not encrypted:
                self.capabilities.learn(Capability.ETAG_IS_MD5, False)
            return False
        sent = md5_hex_of(md5_b64)
        if stored != sent:
            raise BadDigest(
                f"{where}: the store kept other bytes than were sent (its ETag {stored} is"
                f" not the MD5 of the body, {sent}): damaged on the way",
                op=op, key=key, code="BadDigest",
            )
        self.capabilities.learn(Capability.ETAG_IS_MD5, True)
        return True

    def unproven(self, what: str) -> None:
        """An upload nothing in the answer proves: say so, once per store."""
        if self._warned:
            return
        self._warned = True
        log.warning(
            "%s neither echoes checksums nor answers with MD5 ETags (%s): uploads there are"
            " checked by size only; use --verify-after-upload to read each one back",
            self._location, what,
        )
