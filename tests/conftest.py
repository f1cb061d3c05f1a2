"""Session fixtures: one real SeaweedFS S3 server for the whole run, a fresh bucket per test.

Set ASYNCSYNC_TEST_ENDPOINT (with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment)
to run the same tests against another S3 endpoint instead of the embedded server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
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


# The conformance matrix: every test that talks to S3 (through the `s3_server` fixture) runs
# against each of these real servers, unless it is marked ``@pytest.mark.servers(...)`` with
# the ones that have the behaviour it depends on. ASYNCSYNC_TEST_SERVERS=seaweedfs (a comma-
# separated list) narrows a local run.
SERVERS = ("seaweedfs", "moto", "s3rver")


def selected_servers() -> tuple[str, ...]:
    wanted = os.environ.get("ASYNCSYNC_TEST_SERVERS")
    if os.environ.get("ASYNCSYNC_TEST_ENDPOINT"):
        return ("external",)
    if not wanted:
        return SERVERS
    names = tuple(name.strip() for name in wanted.split(",") if name.strip())
    unknown = set(names) - set(SERVERS)
    if unknown:
        raise pytest.UsageError(f"ASYNCSYNC_TEST_SERVERS: unknown {sorted(unknown)}; "
                                f"known: {', '.join(SERVERS)}")
    return names


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    kind: str = "seaweedfs"  # which of SERVERS (or "external": ASYNCSYNC_TEST_ENDPOINT)

    @property
    def checks_content_md5(self) -> bool:
        """Refuses a body whose Content-MD5 is wrong (moto and s3rver store it anyway)."""
        return self.kind in ("seaweedfs", "external")

    @property
    def lists_parts(self) -> bool:
        """ListParts, AbortMultipartUpload and ListMultipartUploads (s3rver has none)."""
        return self.kind != "s3rver"

    @property
    def echoes_crc32(self) -> bool:
        """Checks a part's CRC32 and echoes it (moto echoes nothing, s3rver ignores it)."""
        return self.kind in ("seaweedfs", "external")

    @property
    def aborts_uploads(self) -> bool:
        """AbortMultipartUpload (s3rver has none: its uploads stay until completed)."""
        return self.kind != "s3rver"

    @property
    def counts_parts_in_etag(self) -> bool:
        """A multipart object's ETag is ``"<md5 of md5s>-N"`` (s3rver's is a plain MD5)."""
        return self.kind != "s3rver"

    @property
    def checks_credentials(self) -> bool:
        """Refuses a wrong secret key (moto takes any keys, s3rver does not check them)."""
        return self.kind in ("seaweedfs", "external")

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
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = SeaweedFS(data_dir=tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield S3Server(server.endpoint, server.access_key, server.secret_key, "seaweedfs")
    finally:
        server.stop()


def _serve(server: Any, kind: str) -> Iterator[S3Server]:
    """Start one of tests/s3servers.py's processes for the session; stop it after."""
    server.start()
    try:
        yield S3Server(server.endpoint, server.access_key, server.secret_key, kind)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    from .s3servers import MotoServer

    yield from _serve(MotoServer(tmp_path_factory.mktemp("moto")), "moto")


@pytest.fixture(scope="session")
def s3rver_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    from .s3servers import S3rver

    server = S3rver(tmp_path_factory.mktemp("s3rver"))
    S3RVER_DATA[server.endpoint] = server.data_dir / "data"
    yield from _serve(server, "s3rver")


@pytest.fixture(scope="session")
def external_server() -> S3Server:
    return S3Server(os.environ["ASYNCSYNC_TEST_ENDPOINT"], os.environ["AWS_ACCESS_KEY_ID"],
                    os.environ["AWS_SECRET_ACCESS_KEY"], "external")


def servers_for(node: Any) -> tuple[str, ...]:
    """The servers a test runs against: the selection, narrowed by its ``servers`` mark."""
    selected = selected_servers()
    mark = node.get_closest_marker("servers")
    if mark is None or selected == ("external",):
        return selected
    return tuple(name for name in selected if name in mark.args)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "s3_server" in metafunc.fixturenames:
        names = servers_for(metafunc.definition)
        metafunc.parametrize("s3_server", names or [pytest.param(
            "none", marks=pytest.mark.skip(reason="no selected server has what it needs"))],
            indirect=True, scope="session")


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """The S3 server of this test's place in the matrix."""
    server: S3Server = request.getfixturevalue(f"{request.param}_server")
    return server


def empty_bucket(client: Any, bucket: str) -> None:
    """Abort every multipart upload and delete every object of a bucket."""
    from botocore.exceptions import ClientError

    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
    except ClientError as exc:  # s3rver cannot list uploads (nor abort them)
        if exc.response.get("Error", {}).get("Code") != "NotImplemented":
            raise
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


@contextlib.contextmanager
def new_bucket(server: S3Server) -> Iterator[str]:
    """A new, empty bucket on ``server``, emptied and deleted afterwards."""
    client = server.client()
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        empty_bucket(client, name)
        client.delete_bucket(Bucket=name)
        client.close()


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket for one test, deleted afterwards (SeaweedFS gives each a volume)."""
    with new_bucket(s3_server) as name:
        yield name


def server_params(prefix: str) -> list[Any]:
    """Parameters ``PREFIX:SERVER`` for a fixture that picks its S3 server itself (with
    `request.getfixturevalue(f"{server}_server")`), one per selected server, marked s3."""
    return [pytest.param(f"{prefix}:{name}", marks=pytest.mark.s3, id=f"{prefix}-{name}")
            for name in selected_servers()]


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


# s3rver's data directories by endpoint: it has no ListMultipartUploads, but keeps each
# upload in BUCKET/._S3rver_uploads/ID/ (its key in a file `key`) until it completes.
S3RVER_DATA: dict[str, Path] = {}


def open_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    """The bucket's multipart uploads in progress (Key, UploadId)."""
    from botocore.exceptions import ClientError

    try:
        return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    except ClientError as exc:
        data = S3RVER_DATA.get(str(client.meta.endpoint_url))
        if exc.response.get("Error", {}).get("Code") != "NotImplemented" or data is None:
            raise
    uploads = data / bucket / "._S3rver_uploads"
    found = sorted(uploads.iterdir()) if uploads.is_dir() else []
    return [{"Key": (entry / "key").read_text(), "UploadId": entry.name}
            for entry in found if (entry / "key").is_file()]


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


@pytest.fixture
def cli_main(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """`asyncsync ARGS...` in-process: (exit code, stdout, stderr). cli.main configures the
    "asyncsync" logger for a terminal; later tests read it through caplog, so it is put back."""
    from asyncsync import cli

    logger = logging.getLogger("asyncsync")
    saved = logger.handlers[:], logger.level, logger.propagate

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return code, out, err

    try:
        yield run
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    """Poll ``condition`` until it gives something true (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def read_terminal(main: int, into: list[bytes]) -> None:
    """Everything written to a pseudo-terminal's other side, until the child closes it."""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            return
        if not chunk:
            return
        into.append(chunk)
