"""`doctor`: probe one S3 store on purpose and say what asyncsync will do about each gap.

push and watch learn a store's behaviours as they go (`stores.capabilities`); doctor asks for
each at once, under a key prefix of its own (``PREFIX/_asyncsync/doctor-<random>/``) that it
empties again: is the bucket reachable, is the clock close to the store's, is a PUT's ETag
its MD5, is a wrong Content-MD5 refused, is a part's CRC32 echoed, do ListParts and
AbortMultipartUpload work, does If-None-Match refuse an overwrite. The uploads go through the
same `S3Store` push opens (the lean signed path included), so a request push would have
refused is found here first. What was probed is kept in the manifest of --state-dir, so the
next push starts from it. Findings are facts for the report; only the exit code judges: 0 the
store works (gaps are handled), 1 uploads would fail, 2 misconfigured or unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import json
import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from ..config import (
    Destination,
    StoreConfig,
    default_state_dir,
    parse_destination,
    store_config_from,
)
from ..errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    ConfigError,
    FatalStoreError,
    NotSupported,
    StoreError,
    TransientStoreError,
)
from ..names import printable
from ..options import Settings
from ..pipeline.digest import crc32_b64_of
from ..pipeline.manifest import Manifest, Scope
from ..pipeline.session import ManifestUse, Pipeline, ReadSession
from ..stores.capabilities import Capability
from ..stores.integrity import md5_b64_of
from ..stores.protocol import ObjectAttributes
from ..stores.retry import Backoff, retry_transient

T = TypeVar("T")
log = logging.getLogger("asyncsync")

# S3 refuses a signature more than 15 minutes off its clock; other stores are stricter (5
# minutes is common), and a clock that far off is wrong anyway.
SKEW_REFUSED = 300.0
# A minute off already makes presigned URLs and logs disagree: worth fixing before it grows.
SKEW_WARNING = 60.0
# What a store answers to a body whose Content-MD5 is wrong, when it checks it.
_DIGEST_REFUSED = frozenset({"BadDigest", "InvalidDigest"})
_PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412"})
_ORDER = (
    Capability.CRC32_ECHO, Capability.LIST_PARTS, Capability.ABORT_MULTIPART,
    Capability.ETAG_IS_MD5, Capability.VERIFIES_MD5, Capability.CONDITIONAL_WRITES,
)


@dataclass(frozen=True)
class DoctorConfig:
    destination: Destination
    store: StoreConfig
    state_dir: Path
    json: bool = False
    quiet: bool = False


def doctor_config_from(settings: Settings, destination: str) -> DoctorConfig:
    """DEST and validated settings -> the frozen config, the store's built as push builds it."""
    dest = parse_destination(destination)
    if dest.scheme != "s3":
        raise ConfigError(f"destination {destination!r}: doctor probes S3 stores; a file://"
                          " directory has nothing to probe")
    store = store_config_from(settings, connections=4)  # one probe at a time
    state_dir = settings["state_dir"] or default_state_dir()
    return DoctorConfig(dest, store, state_dir.absolute(), json=settings["json"],
                        quiet=settings["quiet"])


class Severity(enum.IntEnum):
    """How bad a problem is; the worst one found is the exit code."""

    WARNING = EXIT_OK  # reported; the store works
    UPLOADS_FAIL = EXIT_SOME_FAILED  # push would fail on this store as it is
    MISCONFIGURED = EXIT_USAGE  # fix the configuration (or the clock) first


@dataclass(frozen=True)
class Problem:
    severity: Severity
    message: str

    @property
    def level(self) -> str:
        return "warning" if self.severity is Severity.WARNING else "error"


@dataclass
class Finding:
    """What one probe showed: True, False, or None when it could not tell (``detail`` why)."""

    value: bool | None = None
    detail: str = ""


@dataclass
class Report:
    destination: str
    endpoint: str | None
    region: str | None = None
    addressing_style: str = "auto"
    requests: str = ""  # the style the requests use: "path" or "virtual"
    direct_uploads: bool = True
    clock_skew: float | None = None  # this machine's clock minus the store's, in seconds
    reachable: bool = False
    findings: dict[Capability, Finding] = field(
        default_factory=lambda: {capability: Finding() for capability in _ORDER})
    problems: list[Problem] = field(default_factory=list)

    def problem(self, severity: Severity, message: str) -> None:
        self.problems.append(Problem(severity, message))

    def known(self) -> dict[Capability, bool | None]:
        return {capability: finding.value for capability, finding in self.findings.items()}

    @property
    def exit_code(self) -> int:
        return max((int(p.severity) for p in self.problems), default=EXIT_OK)

    def as_json(self) -> dict[str, Any]:
        actions = advice(self.known())
        return {
            "destination": self.destination,
            "endpoint": self.endpoint,
            "region": self.region,
            "addressing_style": self.addressing_style,
            "requests": self.requests or None,
            "direct_uploads": self.direct_uploads,
            "clock_skew_seconds": (None if self.clock_skew is None
                                   else round(self.clock_skew, 1)),
            "reachable": self.reachable,
            "capabilities": {
                capability.value: {"supported": finding.value, "action": actions[capability],
                                   **({"detail": finding.detail} if finding.detail else {})}
                for capability, finding in self.findings.items()
            },
            "problems": [{"level": p.level, "message": p.message} for p in self.problems],
            "ok": self.exit_code == EXIT_OK,
            "exit_code": self.exit_code,
        }

    def lines(self) -> list[str]:
        """The human report (stdout); the problems go to the log (stderr) beside it."""
        clock = "not seen (no Date header)" if self.clock_skew is None else _skew(self.clock_skew)
        style = self.addressing_style
        if self.requests:
            style += f" ({self.requests}-style requests)"
        rows = [
            ("endpoint", self.endpoint or "AWS (from the region)"),
            ("region", self.region or "none (us-east-1 for signing)"),
            ("addressing", style),
            ("bodies", "signed by asyncsync (--no-direct-uploads: through botocore)"
             if self.direct_uploads else "through botocore (--no-direct-uploads)"),
            ("clock", clock),
        ]
        lines = [f"asyncsync doctor {self.destination}"]
        lines += [f"  {name:<20}{printable(value)}" for name, value in rows]
        actions = advice(self.known())
        lines.append("capabilities")
        for capability, finding in self.findings.items():
            answer = {True: "yes", False: "no", None: "unknown"}[finding.value]
            lines.append(f"  {capability.value:<20}{answer:<9}{printable(actions[capability])}")
            if finding.detail:
                lines.append(f"  {'':<29}({printable(finding.detail)})")
        code = self.exit_code
        if code == EXIT_OK:
            lines.append("ok: the store works for asyncsync")
        elif code == EXIT_SOME_FAILED:
            lines.append("failed: uploads to this store would fail (see the errors)")
        else:
            lines.append("failed: fix the configuration first (see the errors)")
        return lines


def _skew(seconds: float) -> str:
    if abs(seconds) < 1.5:  # the Date header counts whole seconds
        return "in step with the store's"
    way = "ahead of" if seconds > 0 else "behind"
    return f"{abs(seconds):.0f} s {way} the store's"


def advice(known: dict[Capability, bool | None]) -> dict[Capability, str]:
    """What asyncsync does about each capability, given all of them (the answer for one
    depends on the others: a store that checks nothing is covered by MD5 ETags, if those)."""
    crc32 = known.get(Capability.CRC32_ECHO)
    etag = known.get(Capability.ETAG_IS_MD5)
    verifies = known.get(Capability.VERIFIES_MD5)
    size_only = "uploads are checked by size only; use --verify-after-upload"
    learned = "not shown yet: the first upload that needs it tells"
    said: dict[Capability, str] = {}
    said[Capability.CRC32_ECHO] = {
        True: "parts carry a CRC32 the store checks and echoes",
        False: ("parts carry a Content-MD5 instead, proven by their MD5 ETag" if etag
                else "parts carry a Content-MD5 instead, checked by the store" if verifies
                else "parts are checked by size only; use --verify-after-upload"),
        None: learned,
    }[crc32]
    said[Capability.LIST_PARTS] = {
        True: "a killed multipart upload resumes after its last part",
        False: "a killed multipart upload restarts from the first part",
        None: learned,
    }[known.get(Capability.LIST_PARTS)]
    said[Capability.ABORT_MULTIPART] = {
        True: "failed uploads are aborted: no parts are left to pay for",
        False: "failed uploads are left to the bucket's lifecycle rule: add one"
               " (AbortIncompleteMultipartUpload)",
        None: learned,
    }[known.get(Capability.ABORT_MULTIPART)]
    said[Capability.ETAG_IS_MD5] = {
        True: "uploads are proven by their MD5 ETag on this side",
        False: ("the store's own Content-MD5 check is the proof; sizes are checked after"
                " each upload" if verifies else size_only),
        None: learned,
    }[etag]
    said[Capability.VERIFIES_MD5] = {
        True: "a body damaged on the way is refused by the store and sent again",
        False: ("uploads are proven by their MD5 ETag on this side" if etag else size_only),
        None: "uploads are proven on this side where the answers allow",
    }[verifies]
    # Each file has one key and one writer (one asyncsync per prefix): nothing races.
    said[Capability.CONDITIONAL_WRITES] = "not used: asyncsync assumes one writer per prefix"
    return said


def _client_of(store: Any) -> Any:
    # The store's own aiobotocore client: the same endpoint, region, addressing style and
    # credentials push uses, for the probes the store cannot make (a wrong Content-MD5 on
    # purpose, If-None-Match) and the facts it does not expose (the Date header).
    return store.client


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def _date_of(response: Any) -> float | None:
    """The store's clock, from the Date header of a parsed answer (or an error's)."""
    headers = (response or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    text = headers.get("date")
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


class Probes:
    """The probes of one doctor run, against one open `S3Store`, under one key prefix."""

    def __init__(self, store: Any, config: DoctorConfig, report: Report) -> None:
        self.store = store
        self.client = _client_of(store)
        self.config = config
        self.report = report
        self.bucket = config.destination.bucket
        base = f"{config.destination.prefix}/" if config.destination.prefix else ""
        self.prefix = f"{base}_asyncsync/doctor-{secrets.token_hex(6)}/"
        self.body = f"asyncsync doctor probe {secrets.token_hex(8)}\n".encode()
        self.attributes = ObjectAttributes(metadata={}, content_type="text/plain")
        self._backoff = Backoff(config.store.backoff_base, config.store.backoff_cap)
        self._upload: tuple[str, str] | None = None  # (key, upload id) not yet aborted

    def where(self, op: str, key: str) -> str:
        return f"{op} s3://{self.bucket}/{key}"

    async def _raw(self, op: str, key: str, call: Callable[[], Awaitable[T]],
                   outcomes: frozenset[str] = frozenset()) -> T | str:
        """One call on the raw client, retried while transient, errors translated as the
        store translates them. An error whose code is in ``outcomes`` is what the probe
        asked about: its code is returned instead of raised."""
        from ..stores.s3errors import translate_error

        async def attempt() -> T | str:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = _error_code(exc)
                if code in outcomes:
                    return code
                raise translate_error(exc, op=op, key=key, location=f"s3://{self.bucket}",
                                      endpoint=self.config.store.endpoint_url or "") from exc

        return await retry_transient(attempt, attempts=self.config.store.max_attempts,
                                     backoff=self._backoff)

    async def settings(self) -> None:
        """What the client resolved: region, addressing, and the clock of a first answer."""
        report, client = self.report, self.client
        report.region = client.meta.region_name
        report.addressing_style = str((client.meta.config.s3 or {}).get("addressing_style")
                                      or "auto")
        # Presigned as botocore would send it; only the host is read (the query holds the
        # access key id and a signature, never printed).
        with contextlib.suppress(Exception):
            url = await client.generate_presigned_url(
                "head_bucket", Params={"Bucket": self.bucket}, ExpiresIn=60)
            host = urlsplit(url).hostname or ""
            report.requests = "virtual" if host.startswith(f"{self.bucket}.") else "path"
        sent = time.time()
        try:
            response: Any = await client.head_bucket(Bucket=self.bucket)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - check_bucket reports it; the clock may not
            response = getattr(exc, "response", None)
        answered = _date_of(response)
        if answered is not None:
            # The answer was dated somewhere between sending and receiving.
            report.clock_skew = (sent + time.time()) / 2 - answered
            self.judge_clock(report.clock_skew)

    def judge_clock(self, skew: float) -> None:
        severity = clock_severity(skew)
        if severity is None:
            return
        self.report.problem(severity, (
            f"clock: this machine's clock is {_skew(skew)}: S3 refuses requests signed more"
            " than 5 minutes off; set the clock (NTP)" if severity is Severity.MISCONFIGURED
            else f"clock: this machine's clock is {_skew(skew)}; set it (NTP) before S3"
            " refuses its signatures (5 minutes off)"))

    async def put(self) -> str | None:
        """etag-is-md5: a PutObject with its Content-MD5, as push sends a small file."""
        key = self.prefix + "object"
        try:
            await self.store.put_object(key, self.body, md5_b64=md5_b64_of(self.body),
                                        attributes=self.attributes)
        except StoreError as exc:
            self.failed(Capability.ETAG_IS_MD5, exc, "uploads will fail")
            return None
        self.learned(Capability.ETAG_IS_MD5,
                     "the answer is encrypted (SSE-KMS or SSE-C): its ETag proves nothing")
        return key

    async def wrong_md5(self) -> None:
        """verifies-md5: a body sent with another body's Content-MD5, through the raw client
        (`S3Store.put_object` would take the refusal for damage on the way and send again)."""
        key = self.prefix + "wrong-md5"
        wrong = md5_b64_of(self.body + b"!")
        try:
            answer = await self._raw("PutObject", key, lambda: self.client.put_object(
                Bucket=self.bucket, Key=key, Body=self.body, ContentMD5=wrong,
                ContentType="text/plain"), outcomes=_DIGEST_REFUSED)
        except StoreError as exc:
            self.unknown(Capability.VERIFIES_MD5, exc)
            return
        self.report.findings[Capability.VERIFIES_MD5].value = isinstance(answer, str)
        if not isinstance(answer, str):
            await self.delete(key)

    async def conditional(self, existing: str | None) -> None:
        """conditional-writes: PutObject with If-None-Match: * over an object that exists."""
        finding = self.report.findings[Capability.CONDITIONAL_WRITES]
        if existing is None:
            finding.detail = "no probe object to write over"
            return
        try:
            answer = await self._raw("PutObject", existing, lambda: self.client.put_object(
                Bucket=self.bucket, Key=existing, Body=self.body, IfNoneMatch="*",
                ContentMD5=md5_b64_of(self.body), ContentType="text/plain"),
                outcomes=_PRECONDITION_FAILED)
        except NotSupported as exc:
            finding.value, finding.detail = False, f"{exc.op} answered {exc.code}"
            return
        except StoreError as exc:
            self.unknown(Capability.CONDITIONAL_WRITES, exc)
            return
        finding.value = isinstance(answer, str)

    async def multipart(self) -> None:
        """crc32-echo, list-parts and abort-multipart: one upload of one small part (the
        last part may be any size), listed, then aborted."""
        key = self.prefix + "multipart"
        try:
            upload = await self.store.create_multipart_upload(
                key, attributes=self.attributes, crc32=True)
        except StoreError as exc:
            self.failed(Capability.CRC32_ECHO, exc, "multipart uploads will fail")
            return
        self._upload = (key, upload.upload_id)
        try:
            await self.store.upload_part(
                key, upload.upload_id, 1, self.body,
                **({"crc32_b64": crc32_b64_of(self.body)} if upload.crc32
                   else {"md5_b64": md5_b64_of(self.body)}))
        except StoreError as exc:
            self.failed(Capability.CRC32_ECHO, exc, "multipart uploads will fail")
        else:
            self.learned(Capability.CRC32_ECHO, "")
            await self.list_parts(key, upload.upload_id)
        await self.abort()

    async def list_parts(self, key: str, upload_id: str) -> None:
        finding = self.report.findings[Capability.LIST_PARTS]
        try:
            parts = await self.store.list_parts(key, upload_id)
        except NotSupported as exc:
            finding.value, finding.detail = False, f"{exc.op} answered {exc.code}"
            return
        except StoreError as exc:
            self.unknown(Capability.LIST_PARTS, exc)
            return
        # Resuming trusts the listing: one that misses a part sent is no listing at all.
        listed = any(p.part_number == 1 and p.size == len(self.body) for p in parts)
        finding.value = listed
        if not listed:
            finding.detail = "ListParts answers without the part just uploaded"

    async def abort(self) -> None:
        if self._upload is None:
            return
        key, upload_id = self._upload
        finding = self.report.findings[Capability.ABORT_MULTIPART]
        try:
            await self.store.abort_multipart_upload(key, upload_id)
        except NotSupported as exc:
            finding.value, finding.detail = False, f"{exc.op} answered {exc.code}"
            self.report.problem(Severity.WARNING, (
                f"{self.where('AbortMultipartUpload', key)}: the store cannot abort uploads"
                f" ({exc.code}): the probe's upload is left to the bucket's lifecycle rule"))
            self._upload = None
            return
        except StoreError as exc:
            self.unknown(Capability.ABORT_MULTIPART, exc)
            self.report.problem(Severity.WARNING, f"{exc}: the probe's upload {upload_id} is"
                                " left to the bucket's lifecycle rule")
            self._upload = None
            return
        self._upload = None
        finding.value = True

    def learned(self, capability: Capability, unknown_detail: str) -> None:
        """The store's own verdict on its answers, as push reaches it."""
        finding = self.report.findings[capability]
        finding.value = self.store.capabilities[capability]
        if finding.value is None:
            finding.detail = unknown_detail

    def unknown(self, capability: Capability, exc: StoreError) -> None:
        self.report.findings[capability].detail = f"{exc.op or 'probe'} failed: {exc.code or exc}"
        self.report.problem(Severity.WARNING, f"{exc}: {capability.value} could not be probed")

    def failed(self, capability: Capability, exc: StoreError, consequence: str) -> None:
        self.report.findings[capability].detail = f"{exc.op or 'probe'} failed"
        self.report.problem(Severity.UPLOADS_FAIL, f"{exc}: {consequence}")

    async def delete(self, key: str) -> None:
        try:
            await self.store.delete_object(key)
        except StoreError as exc:
            self.report.problem(Severity.WARNING, f"{exc}: the probe object is left behind")

    async def clean(self) -> None:
        """Remove whatever is left under the probe prefix (best effort: a store that denies
        listing or deleting is reported, never fatal)."""
        await self.abort()
        try:
            keys = [info.key async for info in self.store.list_objects(self.prefix)]
        except StoreError as exc:
            self.report.problem(Severity.WARNING, (
                f"{exc}: cannot check that nothing is left under {self.prefix}"
                " (push --reconcile needs ListObjectsV2)"))
            return
        for key in keys:
            await self.delete(key)


def clock_severity(skew: float) -> Severity | None:
    """How bad a clock ``skew`` seconds off the store's is, or None when it is fine."""
    if abs(skew) > SKEW_REFUSED:
        return Severity.MISCONFIGURED
    if abs(skew) > SKEW_WARNING:
        return Severity.WARNING
    return None


async def probe(config: DoctorConfig, session: ReadSession) -> Report:
    """Every probe, in the order that lets each use the one before, on the store of
    ``session`` (its bucket not yet checked); the report says what was found, and its
    problems what is wrong."""
    report = Report(config.destination.url, config.store.endpoint_url,
                    direct_uploads=config.store.direct_uploads)
    store = await session.store()
    probes = Probes(store, config, report)
    await probes.settings()
    try:
        await store.check_bucket()
    except TransientStoreError as exc:
        attempts = config.store.max_attempts
        report.problem(Severity.MISCONFIGURED, f"store unreachable: {exc} (gave up after"
                       f" {attempts} attempt{'s' if attempts > 1 else ''})")
        return report
    except FatalStoreError as exc:
        report.problem(Severity.MISCONFIGURED, str(exc))
        return report
    report.reachable = True
    try:
        existing = await probes.put()
        await probes.wrong_md5()
        await probes.conditional(existing)
        await probes.multipart()
    finally:
        await probes.clean()
    return report


def record(manifest: Manifest, scope: Scope, report: Report) -> None:
    """Keep what was shown for push and watch; what stayed unknown keeps its old value."""
    for capability, value in report.known().items():
        if value is not None:
            manifest.learn_capability(scope, capability.value, value)


async def run_doctor(config: DoctorConfig, out: TextIO | None = None) -> int:
    """Probe, record, print; return the exit code."""
    out = out or sys.stdout
    # The manifest is opened first: a state directory that cannot hold the findings fails
    # before any probe. The store knows nothing beforehand: what the manifest holds is what
    # this run is to check. The bucket check is a probe of its own, after the clock's.
    async with Pipeline.open_read(config.destination, config.store, state_dir=config.state_dir,
                                  manifest=ManifestUse.WRITE, fresh_capabilities=True,
                                  check_bucket=False) as session:
        try:
            report = await probe(config, session)
        except FatalStoreError as exc:  # the client could not even be configured
            report = Report(config.destination.url, config.store.endpoint_url,
                            direct_uploads=config.store.direct_uploads)
            report.problem(Severity.MISCONFIGURED, str(exc))
        assert session.manifest is not None  # ManifestUse.WRITE
        # Under the scope push names this store by: what doctor learns is found by push.
        record(session.manifest, session.scope, report)
    if config.json:
        out.write(json.dumps(report.as_json(), ensure_ascii=False) + "\n")
    elif not config.quiet and report.reachable:
        out.write("\n".join(report.lines()) + "\n")
    out.flush()
    for problem in report.problems:
        (log.warning if problem.severity is Severity.WARNING else log.error)("%s", problem.message)
    return report.exit_code
