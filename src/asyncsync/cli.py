"""The `asyncsync` command: arguments in, a frozen config out, one call, an exit code.

No business logic lives here. Exit codes: 0 everything uploaded or unchanged, 1 some files
failed (or the store could not be reached), 2 bad usage or configuration, 130/143 when
interrupted by SIGINT/SIGTERM (multipart uploads in flight are kept and resume next run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .config import (
    PushConfig,
    WatchConfig,
    check_settings,
    push_config_from,
    watch_config_from,
)
from .errors import (
    EXIT_CLOSED_PIPE,
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    AsyncsyncError,
    ConfigError,
    first_error,
)
from .names import PrintableFormatter, printable
from .options import (
    BY_NAME,
    CLI_COMMANDS,
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    Kind,
    Option,
    Settings,
    describe,
    format_size,
    options_for,
    resolve,
)

if TYPE_CHECKING:
    # prometheus_client is imported only when push is asked for metrics.
    from .service.metrics import Metrics

log = logging.getLogger("asyncsync")

_LAYERS_EPILOG = (
    f"Every option can also be set as {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}MAX_MEMORY=64MiB) "
    "or as a key of the --config TOML file (max_memory = \"64MiB\"); flags win over the "
    "environment, which wins over the file. `asyncsync config` shows the result."
)


# Two or three real command lines per command, shown at the end of its --help.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "push": (
        "asyncsync push ./runs s3://ml-artifacts/runs",
        "asyncsync push ./runs s3://ml-artifacts/runs --workers 100 --max-bandwidth 200MB/s",
        "asyncsync push /data/runs s3://archive/runs --shard auto/8 --json",
    ),
    "watch": (
        "asyncsync watch /runs s3://ml-artifacts/node-7/runs --metrics-addr :9100",
        "asyncsync watch ./runs s3://ml-artifacts/runs --delete-after 7d --keep 'weights/best.pt'",
    ),
    "run": (
        "asyncsync run ./runs s3://ml-artifacts/runs -- yolo train data=coco8.yaml "
        "model=yolov8n.pt",
        "asyncsync run ./runs s3://ml-artifacts/runs --metrics-addr :9100 -- python train.py",
    ),
    "pull": (
        "asyncsync pull s3://ml-artifacts/runs/detect/train2 ./restored/train2",
        "asyncsync pull s3://ml-artifacts/runs ./runs --workers 64 --with-history",
    ),
    "verify": (
        "asyncsync verify ./runs s3://ml-artifacts/runs",
        "asyncsync verify ./runs s3://ml-artifacts/runs --deep --json",
    ),
    "runs": (
        "asyncsync runs s3://ml-artifacts/runs",
        "asyncsync runs s3://ml-artifacts/runs --json | jq 'select(.status == \"crashed\")'",
    ),
    "status": (
        "asyncsync status",
        "asyncsync status --state-dir /var/lib/asyncsync --json",
    ),
    "doctor": (
        "asyncsync doctor s3://ml-artifacts/runs",
        "asyncsync doctor s3://ml-artifacts/runs --endpoint-url http://minio:9000 --json",
    ),
    "shards": (
        "asyncsync shards s3://archive/runs",
        "asyncsync shards s3://archive/runs --json",
    ),
    "metrics-export": (
        "asyncsync metrics export s3://ml-artifacts/runs -o runs.om",
        "promtool tsdb create-blocks-from openmetrics runs.om /var/lib/prometheus/metrics2",
    ),
    "config": (
        "asyncsync config watch",
        "asyncsync config --config asyncsync.toml push --workers 64",
    ),
    "serve": (
        "asyncsync serve s3://ml-artifacts/runs",
        "asyncsync serve s3://ml-artifacts/runs --addr 0.0.0.0:8080 --auth-file "
        "/etc/asyncsync/browser-users --presign",
    ),
    "completion": (
        "source <(asyncsync completion bash)",
        "asyncsync completion fish > ~/.config/fish/completions/asyncsync.fish",
    ),
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, but a paragraph of indented lines (the examples) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            paragraph if paragraph.startswith("  ") or paragraph.endswith(":")
            else super(_HelpFormatter, self)._fill_text(paragraph, width, indent)
            for paragraph in paragraphs
        )


def _with_examples(name: str, epilog: str | None) -> str:
    """The epilog, then the examples: what a reader of --help sees last."""
    lines = "\n".join(f"  {example}" for example in EXAMPLES[name])
    return (f"{epilog}\n\n" if epilog else "") + f"examples:\n\n{lines}"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 with one line (its default prints the usage too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"asyncsync: error: {message} (see --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` (the COMMAND word of argv), only that
    command's options are added (the others' commands are still listed by --help): adding
    every command's options, twice with `config`'s, took a no-op push some 15 ms."""

    def options(subparser: argparse.ArgumentParser, name: str, top: str) -> None:
        if command is None or command == top:
            add_options(subparser, name)

    parser = _ArgumentParser(
        prog="asyncsync",
        description="Keep ML training run directories mirrored in S3-compatible storage.",
    )
    parser.add_argument("--version", action="version", version=f"asyncsync {__version__}")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True,
                                     parser_class=_ArgumentParser)
    push = commands.add_parser(
        "push",
        help="upload a directory tree once (only what changed)",
        description="Mirror SRC to s3://BUCKET/PREFIX: keys are PREFIX/<path relative to SRC>. "
        "Unchanged files (per the manifest) are skipped without being read; nothing is ever "
        "deleted from the bucket.", epilog=_LAYERS_EPILOG,
    )
    push.add_argument("source", metavar="SRC", help="local directory to upload")
    push.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(push, "push", "push")

    watch = commands.add_parser(
        "watch",
        help="keep a directory mirrored while training writes it (a daemon)",
        description="Keep SRC mirrored to s3://BUCKET/PREFIX: files are uploaded once they "
        "have been still for --settle seconds, never torn; runs until SIGTERM/SIGINT, then "
        "sends what changed and exits 0.", epilog=_LAYERS_EPILOG,
    )
    watch.add_argument("source", metavar="SRC", help="directory to keep mirrored (may not "
                       "exist yet)")
    watch.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(watch, "watch", "watch")

    run = commands.add_parser(
        "run",
        help="run a training command and keep its output directory mirrored",
        description="Start COMMAND, keep DIR mirrored to s3://BUCKET/PREFIX while it runs "
        "(as watch does), forward SIGTERM/SIGINT to it, flush when it ends however it ends, "
        "and exit with its exit code (128+N if it died of signal N).",
        usage="asyncsync run [options] DIR DEST -- COMMAND [ARGS...]", epilog=_LAYERS_EPILOG,
    )
    run.add_argument("source", metavar="DIR", help="where the training writes (may not exist "
                     "yet)")
    run.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(run, "run", "run")

    doctor = commands.add_parser(
        "doctor",
        help="probe a store: what it supports, what asyncsync does about each gap",
        description="Probe s3://BUCKET[/PREFIX] with the store options push would use: the "
        "bucket, the clock, and each capability (CRC32 echo, ListParts, abort, MD5 ETags, "
        "Content-MD5 checks, conditional writes), under PREFIX/_asyncsync/doctor-*/, removed "
        "afterwards. What it finds is kept in the manifest for push and watch. Exit 0: the "
        "store works; 1: uploads would fail; 2: bad configuration, unreachable bucket, clock "
        "off by more than 5 minutes.", epilog=_LAYERS_EPILOG,
    )
    doctor.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(doctor, "doctor", "doctor")

    pull = commands.add_parser(
        "pull",
        help="download a prefix (a run, or every run) into a local directory",
        description="Restore s3://BUCKET/PREFIX[/RUN] into DEST: keys below the prefix become "
        "paths below DEST; files already there with the object's digest are skipped; every "
        "file is placed whole (temp file, fsync, rename) and checked against the object's "
        "xxh128; gzip bodies written by push --gzip are restored to their original bytes. "
        "Nothing is ever written outside DEST.", epilog=_LAYERS_EPILOG,
    )
    pull.add_argument("source", metavar="SRC", help="s3://BUCKET[/PREFIX[/RUN]]")
    pull.add_argument("destination", metavar="DEST", help="local directory (created if "
                      "missing)")
    options(pull, "pull", "pull")

    verify = commands.add_parser(
        "verify",
        help="check that the bucket holds what the local tree has",
        description="Compare SRC with s3://BUCKET/PREFIX in one listing: missing objects, "
        "size and digest mismatches, objects without a digest, objects with no local file "
        "(reported, never deleted). Reads the manifest read-only, so it runs beside watch. "
        "Exit 0: everything matches; 1: a mismatch.", epilog=_LAYERS_EPILOG,
    )
    verify.add_argument("source", metavar="SRC", help="local directory")
    verify.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(verify, "verify", "verify")

    runs = commands.add_parser(
        "runs",
        help="list the training runs under a prefix and how each ended",
        description="Every run under s3://BUCKET/PREFIX: status (running, finished, crashed, "
        "stale), host, start and end, epochs, the main metrics, size and last sync.",
        epilog=_LAYERS_EPILOG,
    )
    runs.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(runs, "runs", "runs")

    shards = commands.add_parser(
        "shards",
        help="the state of a sharded push (push --shard I/N) at a glance",
        description="Every shard's completion report under s3://BUCKET/PREFIX/_asyncsync/"
        "shards/: done, running, missing or failed, with totals and throughput. Exit 0 when "
        "all N shards are done without failures, 1 otherwise.", epilog=_LAYERS_EPILOG,
    )
    shards.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX] as given "
                        "to push --shard")
    options(shards, "shards", "shards")

    serve = commands.add_parser(
        "serve",
        help="a read-only web page of the runs under a prefix: status, sync, curves, plots",
        description="Serve the run browser of s3://BUCKET/PREFIX on --addr (loopback unless "
        "told otherwise; any other address needs --auth-file or $ASYNCSYNC_SERVE_TOKEN): the "
        "runs with their status and sync state, each run's training curves, plots, args.yaml, "
        "record, weights and pull command, and curves of several runs compared. Objects are "
        "streamed through the server (ranges passed through), or with --presign handed out "
        "as short-lived presigned URLs. Nothing is ever written to the bucket. Runs until "
        "SIGINT/SIGTERM.", epilog=_LAYERS_EPILOG,
    )
    serve.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    options(serve, "serve", "serve")

    metrics = commands.add_parser(
        "metrics", help="training metrics for Prometheus: export past runs as OpenMetrics",
        description="Tools around asyncsync's Prometheus metrics.",
    )
    metrics_commands = metrics.add_subparsers(dest="metrics_command", metavar="COMMAND",
                                              required=True, parser_class=_ArgumentParser)
    export = metrics_commands.add_parser(
        "export",
        help="every run's results.csv as OpenMetrics, one sample per epoch (backfill)",
        description="Read each run's results.csv under s3://BUCKET/PREFIX (or a local runs "
        "tree) and write OpenMetrics with one sample per epoch, timestamped by the epoch's "
        "end, for `promtool tsdb create-blocks-from openmetrics FILE DATA`. An epoch ends at "
        "the run record's start plus results.csv's `time` column; without `time`, the epochs "
        "are spread evenly from the record's start to its end; without a record, the last "
        "ends at results.csv's LastModified (mtime) and those before it `time` apart, else "
        "60 s apart. Exit 1 when some run could not be read or dated (a warning each).",
        epilog=_LAYERS_EPILOG,
    )
    export.add_argument("source", metavar="SRC", help="s3://BUCKET[/PREFIX] or a local "
                        "directory of runs")
    export.add_argument("--run", dest="run_glob", metavar="GLOB", default=None,
                        help="only the runs whose path matches GLOB (fnmatch, e.g. "
                        "'detect/train*')")
    export.add_argument("-o", "--output", metavar="FILE", default="-",
                        help="where to write (default: stdout)")
    options(export, "metrics-export", "metrics")

    status = commands.add_parser(
        "status",
        help="what the local manifest knows: per source, destination and run",
        description="From the manifest alone (read-only, no network): per source and "
        "destination and per run directory, files total, uploaded, pending, failed, bytes "
        "and the last sync.", epilog=_LAYERS_EPILOG,
    )
    options(status, "status", "status")

    config = commands.add_parser(
        "config",
        help="print the effective settings and where each came from",
        description="Print the settings a command would run with, as TOML, each with where "
        "it came from (default, file, env, flag); without a command, those of push, watch "
        "and run. A bad file, key or value is one error line and exit 2.",
        epilog=_LAYERS_EPILOG,
    )
    _add_config_file_option(config, default=None)
    which = config.add_subparsers(dest="config_command", metavar="COMMAND",
                                  parser_class=_ArgumentParser)
    for name in CLI_COMMANDS:
        options(which.add_parser(name, help=f"the settings of {name}"), name, "config")

    completion = commands.add_parser(
        "completion", help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for SHELL, generated from these very commands "
        "and options. bash: `source <(asyncsync completion bash)` in ~/.bashrc, or save it "
        "as /etc/bash_completion.d/asyncsync; zsh: save it as _asyncsync in a directory of "
        "$fpath; fish: save it as ~/.config/fish/completions/asyncsync.fish.",
    )
    completion.add_argument("shell", metavar="SHELL", choices=("bash", "zsh", "fish"),
                            help="bash, zsh or fish")
    for name, subparser in commands.choices.items():
        if name in EXAMPLES:
            subparser.epilog = _with_examples(name, subparser.epilog)
    export.epilog = _with_examples("metrics-export", export.epilog)
    return parser


def _add_config_file_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--config", dest="config_file", metavar="FILE", default=default,
                        help=f"TOML file of settings (default: ${CONFIG_FILE_ENV}, else none)")


def _help(option: Option, command: str) -> str:
    """The table's help and its default, as --help shows them."""
    default = option.default_for(command)
    if option.default_text:
        shown = f": {option.default_text}"
    elif option.kind is Kind.SIZE:
        shown = f" {format_size(default)}"
    elif option.kind is Kind.SECONDS:
        low = f", at least {option.minimum:g}" if option.minimum else ""
        shown = f" {default:g}{low}"
    elif option.kind is Kind.GLOBS and default:
        shown = " " + " ".join(default)
    elif option.kind in (Kind.INT, Kind.CHOICE):
        shown = f" {default}"
    else:  # flags are off unless given; a count starts where the default is
        shown = ""
    described = option.help_for(command)
    text = f"{described} (default{shown})" if shown else described
    return text.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``, generated from the option table. Defaults are suppressed:
    the namespace holds only the flags given, so that `options.resolve` can tell a flag from
    the environment, the file and the default below it."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options_for(command):
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(option.group)
        common: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS,
                                  "help": _help(option, command)}
        if option.kind is Kind.FLAG:
            action = "store_false" if option.negated else "store_true"
            group.add_argument(*option.spellings, action=action, **common)
        elif option.kind is Kind.COUNT:
            group.add_argument(*option.spellings, action="count", **common)
        else:
            metavar = option.metavar or "{" + ",".join(option.choices) + "}"
            action = "append" if option.kind is Kind.GLOBS else "store"
            group.add_argument(*option.spellings, action=action, metavar=metavar, **common)
    _add_config_file_option(parser, default=argparse.SUPPRESS)


def _config_file(args: argparse.Namespace) -> str | None:
    return getattr(args, "config_file", None) or os.environ.get(CONFIG_FILE_ENV) or None


def _given_flags(args: argparse.Namespace, command: str) -> dict[str, Any]:
    return {name: value for name, value in vars(args).items()
            if name in BY_NAME and BY_NAME[name].applies_to(command)}


def settings_of(args: argparse.Namespace) -> Settings:
    """The command's settings: flags > ASYNCSYNC_* > --config file > defaults, validated
    once. The typed values are also set on ``args`` (``args.json``, ``args.quiet``, ...)."""
    settings = getattr(args, "settings", None)
    if isinstance(settings, Settings):
        return settings
    command = getattr(args, "subcommand", "push")
    if command == "metrics":  # the option table names the subcommand: metrics-export
        command = f"metrics-{args.metrics_command}"
    settings = resolve(command, flags=_given_flags(args, command), environ=os.environ,
                       file=_config_file(args))
    args.settings = settings
    for name, value in settings.items():
        setattr(args, name, value)
    return settings


def push_config(args: argparse.Namespace, *, source_may_be_missing: bool = False) -> PushConfig:
    """Validate the arguments once; everything downstream reads the frozen result."""
    return push_config_from(settings_of(args), source=args.source,
                            destination=args.destination,
                            source_may_be_missing=source_may_be_missing)


class _LowercaseLevelFormatter(PrintableFormatter):
    """'asyncsync: warning: ...', the way compilers and coreutils print diagnostics; every
    message escaped (`names.PrintableFormatter`)."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors on Kubernetes parse without rules."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            # json.dumps escapes C0 controls but, with ensure_ascii=False, leaves C1 controls,
            # U+2028/U+2029 (line breaks to str.splitlines and some log shippers) and bidi
            # overrides raw: the message is escaped as in the text format.
            "message": printable(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def __init__(self) -> None:
        super().__init__()
        self.converter = time.gmtime  # the "Z" in the timestamps means UTC


def configure_logging(verbose: int, quiet: bool, log_format: str = "text") -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(
        verbose, logging.DEBUG
    )
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_LowercaseLevelFormatter("asyncsync: %(levelname)s: %(message)s"))
    root = logging.getLogger("asyncsync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def run_push_command(args: argparse.Namespace) -> int:
    from .commands.push import run_push
    from .pipeline.budget import release_large_buffers_promptly
    from .report import Reporter

    config = push_config(args)
    release_large_buffers_promptly()
    reporter = Reporter(
        json_lines=args.json,
        progress=sys.stderr.isatty() and not args.json and not args.quiet,
    )

    metrics = None
    if config.metrics_textfile is not None or config.pushgateway is not None:
        from .service.metrics import Metrics

        metrics = Metrics(run_depth=config.run_depth, source=str(config.source))

    async def main() -> None:
        progress = asyncio.create_task(reporter.draw_progress())
        try:
            await run_push(config, reporter, metrics)
        finally:
            progress.cancel()

    interrupted = _run_with_signals(main)
    summary = reporter.finish(quiet=args.quiet)
    if interrupted:
        log.error("interrupted: partial multipart uploads are kept; run again to resume")
        code = 128 + interrupted
    else:
        code = EXIT_SOME_FAILED if summary["failed"] else EXIT_OK
    if metrics is not None:
        export_push_metrics(config, metrics, code)
    return code


def export_push_metrics(config: PushConfig, metrics: Metrics, code: int) -> None:
    """push's metrics, once it is over: to the textfile and/or the Pushgateway. A failure
    is one error line; the upload's exit code stands (what was uploaded is uploaded)."""
    import socket

    metrics.finished(code)
    if config.metrics_textfile is not None:
        try:
            metrics.write_textfile(str(config.metrics_textfile))
        except OSError as exc:
            log.error("--metrics-textfile %s: not written: %s", config.metrics_textfile,
                      exc.strerror or exc)
    if config.pushgateway is not None:
        try:
            metrics.push_to_gateway(config.pushgateway, "asyncsync-push", socket.gethostname())
        except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
            log.error("--pushgateway %s: not pushed: %s", config.pushgateway,
                      getattr(exc, "reason", None) or exc)


def _run_command(main: Callable[[], Awaitable[int]]) -> int:
    """Run a command's coroutine under the signal policy; its exit code, or 128+N if the
    first signal N cancelled it (what it started is still cleaned up, by its own finally)."""
    codes: list[int] = []

    async def wrapped() -> None:
        codes.append(await main())

    interrupted = _run_with_signals(wrapped)
    if interrupted:
        return 128 + interrupted
    return codes[0]


def run_doctor_command(args: argparse.Namespace) -> int:
    from .commands.doctor import doctor_config_from, run_doctor

    config = doctor_config_from(settings_of(args), args.destination)
    # The first SIGINT/SIGTERM cancels the probes, which still remove what they made.
    return _run_command(lambda: run_doctor(config))


def run_pull_command(args: argparse.Namespace) -> int:
    from .commands.pull import pull_config_from, run_pull

    config = pull_config_from(settings_of(args), args.source, args.destination)
    return _run_command(lambda: run_pull(config))


def run_verify_command(args: argparse.Namespace) -> int:
    from .commands.verify import run_verify, verify_config_from

    config = verify_config_from(settings_of(args), args.source, args.destination)
    return _run_command(lambda: run_verify(config))


def run_runs_command(args: argparse.Namespace) -> int:
    from .commands.runs import run_runs, runs_config_from

    config = runs_config_from(settings_of(args), args.destination)
    return _run_command(lambda: run_runs(config))


def run_serve_command(args: argparse.Namespace) -> int:
    from .commands.serve import run_serve, serve_config_from

    config = serve_config_from(settings_of(args), args.destination)
    # The first SIGINT/SIGTERM cancels the server, which closes its sockets and the store.
    return _run_command(lambda: run_serve(config))


def run_metrics_export_command(args: argparse.Namespace) -> int:
    from .commands.metrics_export import export_config_from, run_export

    config = export_config_from(settings_of(args), args.source, run_glob=args.run_glob,
                                output=args.output)
    return _run_command(lambda: run_export(config))


def run_shards_command(args: argparse.Namespace) -> int:
    from .commands.shards import run_shards, shards_config_from

    config = shards_config_from(settings_of(args), args.destination)
    return _run_command(lambda: run_shards(config))


def run_status_command(args: argparse.Namespace) -> int:
    from .commands.status import run_status, status_config_from

    return run_status(status_config_from(settings_of(args)))


def watch_config(args: argparse.Namespace) -> WatchConfig:
    return watch_config_from(settings_of(args), source=args.source,
                             destination=args.destination)


def run_watch_command(args: argparse.Namespace) -> int:
    from .commands.watch import run_watch
    from .pipeline.budget import release_large_buffers_promptly

    config = watch_config(args)
    browser = None
    if args.serve is not None:
        from .commands.serve import serve_config_from

        browser = serve_config_from(settings_of(args), config.push.destination,
                                    address=args.serve)
    release_large_buffers_promptly()
    if config.low_priority:
        lower_priority()
    status = None
    if sys.stderr.isatty() and args.log_format == "text" and not args.quiet:
        # On a terminal, a status line that refreshes in place, below the log records.
        from .service.statusline import StatusLine, StatusLineHandler

        status = StatusLine(sys.stderr)
        root = logging.getLogger("asyncsync")
        handler = StatusLineHandler(sys.stderr, status)
        handler.setFormatter(root.handlers[0].formatter)
        root.handlers[:] = [handler]
    # The daemon handles the signals itself: the first drains (exit 0), a second exits.
    with asyncio.Runner() as runner:
        runner.run(run_watch(config, status, browser=browser))
    return EXIT_OK


def run_run_command(args: argparse.Namespace) -> int:
    from .commands.run import run_training
    from .pipeline.budget import release_large_buffers_promptly

    command = args.training_command
    if not command:
        raise ConfigError("no command to run: asyncsync run DIR DEST -- COMMAND [ARGS...]")
    config = watch_config(args)  # cleanup options are watch's: run never has them
    release_large_buffers_promptly()
    if config.low_priority:
        lower_priority()
    # The daemon handles the signals itself: the first goes to the training, a second
    # kills it and exits.
    with asyncio.Runner() as runner:
        return runner.run(run_training(config, command))


# ioprio_set's number depends on the architecture (x86_64 has its own table; aarch64 uses
# the generic one): another architecture's number would make some other system call, so
# where the number is not known here the I/O class is left alone.
_IOPRIO_SET = {"x86_64": 251, "amd64": 251, "aarch64": 30, "arm64": 30}


def ioprio_set_number(machine: str | None = None) -> int | None:
    """The ioprio_set syscall number on this Linux machine's architecture, or None."""
    if machine is None:
        if not sys.platform.startswith("linux"):
            return None
        machine = os.uname().machine
    return _IOPRIO_SET.get(machine.lower())


def lower_priority() -> None:
    """Nice 10 for CPU, and the idle I/O class where Linux allows it (ioprio_set)."""
    os.nice(10)
    number = ioprio_set_number()
    if number is None:  # another OS or architecture: CPU niceness alone
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        who_process, idle_class = 1, 3
        libc.syscall(number, who_process, 0, idle_class << 13)
    except (OSError, AttributeError):  # no libc syscall(): CPU niceness alone
        pass


def run_config_command(args: argparse.Namespace) -> int:
    """``asyncsync config``: the effective settings, as TOML, and where each came from."""
    file = _config_file(args)
    commands = [args.config_command] if args.config_command else list(CLI_COMMANDS)
    blocks = []
    for command in commands:
        settings = resolve(command, flags=_given_flags(args, command), environ=os.environ,
                           file=file)
        check_settings(settings)
        blocks.append("\n".join(describe(settings)))
    layers = f"config file {file} > defaults" if file else "defaults (no config file)"
    header = f"# asyncsync settings: flags > {ENV_PREFIX}* variables > {layers}"
    print(header, *blocks, sep="\n\n")
    return EXIT_OK


def run_completion_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .commands.completion import run_completion

    return run_completion(parser, args.shell)


def _run_with_signals(main: Any) -> int:
    """Run ``main`` (push) under the one signal policy (`service.signals.Signals`): the
    first SIGINT/SIGTERM cancels ``main``; a second one exits at once with 128+N. Return the
    first signal's number, or 0."""
    from .service.signals import Signals

    with asyncio.Runner() as runner:
        task_holder: list[asyncio.Task[None]] = []

        def drain(signum: int) -> None:
            log.warning("%s received: stopping (again to force)", signal.Signals(signum).name)
            if task_holder:
                task_holder[0].cancel()

        signals = Signals(drain)
        signals.install(runner.get_loop())

        async def wrapper() -> None:
            task_holder.append(asyncio.current_task())  # type: ignore[arg-type]
            await main()

        try:
            runner.run(wrapper())
        except asyncio.CancelledError:
            if signals.first is None:
                raise
    return signals.first or 0


def closed_pipe() -> int:
    """stdout's reader went away (`| head`, `jq` done, `less` quit): stop quietly, as `yes`
    does, with no traceback. What was uploaded is recorded in the manifest; uploads in
    flight were cancelled as on SIGTERM (multipart ones resume). stdout is pointed at
    /dev/null first: what is still buffered would fail again when Python exits."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_CLOSED_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """The command line ``argv``; without one, the process's own: then main is the
    program's entry point (the ``asyncsync`` script, ``python -m asyncsync``) and ends the
    process itself once the command is done (`_exit`)."""
    if argv is None:
        try:
            code = _main(sys.argv[1:])
        except KeyboardInterrupt:
            # Ctrl-C while Python's own handler was still in place (start-up, before the
            # command's `Signals`): nothing had begun that needs a drain, so no traceback.
            code = 128 + signal.SIGINT
        _exit(code)
    return _main(argv)


def _exit(code: int) -> NoReturn:
    """End the process with ``code`` once the command has finished, without the
    interpreter's teardown: freeing every module's objects one by one took a no-op push
    ~25 ms of its ~200. Everything the command wrote is flushed and closed by then (the
    manifest, the store session, every file); stdio and the log handlers are flushed here.
    A thread still running (none should be) gets the ordinary exit, which waits for it."""
    import threading

    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.exit(code)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = closed_pipe()
    except (OSError, ValueError):  # stdout already closed: nothing left to write there
        pass
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    # The parser needs only the options of the command it is given (an unknown word is
    # refused by name all the same); the completion script is generated from all of them.
    command = argv[0] if argv and not argv[0].startswith("-") and argv[0] != "completion" \
        else None
    parser = build_parser(command)
    # `run`'s training command comes after "--" and is never parsed as our options.
    training_command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        split = argv.index("--")
        argv, training_command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    args.training_command = training_command
    # Errors of the settings themselves are printed before the settings say how to log.
    configure_logging(0, False)
    try:
        if args.subcommand == "config":
            return run_config_command(args)
        if args.subcommand == "completion":  # the parser alone: no settings to resolve
            return run_completion_command(parser, args)
        settings_of(args)
        configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False),
                          getattr(args, "log_format", "text"))
        if args.subcommand == "push":
            return run_push_command(args)
        if args.subcommand == "watch":
            return run_watch_command(args)
        if args.subcommand == "run":
            return run_run_command(args)
        if args.subcommand == "doctor":
            return run_doctor_command(args)
        if args.subcommand == "pull":
            return run_pull_command(args)
        if args.subcommand == "verify":
            return run_verify_command(args)
        if args.subcommand == "runs":
            return run_runs_command(args)
        if args.subcommand == "shards":
            return run_shards_command(args)
        if args.subcommand == "serve":
            return run_serve_command(args)
        if args.subcommand == "metrics":
            return run_metrics_export_command(args)
        if args.subcommand == "status":
            return run_status_command(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except AsyncsyncError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except BrokenPipeError:
        return closed_pipe()
    except Exception as exc:  # a bug: say so plainly, with the traceback to report
        if isinstance(exc, BaseExceptionGroup) and isinstance(first_error(exc), BrokenPipeError):
            return closed_pipe()
        log.error("internal error: %s: %s (please report this)", type(exc).__name__, exc,
                  exc_info=True)
        return EXIT_SOME_FAILED
    parser.error(f"unknown command {args.subcommand!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

