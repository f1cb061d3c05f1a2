"""`asyncsync doctor`, through the installed command, against the real S3 servers of the
matrix: what each server really answers to every probe, what is kept in the manifest, what
is left in the bucket (nothing), and the exit codes of a store that would fail uploads, a
missing bucket and a clock that is off (a relay that shifts the store's Date header)."""

from __future__ import annotations

import asyncio
import email.utils
import re
import threading
from pathlib import Path
from types import TracebackType

import pytest

from asyncsync.commands.doctor import Severity, advice, clock_severity
from asyncsync.pipeline.manifest import Manifest, Scope
from asyncsync.stores.capabilities import Capability

from .conftest import S3Server, bucket_keys, open_uploads, run_cli
from .test_cli import error_lines, offline_env

pytestmark = pytest.mark.s3

CAPABILITIES = [capability.value for capability in Capability]
# What each server of the matrix really answers (probed by hand, then pinned here), and the
# line doctor prints for each gap it has.
EXPECTED: dict[str, dict[str, bool]] = {
    "seaweedfs": {"crc32-echo": True, "list-parts": True, "abort-multipart": True,
                  "etag-is-md5": True, "verifies-md5": True, "conditional-writes": True},
    # moto stores whatever arrives and echoes no part checksum.
    "moto": {"crc32-echo": False, "list-parts": True, "abort-multipart": True,
             "etag-is-md5": True, "verifies-md5": False, "conditional-writes": True},
    # s3rver also has no ListParts, no AbortMultipartUpload and ignores If-None-Match.
    "s3rver": {"crc32-echo": False, "list-parts": False, "abort-multipart": False,
               "etag-is-md5": True, "verifies-md5": False, "conditional-writes": False},
}
GAP_ACTIONS = {
    "crc32-echo": "parts carry a Content-MD5 instead, proven by their MD5 ETag",
    "list-parts": "a killed multipart upload restarts from the first part",
    "abort-multipart": "failed uploads are left to the bucket's lifecycle rule: add one"
                       " (AbortIncompleteMultipartUpload)",
    "verifies-md5": "uploads are proven by their MD5 ETag on this side",
}


def capability_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """{capability: (yes/no/unknown, what asyncsync does)} from the text report."""
    found = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"  ([a-z0-9-]+) +(yes|no|unknown) +(.+)", line)
        if match and match[1] in CAPABILITIES:
            found[match[1]] = (match[2], match[3])
    return found


def assert_nothing_left(s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    assert bucket_keys(client, bucket) == []
    if s3_server.lists_parts:  # s3rver can neither list uploads nor abort them
        assert open_uploads(client, bucket) == []


def assert_no_secret(s3_server: S3Server, *outputs: str) -> None:
    for output in outputs:
        assert s3_server.secret_key not in output


def test_doctor_reports_what_the_store_supports_and_keeps_it_in_the_manifest(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    scope = Scope(s3_server.endpoint.rstrip("/"), bucket)
    expected = EXPECTED.get(s3_server.kind)
    if expected is not None:
        # A wrong value from an earlier run: doctor probes afresh and replaces it.
        manifest = Manifest.open(state)
        manifest.learn_capability(scope, "crc32-echo", not expected["crc32-echo"])
        manifest.close()

    result = run_cli("doctor", f"s3://{bucket}/runs/exp1", "--state-dir", state,
                     env=s3_server.env(), timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"asyncsync doctor s3://{bucket}/runs/exp1\n")
    assert f"  endpoint            {s3_server.endpoint}" in result.stdout
    assert "  region              us-east-1" in result.stdout
    assert "  addressing          auto (path-style requests)" in result.stdout
    assert "  clock               in step with the store's" in result.stdout
    assert result.stdout.endswith("ok: the store works for asyncsync\n")
    lines = capability_lines(result.stdout)
    assert sorted(lines) == sorted(CAPABILITIES), result.stdout
    assert error_lines(result.stderr) == []
    assert_nothing_left(s3_server, bucket)
    assert_no_secret(s3_server, result.stdout, result.stderr)
    learned = Manifest.open(state, read_only=True)
    try:
        kept = learned.capabilities(scope)
    finally:
        learned.close()
    if expected is None:  # an external endpoint: whatever it does, it was said and kept
        assert {answer for answer, _ in lines.values()} <= {"yes", "no", "unknown"}
        assert set(kept) <= set(CAPABILITIES)
        return
    assert {name: answer for name, (answer, _) in lines.items()} == {
        name: "yes" if value else "no" for name, value in expected.items()}
    for name, value in expected.items():
        if not value and name in GAP_ACTIONS:
            assert lines[name][1] == GAP_ACTIONS[name], name
    if expected["etag-is-md5"] and expected["verifies-md5"]:
        assert lines["etag-is-md5"][1] == "uploads are proven by their MD5 ETag on this side"
    assert kept == expected
    if not expected["abort-multipart"]:
        assert "the probe's upload is left to the bucket's lifecycle rule" in result.stderr


def test_doctor_json_is_one_object_with_every_capability(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    result = run_cli("doctor", f"s3://{bucket}", "--json", "--state-dir", tmp_path / "state",
                     env=s3_server.env(), timeout=120)

    assert result.returncode == 0, result.stderr
    [report] = result.records
    assert report["destination"] == f"s3://{bucket}"
    assert report["endpoint"] == s3_server.endpoint
    assert report["region"] == "us-east-1" and report["addressing_style"] == "auto"
    assert report["requests"] == "path" and report["direct_uploads"] is True
    assert report["reachable"] is True and report["ok"] is True and report["exit_code"] == 0
    assert abs(report["clock_skew_seconds"]) < 60
    assert sorted(report["capabilities"]) == sorted(CAPABILITIES)
    for name, entry in report["capabilities"].items():
        assert entry["supported"] in (True, False, None), name
        assert entry["action"], name
    expected = EXPECTED.get(s3_server.kind)
    if expected is not None:
        assert {name: entry["supported"] for name, entry in report["capabilities"].items()} \
            == expected
    assert all(problem["level"] == "warning" for problem in report["problems"])
    assert_nothing_left(s3_server, bucket)
    assert_no_secret(s3_server, result.stdout, result.stderr)


def test_quiet_doctor_prints_nothing_on_a_working_store(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    result = run_cli("doctor", f"s3://{bucket}/q", "-q", "--state-dir", tmp_path / "state",
                     env=s3_server.env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert_nothing_left(s3_server, bucket)


def test_a_missing_bucket_exits_2_with_one_line_naming_it(
    s3_server: S3Server, tmp_path: Path
) -> None:
    missing = "doctor-no-such-bucket"
    result = run_cli("doctor", f"s3://{missing}/x", "--state-dir", tmp_path / "state",
                     env=s3_server.env(), timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"asyncsync: error: bucket s3://{missing} does not exist"]

    as_json = run_cli("doctor", f"s3://{missing}", "--json", "--state-dir", tmp_path / "state",
                      env=s3_server.env(), timeout=120)
    assert as_json.returncode == 2
    [report] = as_json.records
    assert report["reachable"] is False and report["exit_code"] == 2
    assert report["problems"] == [
        {"level": "error", "message": f"bucket s3://{missing} does not exist"}]
    assert all(entry["supported"] is None for entry in report["capabilities"].values())


@pytest.mark.servers("seaweedfs")  # moto and s3rver take any keys
def test_a_wrong_secret_key_exits_2_and_is_never_printed(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    wrong = "doctor-wrong-secret-key-0123456789"
    result = run_cli("doctor", f"s3://{bucket}", "--state-dir", tmp_path / "state",
                     env=s3_server.env(AWS_SECRET_ACCESS_KEY=wrong), timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("asyncsync: error: ") and f"s3://{bucket}" in line
    assert "secret key does not match" in line
    for output in (result.stdout, result.stderr):
        assert wrong not in output and s3_server.secret_key not in output


def test_bodies_damaged_on_the_way_exit_1(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    from .faultproxy import FaultProxy

    with FaultProxy(s3_server.endpoint) as proxy:
        # Every upload of the probe object is damaged: SeaweedFS refuses it (BadDigest),
        # moto and s3rver keep it under an ETag that is not the MD5 of what was sent.
        proxy.inject("corrupt-body", 100, method="PUT", path_contains="/object")
        result = run_cli("doctor", f"s3://{bucket}/d", "--retries", "2", "--state-dir",
                         tmp_path / "state", env=s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint),
                         timeout=120)
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert f"PutObject s3://{bucket}/d/_asyncsync/doctor-" in line
    assert line.endswith(": uploads will fail")
    assert "failed: uploads to this store would fail" in result.stdout
    assert_nothing_left(s3_server, bucket)


def test_an_unreachable_endpoint_exits_2(tmp_path: Path) -> None:
    result = run_cli("doctor", "s3://bucket-a", "--retries", "1", "--state-dir",
                     tmp_path / "state", env=offline_env(), timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("asyncsync: error: store unreachable: HeadBucket s3://bucket-a:")
    assert line.endswith("(gave up after 1 attempt)")


def test_virtual_addressing_of_a_bucket_host_that_does_not_resolve_exits_2(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The store is up, but with virtual-hosted addressing doctor dials BUCKET.localhost,
    which no DNS knows: a settings mistake, said once, not retried."""
    port = s3_server.endpoint.rstrip("/").rpartition(":")[2]
    result = run_cli("doctor", f"s3://{bucket}", "--addressing-style", "virtual",
                     "--state-dir", tmp_path / "state",
                     env=s3_server.env(AWS_ENDPOINT_URL=f"http://localhost:{port}"), timeout=120)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("asyncsync: error: ")
    assert f"the host name {bucket}.localhost does not resolve" in line
    assert line.endswith("use --addressing-style path")
    assert result.stdout == ""


def test_virtual_addressing_with_an_ip_endpoint_exits_2(tmp_path: Path) -> None:
    env = offline_env()
    result = run_cli("doctor", "s3://bucket-a", "--addressing-style", "virtual",
                     "--state-dir", tmp_path / "state", env=env, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"the endpoint {env['AWS_ENDPOINT_URL']} (from $AWS_ENDPOINT_URL) is an IP address" in (
        line)
    assert line.endswith("use --addressing-style path")


@pytest.mark.parametrize("body_path", ["direct", "botocore"])
def test_a_bucket_in_another_region_exits_2_naming_it(tmp_path: Path, body_path: str) -> None:
    """How AWS answers a HeadBucket at another region's endpoint (301 naming the bucket's
    region): doctor says which --region to pass, through either request path."""
    import http.server

    from .test_store import _RegionRedirect

    class Redirect(_RegionRedirect):
        seen: list[tuple[str, str]] = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    extra = ["--no-direct-uploads"] if body_path == "botocore" else []
    env = {**offline_env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}"}
    try:
        result = run_cli("doctor", "s3://far-away", "--state-dir", tmp_path / "state", *extra,
                         env=env, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)
    assert "the bucket is in region eu-west-1, not us-east-1: pass --region eu-west-1" in line
    assert result.stdout == ""


@pytest.mark.parametrize(("destination", "needle"), [
    ("file:///tmp/mirror", "doctor probes S3 stores"),
    ("bucket-a/x", "expected s3://BUCKET"),
    ("s3://Bad_Bucket", "invalid bucket name 'Bad_Bucket'"),
])
def test_a_bad_destination_exits_2_with_one_line(
    destination: str, needle: str, tmp_path: Path
) -> None:
    result = run_cli("doctor", destination, "--state-dir", tmp_path / "state",
                     env=offline_env(), timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("asyncsync: error: ") and needle in line, line
    assert result.stdout == ""


class DateShiftingRelay:
    """A loopback TCP relay in front of an S3 server that rewrites the Date header of every
    answer ``shift`` seconds ahead: a store whose clock is off, without touching a clock.
    Requests pass unchanged, so their signatures hold."""

    _DATE = re.compile(rb"\r\n[Dd]ate: ([^\r\n]+)")

    def __init__(self, upstream: str, shift: float) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self._upstream = (host, int(port or 80))
        self._shift = shift
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.endpoint = ""

    def _shifted(self, match: re.Match[bytes]) -> bytes:
        moment = email.utils.parsedate_to_datetime(match[1].decode())
        later = email.utils.format_datetime(
            moment.fromtimestamp(moment.timestamp() + self._shift, moment.tzinfo), usegmt=True)
        return b"\r\nDate: " + later.encode()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    rewrite: bool) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(self._DATE.sub(self._shifted, data) if rewrite else data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer, False),
                             self._pipe(up_reader, writer, True))

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _stop(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> DateShiftingRelay:
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


@pytest.mark.servers("seaweedfs")  # the relay is the test; one real server behind it will do
@pytest.mark.parametrize(("shift", "code", "level", "said"), [
    (600, 2, "error", " s behind the store's: S3 refuses requests signed more than 5 minutes"
     " off; set the clock (NTP)"),
    (-120, 0, "warning", " s ahead of the store's; set it (NTP)"),
])
def test_a_clock_off_the_stores_is_reported(
    s3_server: S3Server, bucket: str, tmp_path: Path, shift: int, code: int, level: str,
    said: str,
) -> None:
    with DateShiftingRelay(s3_server.endpoint, shift) as relay:
        result = run_cli("doctor", f"s3://{bucket}", "--state-dir", tmp_path / "state",
                         env=s3_server.env(AWS_ENDPOINT_URL=relay.endpoint), timeout=120)
    assert result.returncode == code, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "clock" in line]
    assert line.startswith(f"asyncsync: {level}: clock: ") and said in line, line
    # The Date header counts whole seconds.
    found = re.search(r"clock is (\d+) s", line)
    assert found is not None and abs(int(found[1]) - abs(shift)) <= 2, line
    assert re.search(r"  clock +\d+ s (behind|ahead of) the store's", result.stdout)
    assert_nothing_left(s3_server, bucket)


def test_clock_thresholds() -> None:
    assert clock_severity(0.0) is None and clock_severity(-59.0) is None
    assert clock_severity(61.0) is clock_severity(-61.0) is Severity.WARNING
    assert clock_severity(301.0) is clock_severity(-301.0) is Severity.MISCONFIGURED
    assert int(Severity.MISCONFIGURED) == 2 and int(Severity.UPLOADS_FAIL) == 1


def test_advice_follows_from_all_the_capabilities_together() -> None:
    proven = advice({Capability.VERIFIES_MD5: False, Capability.ETAG_IS_MD5: True})
    assert proven[Capability.VERIFIES_MD5] == "uploads are proven by their MD5 ETag on this side"
    blind = advice({Capability.ETAG_IS_MD5: False, Capability.CRC32_ECHO: False,
                    Capability.VERIFIES_MD5: False})
    size_only = "uploads are checked by size only; use --verify-after-upload"
    assert blind[Capability.ETAG_IS_MD5] == size_only
    assert blind[Capability.VERIFIES_MD5] == size_only
    assert "--verify-after-upload" in blind[Capability.CRC32_ECHO]
    gaps = advice({Capability.LIST_PARTS: False, Capability.ABORT_MULTIPART: False})
    assert gaps[Capability.LIST_PARTS] == "a killed multipart upload restarts from the first part"
    assert gaps[Capability.ABORT_MULTIPART] == (
        "failed uploads are left to the bucket's lifecycle rule: add one"
        " (AbortIncompleteMultipartUpload)")
    assert sorted(advice({})) == sorted(Capability)


def test_doctor_help_and_its_options(tmp_path: Path) -> None:
    result = run_cli("doctor", "--help", env=offline_env(), timeout=60)
    assert result.returncode == 0
    for flag in ("--endpoint-url", "--region", "--profile", "--addressing-style", "--retries",
                 "--connect-timeout", "--read-timeout", "--no-direct-uploads", "--state-dir",
                 "--config", "--quiet", "--verbose", "--json"):
        assert flag in result.stdout, flag
    assert "the findings as one JSON object on stdout" in result.stdout
    for flag in ("--workers", "--gzip", "--dry-run"):
        assert flag not in result.stdout, flag
    # A config file's top-level store keys apply; push's own keys there are left alone.
    config = tmp_path / "asyncsync.toml"
    config.write_text('retries = 1\nworkers = 4\n[push]\ndry_run = true\n')
    offline = run_cli("doctor", "s3://bucket-a", "--config", config, "--state-dir",
                      tmp_path / "state", env=offline_env(), timeout=60)
    assert offline.returncode == 2
    assert offline.stderr.rstrip().endswith("(gave up after 1 attempt)"), offline.stderr
    assert offline.stdout == ""
