"""Settings, parsed and validated once into frozen objects that the running pipeline only reads.

options.py's table fills and validates each option (flags, ``ASYNCSYNC_*``, the config file,
attach()'s keywords); `push_config_from` and `watch_config_from` here add SRC and DEST and
the checks that involve several options, and build the frozen `PushConfig` / `WatchConfig`.
Nothing downstream re-parses strings or looks at the environment, except the store, which
takes credentials from the standard AWS chain and nowhere else.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:  # options.py imports this module; the builders only need the type
    from .options import Settings
    from .pipeline.shard import Shard

MiB = 1024 * 1024
GiB = 1024 * MiB

# S3's multipart limits: every part but the last at least 5 MiB, at most 5 GiB, 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024 * GiB

DEFAULT_WORKERS = 32
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
DEFAULT_MAX_MEMORY = 64 * MiB
DEFAULT_PART_CONCURRENCY = 8
DEFAULT_RETRIES = 6
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 120.0
# Runs are directories this many levels below SRC (runs/detect/train: 2).
DEFAULT_RUN_DEPTH = 1
DEFAULT_SHARD_BY = "run"  # pipeline/shard.py's BY_RUN
DEFAULT_CHECKPOINT_MANIFEST = 60.0  # seconds between copies of a shard's manifest
# Each full scan stats every file under SRC: 0.1 s on 20,000 files kept a core 38% busy
# (0 was taken as 0.1). Half a second is as often as anything needs it: inotify events wake
# the daemon sooner anyway, and watch's own benchmark scans no faster.
MIN_SCAN_INTERVAL = 0.5
# Below this a run that merely paused (a long epoch, an evaluation) could be cleaned while
# it still writes: such values need --allow-short-delete-after.
MIN_DELETE_AFTER = 600.0
# Descriptors a run needs besides its workers': stdio, the manifest with its WAL and
# shared-memory files, the event loop's epoll and wake-up pipe, inotify, the scanner's
# directory descriptors, DNS lookups, the metrics listener.
RESERVED_DESCRIPTORS = 64

# Content types that compress well; weights and images are already dense.
DEFAULT_GZIP_SUFFIXES = (".csv", ".yaml", ".yml", ".json", ".txt", ".log", ".jsonl", ".tsv")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?)?b?\s*$", re.IGNORECASE)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_seconds(
    value: str | float, *, what: str, minimum: float = 0.0, positive: bool = False,
    why: str = "",
) -> float:
    """'10', '0.5', 10 -> seconds: finite (nan, inf and 1e400 are refused), at least
    ``minimum``, above 0 if ``positive``; ``why`` says why a minimum is what it is."""
    text = str(value).strip()
    try:
        if isinstance(value, bool):
            raise ValueError(text)
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {text}: not a number of seconds") from None
    if not math.isfinite(seconds):
        raise ConfigError(f"{what} {text}: must be a finite number of seconds")
    if positive and seconds <= 0:
        raise ConfigError(f"{what} {text}: must be more than 0 s")
    if seconds < minimum:
        reason = f" ({why})" if why else ""
        bound = f"be at least {minimum:g} s" if minimum else "not be negative"
        raise ConfigError(f"{what} {text}: must {bound}{reason}")
    return seconds


def parse_size(text: str, *, what: str) -> int:
    """'64MiB', '64M', '1.5GB', '1048576' -> bytes. K/M/G/T are binary multiples either way."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"{what}: {text!r} is not a size (examples: 64MiB, 16M, 1G, 1048576)")
    number, unit = match.groups()
    scale = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}[(unit or "").lower()]
    return int(float(number) * scale)


@dataclass(frozen=True)
class Destination:
    """Where the tree goes: ``s3://bucket/prefix`` or ``file:///path``."""

    scheme: str  # "s3" or "file"
    bucket: str  # the bucket, or the root directory for file://
    prefix: str  # no leading or trailing slash; "" for the bucket root

    @property
    def url(self) -> str:
        if self.scheme == "file":
            base = f"file://{self.bucket}"
            return f"{base}/{self.prefix}" if self.prefix else base
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key_for(self, relative_path: str) -> str:
        return f"{self.prefix}/{relative_path}" if self.prefix else relative_path


def parse_destination(text: str) -> Destination:
    if text.startswith("file://"):
        path = text[len("file://"):]
        if not path.startswith("/"):
            raise ConfigError(f"destination {text!r}: a file:// destination needs an absolute path")
        return Destination("file", os.path.normpath(path), "")
    if not text.startswith("s3://"):
        raise ConfigError(
            f"destination {text!r}: expected s3://BUCKET[/PREFIX] (or file:///PATH)"
        )
    rest = text[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"destination {text!r}: no bucket name after s3://")
    _check_bucket_name(bucket, text)
    # Empty segments would become '//' in keys, which some stores fold and others keep.
    prefix = "/".join(part for part in prefix.split("/") if part)
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ConfigError(f"destination {text!r}: '.' and '..' are not allowed in the prefix")
    return Destination("s3", bucket, prefix)


def _check_bucket_name(bucket: str, text: str) -> None:
    problem = ""
    if not 3 <= len(bucket) <= 63:
        problem = "must be 3 to 63 characters long"
    elif not _BUCKET_RE.match(bucket):
        problem = (
            "may hold only lowercase letters, digits, '.' and '-', "
            "and must start and end with a letter or digit"
        )
    elif ".." in bucket:
        problem = "must not contain '..'"
    else:
        try:
            ipaddress.IPv4Address(bucket)
            problem = "must not look like an IP address"
        except ValueError:
            pass
    if problem:
        raise ConfigError(f"destination {text!r}: invalid bucket name {bucket!r}: {problem}")


def default_state_dir() -> Path:
    """$ASYNCSYNC_STATE_DIR, else $XDG_STATE_HOME/asyncsync, else ~/.local/state/asyncsync."""
    explicit = os.environ.get("ASYNCSYNC_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "asyncsync"


@dataclass(frozen=True)
class StoreConfig:
    """How to reach the object store. Credentials are deliberately absent: the AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"  # "auto", "path" or "virtual"
    max_attempts: int = DEFAULT_RETRIES
    backoff_base: float = 0.1
    backoff_cap: float = 20.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = DEFAULT_WORKERS + DEFAULT_PART_CONCURRENCY
    # Send bodies through the lean signed path (s3direct); off: through botocore.
    direct_uploads: bool = True


@dataclass(frozen=True)
class TransferConfig:
    """Sizes and bounds of the transfer stage."""

    workers: int = DEFAULT_WORKERS
    max_memory: int = DEFAULT_MAX_MEMORY
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    part_size: int | None = None  # None: chosen from each file's size
    part_concurrency: int = DEFAULT_PART_CONCURRENCY
    gzip: bool = False
    gzip_suffixes: tuple[str, ...] = DEFAULT_GZIP_SUFFIXES
    # How often one file is re-read when it keeps changing under the upload.
    changed_retries: int = 3
    max_bandwidth: float | None = None  # bytes/s over all transfers; None: unlimited
    content_type: str | None = None  # every object's; None: from each file's name
    # Read every object back after its upload and compare it with what was read.
    verify_after_upload: bool = False
    # Content the bucket already holds (same digest, recorded by this manifest) is copied
    # server-side instead of being sent again.
    dedup: bool = True


@dataclass(frozen=True)
class PushConfig:
    source: Path
    destination: Destination
    state_dir: Path
    store: StoreConfig = field(default_factory=StoreConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    reconcile: bool = False
    dry_run: bool = False
    # push's metrics, written when it ends (watch and run serve theirs instead).
    metrics_textfile: Path | None = None
    pushgateway: str | None = None
    run_depth: int = DEFAULT_RUN_DEPTH  # what the metrics' run label names (and --shard's unit)
    shard: Shard | None = None
    checkpoint_manifest: float = DEFAULT_CHECKPOINT_MANIFEST


def validate_source(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"source {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"source {str(path)!r} is not a directory")
    return path.resolve()


def validate_endpoint(url: str | None) -> str | None:
    if url is None or url == "":
        return None
    if "@" in url:
        # Checked first, and the URL never quoted: every other message here repeats it.
        host = url.rpartition("@")[2].split("/", 1)[0]
        raise ConfigError(
            f"endpoint URL ...@{host}: credentials in the endpoint URL are not allowed; "
            "use the AWS credential chain"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"endpoint URL {url!r}: expected http(s)://HOST[:PORT]")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"endpoint URL {url!r}: {exc}") from exc
    return url


def check_destination_outside(source: Path, destination: Destination) -> None:
    """A file:// mirror inside SRC would be uploaded by the next push to S3, and its own
    store state with it. Compared as resolved paths, component by component: /data/run2
    is not inside /data/run."""
    if destination.scheme != "file":
        return
    root = Path(destination.bucket).resolve()
    if root.is_relative_to(source.resolve()):
        raise ConfigError(
            f"destination {destination.url}: lies inside SRC {str(source)!r}; "
            "choose a directory outside it"
        )


def check_delete_after(seconds: float, text: str, *, allow_short: bool) -> float:
    if not math.isfinite(seconds):
        raise ConfigError(f"--delete-after {text}: must be a finite duration")
    if seconds < MIN_DELETE_AFTER and not allow_short:
        raise ConfigError(
            f"--delete-after {text}: under {MIN_DELETE_AFTER / 60:g} minutes, a run that only "
            "paused could lose its local files; add --allow-short-delete-after to mean it"
        )
    return seconds


def descriptors_needed(workers: int, connections: int, *, direct_uploads: bool) -> int:
    """Open files one run may hold at once: each worker a file and its directory, the
    upload pool its connections, botocore's pool one control call per worker besides."""
    control = workers if direct_uploads else 0
    return 2 * workers + connections + control + RESERVED_DESCRIPTORS


def ensure_open_files(needed: int, *, workers: int) -> None:
    """Raise the soft RLIMIT_NOFILE toward the hard limit when ``needed`` exceeds it, as
    most servers do; if the hard limit is lower still, fail now with one line instead of
    "Too many open files" for every file past the limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX: no such limit to check
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # macOS caps it below the hard limit
            pass
    if soft < needed:
        raise ConfigError(
            f"--workers {workers}: needs about {needed} open files, but the limit is {soft}; "
            f"use fewer workers or raise the limit (ulimit -n {needed})"
        )


@dataclass(frozen=True)
class CleanupSettings:
    """Local cleanup after upload (off unless ``delete_after`` is set)."""

    delete_after: float
    keep: tuple[str, ...] = ()
    dry_run: bool = False
    run_depth: int = DEFAULT_RUN_DEPTH


@dataclass(frozen=True)
class WatchConfig:
    """The daemon: the push pipeline's settings plus when and how often to act."""

    push: PushConfig
    interval: float = 10.0  # full stat scan period without the event path
    rescan_interval: float = 120.0  # safety-net full scan period with the event path
    events: bool = True  # inotify (watchfiles) wakes the daemon early
    settle: float = 5.0
    checkpoint_interval: float = 300.0
    checkpoint_globs: tuple[str, ...] = ("*.pt",)
    history_globs: tuple[str, ...] = ("*.csv",)
    grace: float = 30.0
    metrics_addr: tuple[str, int] | None = None
    low_priority: bool = False
    cleanup: CleanupSettings | None = None
    cleanup_interval: float = 300.0
    # Runs are directories this many levels below SRC (runs/detect/train: 2): the unit of
    # cleanup, of the metrics' run label and of the daemon's per-run state.
    run_depth: int = DEFAULT_RUN_DEPTH
    # Per-run series are bounded: in time (a run quiet this long loses them) and in number.
    metrics_run_ttl: float = 24 * 3600.0
    metrics_max_runs: int = 1000


# -- from validated settings to the frozen configs ------------------------------------------


def _connections(settings: Settings) -> int:
    # Enough connections that the pool never caps the workers: every worker, plus the parts
    # the byte budget lets be in flight at once (aiobotocore's default is 10).
    return int(settings["workers"]) + max(int(settings["part_concurrency"]),
                                          int(settings["max_memory"]) // MIN_PART_SIZE)


def check_settings(settings: Settings) -> None:
    """The checks that involve several options but neither SRC nor DEST, so that
    ``asyncsync config`` refuses what the command itself would refuse."""
    if settings.get("shard"):
        from .pipeline.shard import parse_shard  # a push without --shard does not load it

        try:  # auto/N reads $JOB_COMPLETION_INDEX: a pod with a bad index stops here
            parse_shard(settings["shard"])
        except ConfigError as exc:
            raise settings.error("shard", str(exc)) from None
    workers = int(settings["workers"])
    needed = descriptors_needed(workers, _connections(settings),
                                direct_uploads=bool(settings["direct_uploads"]))
    try:
        ensure_open_files(needed, workers=workers)
    except ConfigError as exc:
        raise settings.error("workers", str(exc)) from None
    check_addressing_style(settings)
    cleanup_from(settings)


def endpoint_from(settings: Settings) -> str | None:
    """--endpoint-url, else AWS's own variables, as botocore would read them. The option
    was validated with the others; the variables are checked here."""
    return settings.get("endpoint_url") or validate_endpoint(_aws_endpoint_variable()[1])


def _aws_endpoint_variable() -> tuple[str, str | None]:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return name, os.environ[name]
    return "", None


def check_addressing_style(settings: Settings) -> None:
    """Virtual-hosted addressing puts the bucket in the host name, which an IP address
    cannot carry: botocore then quietly addresses by path, so asking for it is a mistake."""
    if settings.get("addressing_style") != "virtual":
        return
    endpoint = endpoint_from(settings)
    host = urlsplit(endpoint).hostname if endpoint else None
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return
    variable = "" if settings.get("endpoint_url") else _aws_endpoint_variable()[0]
    origin = f" (from ${variable})" if variable else ""
    raise settings.error(
        "addressing_style",
        f"--addressing-style virtual: the endpoint {endpoint}{origin} is an IP address, "
        "which cannot carry the bucket in its host name (botocore would quietly address "
        "by path); use --addressing-style path",
    )


def cleanup_from(settings: Settings) -> CleanupSettings | None:
    """Local cleanup, when ``delete_after`` is set (watch only: other commands lack it)."""
    seconds = settings.get("delete_after")
    if seconds is not None:
        try:
            delete_after = check_delete_after(seconds, settings.text("delete_after"),
                                              allow_short=settings["allow_short_delete_after"])
        except ConfigError as exc:
            raise settings.error("delete_after", str(exc)) from None
        return CleanupSettings(delete_after=delete_after, keep=settings["keep"],
                               dry_run=settings["delete_dry_run"],
                               run_depth=settings["run_depth"])
    stray = [name for name in ("keep", "delete_dry_run", "allow_short_delete_after")
             if settings.get(name)]
    if stray:
        raise settings.error(stray[0], "--keep, --delete-dry-run and "
                             "--allow-short-delete-after need --delete-after")
    return None


def store_config_from(settings: Settings, *, connections: int | None = None) -> StoreConfig:
    """The store settings every command that talks to S3 reads (push, watch, run, doctor,
    pull, verify, runs), written once. ``connections``: the HTTP pool's size, when the
    command runs more requests at once than the default allows."""
    check_addressing_style(settings)
    return StoreConfig(
        endpoint_url=endpoint_from(settings), region=settings["region"],
        profile=settings["profile"], addressing_style=settings["addressing_style"],
        max_attempts=settings["retries"], connect_timeout=settings["connect_timeout"],
        read_timeout=settings["read_timeout"],
        max_connections=connections or StoreConfig.max_connections,
        direct_uploads=settings["direct_uploads"],
    )


def store_config_for_workers(settings: Settings, workers: int, connections: int) -> StoreConfig:
    """`store_config_from` for a reader running ``workers`` transfers over ``connections``
    (pull, verify): the process must be allowed the descriptors they need (exit 2 naming
    --workers otherwise)."""
    try:
        ensure_open_files(descriptors_needed(workers, connections,
                                             direct_uploads=bool(settings["direct_uploads"])),
                          workers=workers)
    except ConfigError as exc:
        raise settings.error("workers", str(exc)) from None
    return store_config_from(settings, connections=connections)


def push_config_from(
    settings: Settings, *, source: str | Path, destination: str,
    source_may_be_missing: bool = False,
) -> PushConfig:
    """SRC, DEST and validated settings (`options.resolve` / `options.from_mapping`) ->
    the frozen PushConfig everything downstream reads."""
    dest = parse_destination(destination)
    if source_may_be_missing and not Path(source).exists():
        src = Path(source).absolute()
    else:
        src = validate_source(Path(source))
    check_destination_outside(src, dest)
    check_settings(settings)
    store = store_config_from(settings, connections=_connections(settings))
    transfer = TransferConfig(
        workers=settings["workers"], max_memory=settings["max_memory"],
        multipart_threshold=settings["multipart_threshold"], part_size=settings["part_size"],
        part_concurrency=settings["part_concurrency"], gzip=settings["gzip"],
        max_bandwidth=settings["max_bandwidth"], content_type=settings["content_type"],
        verify_after_upload=settings["verify_after_upload"], dedup=settings["dedup"],
    )
    state_dir = settings["state_dir"] or default_state_dir()
    shard = None
    if settings.get("shard"):
        from .pipeline.shard import parse_shard

        try:
            shard = parse_shard(settings["shard"], by=settings["shard_by"],
                                run_depth=settings["run_depth"])
        except ConfigError as exc:
            raise settings.error("shard", str(exc)) from None
        # Its own manifest (and temp dir), even where shards share a disk.
        state_dir = state_dir / "shards" / f"{shard.count}-{shard.index}"
    textfile = settings.get("metrics_textfile")
    if textfile is not None and not textfile.absolute().parent.is_dir():
        # Found out now, not after an hour of uploads when the file cannot be written.
        raise settings.error("metrics_textfile", f"--metrics-textfile {textfile}: the "
                             "directory it would be written in does not exist")
    return PushConfig(
        source=src, destination=dest, state_dir=state_dir.absolute(), store=store,
        transfer=transfer, include=settings["include"], exclude=settings["exclude"],
        follow_symlinks=settings["follow_symlinks"],
        # The options only push takes are absent from watch's and attach()'s settings.
        reconcile=settings.get("reconcile", PushConfig.reconcile),
        dry_run=settings.get("dry_run", PushConfig.dry_run),
        metrics_textfile=settings.get("metrics_textfile"), pushgateway=settings.get("pushgateway"),
        run_depth=settings.get("run_depth", DEFAULT_RUN_DEPTH), shard=shard,
        checkpoint_manifest=settings.get("checkpoint_manifest", DEFAULT_CHECKPOINT_MANIFEST),
    )


def watch_config_from(settings: Settings, *, source: str | Path, destination: str) -> WatchConfig:
    """The daemon's frozen config (watch, run): SRC may not exist yet."""
    cleanup = cleanup_from(settings)
    return WatchConfig(
        push=push_config_from(settings, source=source, destination=destination,
                              source_may_be_missing=True),
        interval=settings["interval"], rescan_interval=settings["rescan_interval"],
        events=settings["events"], settle=settings["settle"],
        checkpoint_interval=settings["checkpoint_interval"],
        checkpoint_globs=settings["checkpoint_glob"], history_globs=settings["history_glob"],
        grace=settings["grace"], metrics_addr=settings["metrics_addr"],
        low_priority=settings["low_priority"], cleanup=cleanup,
        run_depth=settings["run_depth"], metrics_run_ttl=settings["metrics_run_ttl"],
        metrics_max_runs=settings["metrics_max_runs"],
    )
