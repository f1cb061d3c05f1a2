"""The option table: every setting of push, watch, run and attach() written once — name,
kind, default, help, environment variable, the commands that take it — and the layers that
fill it: flags > ``ASYNCSYNC_*`` environment > TOML file (``--config``) > defaults.

rclone's model (one ``Options`` struct that ``configstruct.Set`` fills from flags, the
environment or the config file): the CLI generates its argparse flags from `OPTIONS`,
`resolve` reads the environment, the file and the flags (or attach()'s keywords) and
validates every value once, and config.py's `push_config_from` / `watch_config_from` turn
the result into the frozen configs the pipeline reads. Each value keeps where it came from,
so an error names the flag, variable or file key that was wrong, and ``asyncsync config``
can say where every setting came from.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_CHECKPOINT_MANIFEST,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PART_CONCURRENCY,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_RUN_DEPTH,
    DEFAULT_SHARD_BY,
    DEFAULT_WORKERS,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    MIN_SCAN_INTERVAL,
    CleanupSettings,
    PushConfig,
    StoreConfig,
    TransferConfig,
    WatchConfig,
    parse_seconds,
    parse_size,
    validate_endpoint,
)
from .errors import ConfigError

ENV_PREFIX = "ASYNCSYNC_"
# The variable naming a config file when --config is not given (a ConfigMap mounted in a
# pod, say). It is not an option: a file cannot name another file.
CONFIG_FILE_ENV = "ASYNCSYNC_CONFIG"
CLI_COMMANDS = ("push", "watch", "run")


class Kind(enum.Enum):
    """How a raw value (a flag's text, an environment string, a TOML or Python value)
    becomes a typed one."""

    FLAG = "true or false"
    COUNT = "count"
    INT = "whole number"
    SECONDS = "seconds"
    SIZE = "size"
    RATE = "rate"
    DURATION = "duration"
    CHOICE = "choice"
    TEXT = "text"
    MEDIA_TYPE = "media type"
    URL = "url"
    PATH = "path"
    ADDRESS = "host:port"
    GLOBS = "globs"


@dataclass(frozen=True)
class Option:
    name: str  # the file key and attach() keyword; ASYNCSYNC_<NAME> in the environment
    kind: Kind
    default: Any  # typed, as the configs hold it; None: unset (see default_text)
    help: str
    commands: frozenset[str]
    group: str  # the --help section
    flags: tuple[str, ...] = ()  # empty: --name-with-dashes
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    why: str = ""  # why the minimum is what it is, for the error message
    default_text: str = ""  # what an unset value means, when the default is not a value
    # A command whose default differs (attach's 8 workers, watch's info-level logging).
    command_defaults: tuple[tuple[str, Any], ...] = ()
    # A command that borrows the option for something else (doctor's --json).
    command_help: tuple[tuple[str, str], ...] = ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def spellings(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def flag(self) -> str:
        """The long flag: how messages name the option, as README and --help do."""
        return self.spellings[-1]

    @property
    def negated(self) -> bool:
        """``--no-events`` sets ``events`` to false."""
        return self.kind is Kind.FLAG and self.flag.startswith("--no-")

    def default_for(self, command: str) -> Any:
        return dict(self.command_defaults).get(command, self.default)

    def help_for(self, command: str) -> str:
        return dict(self.command_help).get(command, self.help)

    def applies_to(self, command: str) -> bool:
        return command in self.commands or self.name in BORROWED.get(command, ())


_UPLOADS = frozenset({"push", "watch", "run", "attach"})
_CLI = frozenset(CLI_COMMANDS)
_DAEMON = frozenset({"watch", "run"})
_PUSH = frozenset({"push"})
_WATCH = frozenset({"watch"})
_SERVE = frozenset({"serve"})
_SCANS = "each full scan stats every file under SRC"

# Defaults are the frozen configs' own (config.py): the table points at them, so a default
# is written in one place and the CLI, the environment, the file and attach() share it.
OPTIONS: tuple[Option, ...] = (
    # -- store ----------------------------------------------------------------------------
    Option("endpoint_url", Kind.URL, StoreConfig.endpoint_url, "S3-compatible endpoint",
           _UPLOADS, "store", metavar="URL",
           default_text="$AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS"),
    Option("region", Kind.TEXT, StoreConfig.region, "region used for signing", _UPLOADS,
           "store", metavar="REGION", default_text="from the AWS configuration"),
    Option("profile", Kind.TEXT, StoreConfig.profile,
           "named profile from the shared AWS config files", _UPLOADS, "store",
           metavar="NAME", default_text="$AWS_PROFILE, else the default profile"),
    Option("addressing_style", Kind.CHOICE, StoreConfig.addressing_style,
           "bucket in the path or in the host name", _UPLOADS, "store",
           choices=("auto", "path", "virtual")),
    Option("direct_uploads", Kind.FLAG, StoreConfig.direct_uploads,
           "send file bodies through botocore's full request pipeline (slower; for stores "
           "that refuse UNSIGNED-PAYLOAD)", _UPLOADS, "store", flags=("--no-direct-uploads",)),
    Option("retries", Kind.INT, DEFAULT_RETRIES, "attempts per request for transient errors",
           _UPLOADS, "store", metavar="N", minimum=1),
    Option("connect_timeout", Kind.SECONDS, DEFAULT_CONNECT_TIMEOUT,
           "give up on a connection attempt after this long", _UPLOADS, "store",
           metavar="SECONDS", positive=True),
    Option("read_timeout", Kind.SECONDS, DEFAULT_READ_TIMEOUT,
           "give up on a request after this long without an answer, or with its body stalled",
           _UPLOADS, "store", metavar="SECONDS", positive=True),
    # -- transfer -------------------------------------------------------------------------
    # attach() uploads fewer files at once: a run directory holds a few dozen files, and
    # the training owns the machine.
    Option("workers", Kind.INT, DEFAULT_WORKERS,
           "files transferred at once; the HTTP pool is sized to match", _UPLOADS, "transfer",
           metavar="N", minimum=1, command_defaults=(("attach", 8),)),
    Option("max_memory", Kind.SIZE, DEFAULT_MAX_MEMORY,
           "bound on bytes buffered in flight, across all workers", _UPLOADS, "transfer",
           metavar="SIZE", minimum=MIN_PART_SIZE, why="one part"),
    Option("multipart_threshold", Kind.SIZE, DEFAULT_MULTIPART_THRESHOLD,
           "files larger than this use multipart uploads", _UPLOADS, "transfer",
           metavar="SIZE", minimum=MIN_PART_SIZE, why="S3's smallest part"),
    Option("part_size", Kind.SIZE, TransferConfig.part_size,
           "fixed multipart part size (raised if 10,000 parts would not suffice)", _UPLOADS,
           "transfer", metavar="SIZE", minimum=MIN_PART_SIZE, maximum=MAX_PART_SIZE,
           default_text="chosen from each file's size",
           command_help=(("pull", "size of one ranged GET of a large object "
                                  "(default 8MiB)"),)),
    Option("part_concurrency", Kind.INT, DEFAULT_PART_CONCURRENCY,
           "parts of one file in flight", _UPLOADS, "transfer", metavar="N", minimum=1,
           command_help=(("pull", "ranges of one object in flight"),)),
    Option("include", Kind.GLOBS, PushConfig.include, "only files matching GLOB (repeatable)",
           _UPLOADS, "transfer", metavar="GLOB", default_text="everything"),
    Option("exclude", Kind.GLOBS, PushConfig.exclude,
           "skip files matching GLOB (repeatable; wins over --include)", _UPLOADS, "transfer",
           metavar="GLOB", default_text="nothing"),
    Option("max_bandwidth", Kind.RATE, TransferConfig.max_bandwidth,
           "cap on upload bandwidth over all transfers (e.g. 50MB/s, 40MiB/s)", _UPLOADS,
           "transfer", metavar="RATE", default_text="unlimited",
           command_help=(("pull", "cap on download bandwidth over all transfers (e.g. "
                                  "50MB/s, 40MiB/s)"),)),
    Option("gzip", Kind.FLAG, TransferConfig.gzip,
           "gzip csv/yaml/json/txt/log files of 1 KiB or more that shrink (stored with "
           "Content-Encoding: gzip: aws cli, s5cmd and rclone download them compressed)",
           _UPLOADS, "transfer"),
    Option("content_type", Kind.MEDIA_TYPE, TransferConfig.content_type,
           "Content-Type of every object", _UPLOADS, "transfer", metavar="TYPE",
           default_text="from each file's name (image/png, text/csv, application/yaml...)"),
    Option("verify_after_upload", Kind.FLAG, TransferConfig.verify_after_upload,
           "read every object back after its upload and compare it with the file "
           "(twice the traffic; for stores that prove nothing)", _UPLOADS, "transfer"),
    Option("dedup", Kind.FLAG, TransferConfig.dedup,
           "send every file's bytes, even where the bucket holds the same content already "
           "(by default such a file is copied there server-side)", _UPLOADS, "transfer",
           flags=("--no-dedup",)),
    Option("follow_symlinks", Kind.FLAG, PushConfig.follow_symlinks,
           "follow symlinks that stay inside SRC (never outside)", _UPLOADS, "transfer"),
    Option("state_dir", Kind.PATH, None, "where the manifest lives", _UPLOADS, "transfer",
           metavar="DIR",
           default_text="$XDG_STATE_HOME/asyncsync, else ~/.local/state/asyncsync"),
    # -- push -----------------------------------------------------------------------------
    Option("reconcile", Kind.FLAG, PushConfig.reconcile,
           "list the destination once and re-send objects missing or changed there; "
           "rebuilds a lost manifest without re-uploading", _PUSH, "push"),
    Option("dry_run", Kind.FLAG, PushConfig.dry_run,
           "show what would be uploaded; send nothing", _PUSH, "push",
           command_help=(("pull", "show what would be downloaded; write nothing"),)),
    Option("shard", Kind.TEXT, None,
           "upload only shard I of N (I/N, or auto/N with I from $JOB_COMPLETION_INDEX): N "
           "processes with the same N upload every file exactly once", _PUSH, "push",
           metavar="I/N", default_text="the whole tree"),
    Option("shard_by", Kind.CHOICE, DEFAULT_SHARD_BY,
           "what --shard splits: run directories (--run-depth; each shard walks only its "
           "own) or single files (a tree that is one huge directory)", _PUSH, "push",
           choices=("run", "file")),
    Option("checkpoint_manifest", Kind.SECONDS, DEFAULT_CHECKPOINT_MANIFEST,
           "with --shard: copy the shard's manifest to PREFIX/_asyncsync/shards/ this often "
           "(and at exit), so a replacement pod resumes from it; 0: at exit only", _PUSH,
           "push", metavar="SECONDS"),
    # -- pull, verify ---------------------------------------------------------------------
    Option("with_history", Kind.FLAG, False,
           "also restore the history copies watch kept of append-only files "
           "(PREFIX/_asyncsync/history/)", frozenset({"pull"}), "pull"),
    Option("deep", Kind.FLAG, False,
           "download and re-hash every object (ranged, parallel, bounded memory) instead of "
           "trusting its xxh128 metadata", frozenset({"verify"}), "verify"),
    # -- output ---------------------------------------------------------------------------
    Option("json", Kind.FLAG, False,
           "one JSON object per file on stdout, then a summary object", _PUSH, "output",
           command_help=(("doctor", "the findings as one JSON object on stdout"),
                         ("verify", "one JSON object per problem on stdout, then a summary"),
                         ("runs", "one JSON object per run on stdout"),
                         ("status", "the state as one JSON object on stdout"),
                         ("shards", "one JSON object per shard on stdout, then a summary"))),
    Option("quiet", Kind.FLAG, False, "errors only", _CLI, "output", flags=("-q", "--quiet")),
    # A count: each -v adds one to what the environment, the file or the default set.
    Option("verbose", Kind.COUNT, 0,
           "more detail: 1 logs each upload decision (watch and run do by default), "
           "2 debug (push: also unchanged files)", _CLI, "output",
           flags=("-v", "--verbose"), minimum=0,
           command_defaults=(("watch", 1), ("run", 1))),
    # -- when to upload (watch, run) ------------------------------------------------------
    Option("interval", Kind.SECONDS, WatchConfig.interval,
           "full stat scan period (with inotify events, --rescan-interval applies instead)",
           _DAEMON, "when to upload", metavar="SECONDS", minimum=MIN_SCAN_INTERVAL,
           why=_SCANS),
    Option("rescan_interval", Kind.SECONDS, WatchConfig.rescan_interval,
           "safety-net full scan period while inotify events are used", _DAEMON,
           "when to upload", metavar="SECONDS", minimum=MIN_SCAN_INTERVAL, why=_SCANS),
    Option("events", Kind.FLAG, WatchConfig.events,
           "do not use inotify; rely on the periodic scan alone", _DAEMON, "when to upload",
           flags=("--no-events",)),
    Option("settle", Kind.SECONDS, WatchConfig.settle,
           "upload a file once its size and mtime held still this long", _DAEMON,
           "when to upload", metavar="SECONDS"),
    Option("checkpoint_interval", Kind.SECONDS, WatchConfig.checkpoint_interval,
           "upload checkpoints at most this often; 0 = every settled version", _DAEMON,
           "when to upload", metavar="SECONDS"),
    Option("checkpoint_glob", Kind.GLOBS, WatchConfig.checkpoint_globs,
           "what counts as a checkpoint (repeatable)", _DAEMON, "when to upload",
           metavar="GLOB"),
    Option("history_glob", Kind.GLOBS, WatchConfig.history_globs,
           "append-only files whose previous object is kept when they shrink or are "
           "recreated (repeatable)", _DAEMON, "when to upload", metavar="GLOB"),
    Option("grace", Kind.SECONDS, WatchConfig.grace,
           "on SIGTERM/SIGINT, wait this long for uploads", _DAEMON, "when to upload",
           metavar="SECONDS"),
    # -- daemon ---------------------------------------------------------------------------
    Option("metrics_addr", Kind.ADDRESS, WatchConfig.metrics_addr,
           "serve /healthz, /readyz and /metrics here (e.g. :9100)", _DAEMON | {"attach"},
           "metrics", metavar="HOST:PORT", default_text="off"),
    Option("metrics_textfile", Kind.PATH, PushConfig.metrics_textfile,
           "when done, write the metrics here in node_exporter's textfile format "
           "(atomically: a temp file, then a rename)", _PUSH, "metrics", metavar="PATH",
           default_text="off"),
    Option("pushgateway", Kind.URL, PushConfig.pushgateway,
           "when done, push the metrics to this Prometheus Pushgateway (job asyncsync-push, "
           "instance = this host)", _PUSH, "metrics", metavar="URL", default_text="off"),
    Option("metrics_run_ttl", Kind.DURATION, WatchConfig.metrics_run_ttl,
           "drop a run's series once nothing of it was seen this long (e.g. 24h)",
           _DAEMON | {"attach"}, "metrics", metavar="DURATION"),
    Option("metrics_max_runs", Kind.INT, WatchConfig.metrics_max_runs,
           "at most this many runs have series; more are counted in "
           "asyncsync_metrics_dropped_total", _DAEMON | {"attach"}, "metrics", metavar="N",
           minimum=1),
    Option("low_priority", Kind.FLAG, WatchConfig.low_priority,
           "run at low CPU and idle I/O priority, so training comes first", _DAEMON, "daemon"),
    Option("log_format", Kind.CHOICE, "text",
           "json: one JSON object per log line (for Kubernetes)", _DAEMON, "daemon",
           choices=("text", "json")),
    # -- local cleanup (watch only: run refuses it, and a shared file must not break run) --
    Option("delete_after", Kind.DURATION, None,
           "delete a run's local files once the run has been quiet this long (e.g. 2h, 7d) "
           "and each file is verified in the bucket", _WATCH, "local cleanup (off by default)",
           metavar="DURATION", default_text="off"),
    Option("allow_short_delete_after", Kind.FLAG, False,
           "allow a --delete-after under 10 minutes (e.g. for a scratch disk)", _WATCH,
           "local cleanup (off by default)"),
    Option("keep", Kind.GLOBS, CleanupSettings.keep,
           "never delete these (repeatable; e.g. weights/best.pt)", _WATCH,
           "local cleanup (off by default)", metavar="GLOB", default_text="nothing"),
    Option("delete_dry_run", Kind.FLAG, CleanupSettings.dry_run,
           "log what cleanup would delete; delete nothing", _WATCH,
           "local cleanup (off by default)"),
    Option("run_depth", Kind.INT, DEFAULT_RUN_DEPTH,
           "runs are directories N levels below SRC (runs/detect/train is 2): the unit of "
           "cleanup and of the per-run metrics", _DAEMON | _PUSH, "daemon", metavar="N",
           minimum=1),
    # -- the run browser (serve, watch --serve) -------------------------------------------
    Option("addr", Kind.ADDRESS, ("127.0.0.1", 8080),
           "serve the run browser here; beyond loopback only with --auth-file or "
           "$ASYNCSYNC_SERVE_TOKEN", _SERVE, "browser", metavar="HOST:PORT",
           default_text="127.0.0.1:8080"),
    Option("serve", Kind.ADDRESS, None,
           "also serve the run browser of DEST here, with this node's live sync state "
           "(e.g. 127.0.0.1:8080)", _WATCH, "browser", metavar="HOST:PORT",
           default_text="off"),
    Option("auth_file", Kind.PATH, None,
           "require HTTP basic auth: one 'user:scrypt$...' line per user (README: Browsing "
           "runs)", _SERVE | _WATCH, "browser", metavar="FILE", default_text="none"),
    Option("presign", Kind.FLAG, False,
           "hand the browser short-lived presigned URLs for objects instead of streaming "
           "them through the server", _SERVE | _WATCH, "browser"),
    Option("presign_expiry", Kind.SECONDS, 300.0,
           "how long a presigned URL stays valid", _SERVE | _WATCH, "browser",
           metavar="SECONDS", minimum=1.0, why="a URL must live long enough to be used"),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}

# `asyncsync doctor` probes the store an upload would talk to, so it takes the options that
# reach that store, where the manifest lives (what it learns is kept there for push and
# watch) and how to print. It borrows them by name: ``commands`` stays the list of commands
# that upload. A config file's top-level keys apply to doctor as to push; it has no section
# of its own (the store is configured for the uploads, and doctor must see that store).
# The read side borrows the same way: pull, verify and runs read the store the uploads
# wrote (pull with the transfer bounds of an upload), status reads the manifest alone.
_STORE_OPTIONS = frozenset({
    "endpoint_url", "region", "profile", "addressing_style", "direct_uploads", "retries",
    "connect_timeout", "read_timeout",
})
_OUTPUT = frozenset({"json", "quiet", "verbose"})
BORROWED: dict[str, frozenset[str]] = {
    "doctor": _STORE_OPTIONS | _OUTPUT | {"state_dir"},
    "pull": _STORE_OPTIONS | _OUTPUT | {
        "workers", "max_memory", "part_size", "part_concurrency", "include", "exclude",
        "max_bandwidth", "dry_run",
    },
    "verify": _STORE_OPTIONS | _OUTPUT | {
        "state_dir", "workers", "max_memory", "include", "exclude", "follow_symlinks",
    },
    "runs": _STORE_OPTIONS | _OUTPUT | {"run_depth"},
    "status": _OUTPUT | {"state_dir"},
    "metrics-export": _STORE_OPTIONS | {"quiet", "verbose", "run_depth"},
    "shards": _STORE_OPTIONS | _OUTPUT,
    "serve": _STORE_OPTIONS | {"quiet", "verbose", "run_depth"},
}
# Every command an option may name, besides the borrowing above.
COMMANDS = ("push", "watch", "run", "attach", "doctor", "pull", "verify", "runs", "status",
            "metrics-export", "shards", "serve")


def options_for(command: str) -> tuple[Option, ...]:
    return tuple(option for option in OPTIONS if option.applies_to(command))


# -- where a value came from -----------------------------------------------------------------


class Source(enum.Enum):
    DEFAULT = "default"
    FILE = "file"
    ENV = "env"
    FLAG = "flag"
    KEYWORD = "keyword"


@dataclass(frozen=True)
class Origin:
    source: Source
    where: str = ""  # prefixes an error about the value; "" when the message names it
    detail: str = ""  # for `asyncsync config`: the variable, the flag, the file's section

    def qualify(self, message: str) -> str:
        """``message`` names the option by its flag; say where the value was set too."""
        return f"{self.where}: {message}" if self.where else message

    def describe(self) -> str:
        return f"{self.source.value} {self.detail}".strip()


DEFAULT = Origin(Source.DEFAULT)


@dataclass(frozen=True)
class Setting:
    option: Option
    value: Any  # typed and validated
    origin: Origin
    raw: Any  # as it was written, for messages that quote it


class Settings(Mapping[str, Any]):
    """One command's settings, each validated and carrying where it came from. Reads as a
    mapping of option names to typed values; an option the command does not take is absent
    (so ``settings.get("delete_after")`` is None for run)."""

    def __init__(self, command: str, settings: Mapping[str, Setting],
                 file: Path | None = None) -> None:
        self.command = command
        self.file = file
        self._settings = dict(settings)

    def __getitem__(self, name: str) -> Any:
        return self._settings[name].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def setting(self, name: str) -> Setting:
        return self._settings[name]

    def text(self, name: str) -> str:
        """The value as written: for messages that quote it."""
        return str(self._settings[name].raw)

    def error(self, name: str, message: str) -> ConfigError:
        """A ConfigError about option ``name`` that says where its value was set."""
        setting = self._settings.get(name)
        return ConfigError(setting.origin.qualify(message) if setting else message)


# -- typed values ----------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_WHOLE = re.compile(r"[+-]?\d+")
_SIZE_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_size(size: int) -> str:
    """64 MiB -> '64MiB'; sizes that are no whole number of a binary unit stay in bytes."""
    for unit, scale in _SIZE_UNITS:
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def _whole(option: Option, raw: Any) -> int:
    text = str(raw).strip()
    if isinstance(raw, bool) or not (isinstance(raw, int) or _WHOLE.fullmatch(text)):
        raise ConfigError(f"{option.flag} {text}: not a whole number")
    value = int(text)
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f"{option.flag} {text}: must be at least {option.minimum:g}")
    return value


def _flag(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{raw!r} is not true or false (true/false, 1/0, yes/no, on/off)")


def _size(option: Option, raw: Any) -> int:
    text = str(raw).strip()
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        size = raw
    else:
        size = parse_size(text, what=option.flag)
    low, high = option.minimum, option.maximum
    if low is not None and high is not None and not low <= size <= high:
        raise ConfigError(f"{option.flag} {text}: must be between "
                          f"{format_size(int(low))} and {format_size(int(high))}")
    if low is not None and size < low:
        reason = f" ({option.why})" if option.why else ""
        raise ConfigError(f"{option.flag} {text}: must be at least {format_size(int(low))}"
                          f"{reason}")
    return size


def _text(option: Option, raw: Any) -> str | None:
    if isinstance(raw, os.PathLike) and option.kind is Kind.PATH:
        raw = os.fspath(raw)
    if not isinstance(raw, str):
        raise ConfigError(f"{option.flag} {raw!r}: must be a string")
    # An empty value leaves an optional setting unset, as an empty variable always has.
    return raw or None


def _globs(option: Option, raw: Any) -> tuple[str, ...]:
    # One glob may come alone: attach(exclude="*.jpg"), `include = "*.pt"` in the file.
    items = (raw,) if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{option.flag} {raw!r}: must be a glob or a list of globs")
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{option.flag} {item!r}: a glob must be a string")
    return tuple(items)


def parse_value(option: Option, raw: Any) -> Any:
    """Validate one raw value of ``option``; messages name it by its flag. The checks that
    involve other options (and SRC or DEST) are config.py's."""
    kind = option.kind
    if kind is Kind.FLAG:
        return _flag(raw)
    if kind in (Kind.INT, Kind.COUNT):
        return _whole(option, raw)
    if kind is Kind.SECONDS:
        if not isinstance(raw, str | int | float):
            raise ConfigError(f"{option.flag} {raw!r}: not a number of seconds")
        return parse_seconds(raw, what=option.flag, minimum=option.minimum or 0.0,
                             positive=option.positive, why=option.why)
    if kind is Kind.SIZE:
        return _size(option, raw)
    if kind is Kind.GLOBS:
        return _globs(option, raw)
    if kind is Kind.CHOICE:
        if raw not in option.choices:
            raise ConfigError(f"{option.flag} {raw}: must be one of {', '.join(option.choices)}")
        return raw
    if kind is Kind.RATE and isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = str(raw)  # bytes per second, as a number
    text = _text(option, raw)
    if text is None:
        return None
    if kind is Kind.URL:
        return validate_endpoint(text)
    if kind is Kind.PATH:
        return Path(text)
    if kind is Kind.MEDIA_TYPE:
        from .pipeline.mime import valid_media_type

        if not valid_media_type(text):
            raise ConfigError(f"{option.flag} {text!r}: not a media type (e.g. image/png)")
        return text.strip()
    # Imported when used: the rate limiter, the cleanup and the health server are not
    # needed to read a config (and aiohttp is slow to import).
    if kind is Kind.RATE:
        from .pipeline.ratelimit import parse_rate

        return parse_rate(text)
    if kind is Kind.DURATION:
        from .commands.cleanup import parse_duration

        return parse_duration(text)
    if kind is Kind.ADDRESS:
        from .service.health import parse_listen_address

        return parse_listen_address(text)
    return text


# -- the layers ------------------------------------------------------------------------------

_Layer = dict[str, tuple[Any, Origin]]


def _unknown(name: str, known: list[str]) -> str:
    if name.replace("-", "_") in known:
        return f"unknown key {name!r} (keys use underscores: {name.replace('-', '_')})"
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def read_file(path: str | Path, command: str | None) -> _Layer:
    """The values a TOML config file sets for ``command``: top-level keys (those the
    command takes; the others are for other commands), then the ``[command]`` section.
    Every key of every section is checked, so a typo fails whichever command reads it."""
    import tomllib  # only when there is a file: a command without one does not pay for it

    where = f"config file {path}"
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: not UTF-8 ({exc.reason})") from None
    cli_names = sorted({o.name for o in OPTIONS if o.commands & _CLI})
    layer: _Layer = {}
    for key, value in document.items():
        if key in CLI_COMMANDS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key}: must be a section ([{key}])")
            takes = {o.name for o in options_for(key)}
            for name in value:
                if name not in takes:
                    problem = (f"{key} takes no option {name!r}" if name in cli_names
                               else _unknown(name, sorted(takes)))
                    raise ConfigError(f"{where}: [{key}]: {problem}")
        elif key not in cli_names:
            if isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}]: unknown section "
                                  f"(sections: {', '.join(CLI_COMMANDS)})")
            raise ConfigError(f"{where}: {_unknown(key, cli_names)}")
        elif command is not None and BY_NAME[key].applies_to(command):
            layer[key] = (value, Origin(Source.FILE, f"{where}: {key}"))
    section = document.get(command, {}) if command else {}
    for name, value in section.items():
        layer[name] = (value, Origin(Source.FILE, f"{where}: {command}.{name}", f"[{command}]"))
    return layer


def read_environ(environ: Mapping[str, str], command: str) -> _Layer:
    """``ASYNCSYNC_<NAME>`` for each option of ``command``; an empty variable is unset.
    A repeatable option takes a comma-separated list (CSV: quote a glob holding a comma).
    Variables of other commands and other ``ASYNCSYNC_*`` variables are left alone."""
    layer: _Layer = {}
    for option in options_for(command):
        text = environ.get(option.env, "")
        if not text.strip():
            continue
        origin = Origin(Source.ENV, option.env, option.env)
        value: Any = text
        if option.kind is Kind.GLOBS:
            import csv

            try:
                value = [item for item in next(csv.reader([text], skipinitialspace=True))
                         if item]
            except (csv.Error, StopIteration) as exc:
                raise ConfigError(f"{option.env}: not a comma-separated list: {exc}") from None
        layer[option.name] = (value, origin)
    return layer


def read_keywords(values: Mapping[str, Any], command: str, caller: str) -> _Layer:
    """Keyword options of a library entry point (attach()); None leaves an option unset."""
    takes = sorted(o.name for o in options_for(command))
    layer: _Layer = {}
    for name, value in values.items():
        if name not in takes:
            import difflib

            close = difflib.get_close_matches(name, takes, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{caller}: unknown option {name!r}{hint}")
        if value is not None:
            layer[name] = (value, Origin(Source.KEYWORD, f"{caller}: {name}", name))
    return layer


def resolve(
    command: str, *, flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None, file: str | Path | None = None,
    keywords: Mapping[str, Any] | None = None, caller: str = "attach()",
) -> Settings:
    """Every option of ``command`` from the first layer that sets it — flags (or keyword
    options), then the environment, then the file, then the table's default — validated
    once. ``flags`` holds only the flags given (argparse defaults are suppressed)."""
    layer: _Layer = {}
    if file is not None:
        layer.update(read_file(file, command))
    if environ is not None:
        layer.update(read_environ(environ, command))
    if keywords is not None:
        layer.update(read_keywords(keywords, command, caller))
    counts: dict[str, int] = {}
    for name, value in (flags or {}).items():
        option = BY_NAME[name]
        if option.kind is Kind.COUNT:
            counts[name] = int(value)
        else:
            layer[name] = (value, Origin(Source.FLAG, detail=option.flag))
    settings: dict[str, Setting] = {}
    for option in options_for(command):
        if option.name in layer:
            raw, origin = layer[option.name]
            try:
                value = parse_value(option, raw)
            except ConfigError as exc:
                raise ConfigError(origin.qualify(str(exc))) from None
        else:
            raw = value = option.default_for(command)
            origin = DEFAULT
        if option.name in counts:  # -v adds to the level set below the flags
            value += counts[option.name]
            raw, origin = value, Origin(Source.FLAG, detail=option.spellings[0])
        settings[option.name] = Setting(option, value, origin, raw)
    return Settings(command, settings, Path(file) if file is not None else None)


def from_mapping(command: str, values: Mapping[str, Any], *,
                 caller: str = "attach()") -> Settings:
    """A library entry point's keyword options (``{"workers": 8, "exclude": ["*.jpg"]}``)
    over the table's defaults, validated as the CLI validates its flags; then
    `config.push_config_from` / `config.watch_config_from` build the frozen config. No
    environment, no file: a library call does what its arguments say."""
    return resolve(command, keywords=values, caller=caller)


# -- `asyncsync config` ----------------------------------------------------------------------


def _toml_string(text: str) -> str:
    # json's escapes are TOML's; controls, bidi overrides and line separators are escaped
    # too, so a value can neither break the line nor reorder the terminal.
    import json

    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in quoted)


def _toml_value(setting: Setting) -> str | None:
    option, value = setting.option, setting.value
    if value is None:
        return None
    if option.kind is Kind.FLAG:
        return "true" if value else "false"
    if option.kind in (Kind.INT, Kind.COUNT):
        return str(value)
    if option.kind is Kind.SECONDS:
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if option.kind is Kind.SIZE:
        return _toml_string(format_size(value))
    if option.kind is Kind.GLOBS:
        return "[" + ", ".join(_toml_string(glob) for glob in value) + "]"
    if option.kind is Kind.PATH:
        return _toml_string(str(value))
    # A rate, a duration, an address, text: as written (it has been validated).
    return _toml_string(str(setting.raw).strip())


def describe(settings: Settings) -> list[str]:
    """The effective settings as a TOML section, each line saying where its value came
    from. Options hold no credentials (those come from the AWS chain only), and no AWS_*
    variable is read here: an unset endpoint says which variables decide, not their values."""
    lines = [f"[{settings.command}]"]
    for name in settings:
        setting = settings.setting(name)
        value = _toml_value(setting)
        origin = setting.origin.describe()
        if value is None:
            unset = setting.option.default_text or "unset"
            lines.append(f"# {name}: {unset}".ljust(44) + f"  # {origin}")
        else:
            lines.append(f"{name} = {value}".ljust(44) + f"  # {origin}")
    return lines
