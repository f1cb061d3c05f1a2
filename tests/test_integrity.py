"""The client's half of integrity (`stores.integrity`) and what a store is learned to do
(`stores.capabilities`): pure functions and their bookkeeping, no server."""

from __future__ import annotations

import base64
import hashlib
import logging

import pytest

from asyncsync.errors import BadDigest, TransientStoreError
from asyncsync.stores.capabilities import Capabilities, Capability
from asyncsync.stores.integrity import (
    Answer,
    Verdicts,
    etag_md5,
    md5_b64_of,
    md5_hex_of,
    multipart_etag_of,
    opaque_encryption,
)

BODY = b"a training run's results.csv\n" * 10
MD5_HEX = hashlib.md5(BODY).hexdigest()  # noqa: S324
MD5_B64 = base64.b64encode(hashlib.md5(BODY).digest()).decode()  # noqa: S324


def test_md5_forms_agree() -> None:
    assert md5_b64_of(BODY) == MD5_B64
    assert md5_hex_of(MD5_B64) == MD5_HEX


@pytest.mark.parametrize(("etag", "md5"), [
    (f'"{MD5_HEX}"', MD5_HEX),
    (MD5_HEX, MD5_HEX),
    (f'"{MD5_HEX.upper()}"', MD5_HEX),
    (f'W/"{MD5_HEX}"', MD5_HEX),
    (f'"{MD5_HEX}-3"', None),  # multipart
    ('"abc"', None),
    ('""', None),
    (f'"{MD5_HEX}0"', None),
])
def test_etag_md5(etag: str, md5: str | None) -> None:
    assert etag_md5(etag) == md5


def test_multipart_etag_is_the_md5_of_the_part_md5s() -> None:
    parts = [b"x" * 10, b"y" * 7]
    etags = [f'"{hashlib.md5(p).hexdigest()}"' for p in parts]  # noqa: S324
    joined = b"".join(hashlib.md5(p).digest() for p in parts)  # noqa: S324
    assert multipart_etag_of(etags) == f"{hashlib.md5(joined).hexdigest()}-2"  # noqa: S324
    assert multipart_etag_of([*etags, '"opaque"']) is None


@pytest.mark.parametrize(("sse", "customer", "opaque"), [
    (None, None, False), ("AES256", None, False), ("aws:kms", None, True),
    ("aws:kms:dsse", None, True), (None, "AES256", True),
])
def test_encryption_that_hides_the_md5(sse: str | None, customer: str | None,
                                       opaque: bool) -> None:
    assert opaque_encryption(sse, customer) is opaque


def test_answer_of_a_botocore_response() -> None:
    answer = Answer.of_response({"ETag": f'"{MD5_HEX}"', "ChecksumCRC32": "AAAAAA==",
                                 "ServerSideEncryption": "aws:kms"})
    assert answer == Answer(f'"{MD5_HEX}"', "AAAAAA==", True)
    assert Answer.of_response({"ETag": '"e"'}) == Answer('"e"', None, False)


def verdicts() -> tuple[Verdicts, list[tuple[Capability, bool]]]:
    learned: list[tuple[Capability, bool]] = []
    capabilities = Capabilities(on_learn=lambda c, v: learned.append((c, v)))
    return Verdicts("s3://bucket at http://store", capabilities), learned


def test_an_etag_that_is_the_bodys_md5_proves_it() -> None:
    judge, learned = verdicts()
    assert judge.check("PutObject s3://b/k", "PutObject", "k", f'"{MD5_HEX}"', MD5_B64,
                       encrypted=False)
    assert learned == [(Capability.ETAG_IS_MD5, True)]


def test_an_md5_etag_of_other_bytes_is_a_bad_digest_and_retried() -> None:
    judge, _ = verdicts()
    other = hashlib.md5(b"damaged").hexdigest()  # noqa: S324
    with pytest.raises(BadDigest) as caught:
        judge.check("PutObject s3://b/k", "PutObject", "k", f'"{other}"', MD5_B64,
                    encrypted=False)
    assert isinstance(caught.value, TransientStoreError)  # the retry layer sends it again
    assert other in str(caught.value) and MD5_HEX in str(caught.value)
    assert caught.value.code == "BadDigest"


def test_an_etag_that_is_no_md5_proves_nothing_and_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    judge, learned = verdicts()
    assert not judge.check("PutObject", "PutObject", "k", '"opaque-etag"', MD5_B64,
                           encrypted=False)
    assert learned == [(Capability.ETAG_IS_MD5, False)]
    with caplog.at_level(logging.WARNING, logger="asyncsync"):
        judge.unproven("PutObject")
        judge.unproven("PutObject")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "s3://bucket at http://store" in warnings[0]
    assert "--verify-after-upload" in warnings[0]


def test_an_encrypted_object_is_not_judged_by_its_etag() -> None:
    judge, learned = verdicts()
    other = hashlib.md5(b"anything").hexdigest()  # noqa: S324
    assert not judge.check("PutObject", "PutObject", "k", f'"{other}"', MD5_B64,
                           encrypted=True)
    assert learned == []  # says nothing about the store's plain objects


def test_capabilities_learn_only_news_and_skip_unknown_names() -> None:
    learned: list[tuple[Capability, bool]] = []
    capabilities = Capabilities({"list-parts": False, "from-a-newer-version": True},
                                on_learn=lambda c, v: learned.append((c, v)))
    assert capabilities[Capability.LIST_PARTS] is False
    assert capabilities[Capability.CRC32_ECHO] is None
    assert not capabilities.learn(Capability.LIST_PARTS, False)
    assert capabilities.learn(Capability.CRC32_ECHO, True)
    assert learned == [(Capability.CRC32_ECHO, True)]
    assert capabilities.as_dict() == {"list-parts": False, "crc32-echo": True}
