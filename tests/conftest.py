"""Session fixtures: one real SeaweedFS S3 server for the whole run, a fresh bucket per test.

Set ASYNCSYNC_TEST_ENDPOINT (with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment)
to run the same tests against another S3 endpoint instead of the embedded server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asyncsync.embedded_s3 import SeaweedFS


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Object bodies are compared byte for byte; pytest's own diff of two 200 KB bodies runs
    difflib for minutes (a CI run once timed out inside it). Say instead what differs."""
    bodies = (bytes, bytearray, memoryview)
    if op != "==" or not (isinstance(left, bodies) or isinstance(right, bodies)):
        return None
    if max(_body_size(left), _body_size(right)) <= 256:
        return None
    lines = [f"{_describe_body(left)} == {_describe_body(right)}"]
    if isinstance(left, bodies) and isinstance(right, bodies):
        a, b = bytes(left), bytes(right)
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
        lines.append(f"first difference at byte offset {first}")
    return lines


def _body_size(value: object) -> int:
    return len(value) if isinstance(value, bytes | bytearray | memoryview) else 0


def _describe_body(value: object) -> str:
    import hashlib

    if isinstance(value, bytes | bytearray | memoryview):
        digest = hashlib.sha256(bytes(value)).hexdigest()[:16]
        return f"<{len(value)} bytes sha256:{digest}>"
    return repr(value)[:80]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def env(self, **extra: str) -> dict[str, str]:
        """A subprocess environment that reaches this server through the standard AWS chain."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        )
        env.update(extra)
        return env

    def client(self, endpoint: str | None = None) -> Any:
        """A plain synchronous botocore client, for tests to inspect the bucket independently."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.Session()
        return session.create_client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 3},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    endpoint = os.environ.get("ASYNCSYNC_TEST_ENDPOINT")
    if endpoint:
        yield S3Server(
            endpoint, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        )
        return
    server = SeaweedFS(data_dir=tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield S3Server(server.endpoint, server.access_key, server.secret_key)
    finally:
        server.stop()


def empty_bucket(client: Any, bucket: str) -> None:
    """Abort every multipart upload and delete every object of a bucket."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket for one test, deleted afterwards (SeaweedFS gives each a volume)."""
    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        empty_bucket(client, name)
        client.delete_bucket(Bucket=name)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def records(self) -> list[dict[str, Any]]:
        """The --json lines of stdout."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    @property
    def summary(self) -> dict[str, Any]:
        last = self.records[-1]
        assert last["type"] == "summary", last
        return last

    def files(self, status: str) -> list[str]:
        return sorted(
            r["path"] for r in self.records if r["type"] == "file" and r["status"] == status
        )


ASYNCSYNC = str(Path(sys.executable).parent / "asyncsync")


def run_cli(
    *args: str | Path,
    env: dict[str, str],
    timeout: float = 180,
    prefix: list[str] | None = None,
    **popen: Any,
) -> CliResult:
    """Run the installed `asyncsync` command and capture what it printed."""
    command = [*(prefix or []), ASYNCSYNC, *map(str, args)]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, **popen
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def read_object(client: Any, bucket: str, key: str) -> bytes:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return bytes(body.read())
    finally:
        body.close()


def bucket_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(keys)


def open_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def recorded_parts(state_dir: Path) -> int:
    """Multipart parts the manifest has recorded so far (0 before it exists)."""
    import sqlite3

    path = state_dir / "manifest.db"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM parts").fetchone()[0])
    except sqlite3.OperationalError:  # created, schema not written yet
        return 0
