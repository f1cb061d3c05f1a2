"""The lean path's SigV4 signatures equal botocore's for the same request."""

from __future__ import annotations

import datetime
import time

import pytest
from botocore import auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from asyncsync.stores.sigv4 import SigV4Signer, canonical_query, quote_path

NOW = time.mktime((2026, 11, 27, 12, 30, 5, 0, 0, 0)) - time.timezone


def botocore_authorization(
    monkeypatch: pytest.MonkeyPatch, url: str, headers: dict[str, str], token: str | None
) -> dict[str, str]:
    fixed = datetime.datetime.fromtimestamp(NOW, tz=datetime.UTC).replace(tzinfo=None)
    monkeypatch.setattr(auth, "get_current_datetime", lambda: fixed)
    request = AWSRequest(method="PUT", url=url, headers=dict(headers), data=b"body")
    signer = auth.S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token),
                              "s3", "eu-west-1")
    monkeypatch.setattr(signer, "_should_sha256_sign_payload", lambda request: False)
    signer.add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize("token", [None, "session-token/+="])
@pytest.mark.parametrize(
    ("key", "query"),
    [
        ("runs/exp/weights/last.pt", {}),
        ("runs/ünïcødé 日本/spaces and +#%&=.txt", {}),
        ("runs/exp/w.pt", {"partNumber": "3", "uploadId": "abc/def+ghi=="}),
    ],
)
def test_signature_matches_botocore(
    monkeypatch: pytest.MonkeyPatch, key: str, query: dict[str, str], token: str | None
) -> None:
    host = "s3.eu-west-1.example.com:9000"
    path = quote_path("/bucket-a/" + key)
    query_string = canonical_query(query)
    headers = {
        "content-md5": "1B2M2Y8AsgTpgAmY7PhCfg==",
        "content-length": "4",
        "x-amz-meta-xxh128": "0123456789abcdef0123456789abcdef",
        "content-encoding": "gzip",
    }
    ours = SigV4Signer("eu-west-1").sign(
        "PUT", host, path, query_string, dict(headers),
        access_key="AKIDEXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG", token=token, now=NOW,
    )
    url = f"https://{host}{path}" + (f"?{query_string}" if query_string else "")
    theirs = botocore_authorization(monkeypatch, url, headers, token)
    assert ours["x-amz-date"] == theirs["x-amz-date"] == "20261127T123005Z"
    assert ours["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert ours["authorization"] == theirs["authorization"]
    if token:
        assert ours["x-amz-security-token"] == token


def test_signing_key_is_cached_per_day_and_secret() -> None:
    signer = SigV4Signer("us-east-1")
    common = dict(access_key="A", token=None)
    first = signer.sign("PUT", "h", "/b/k", "", {}, secret_key="s1", now=NOW, **common)
    again = signer.sign("PUT", "h", "/b/k", "", {}, secret_key="s1", now=NOW, **common)
    other = signer.sign("PUT", "h", "/b/k", "", {}, secret_key="s2", now=NOW, **common)
    next_day = signer.sign("PUT", "h", "/b/k", "", {}, secret_key="s1", now=NOW + 86400,
                           **common)
    assert first["authorization"] == again["authorization"]
    assert other["authorization"] != first["authorization"]
    assert next_day["authorization"] != first["authorization"]
    assert "s1" not in repr(signer.__dict__)
