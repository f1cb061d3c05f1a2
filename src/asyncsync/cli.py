"""The `asyncsync` command: arguments in, a frozen config out, one call, an exit code.

No business logic lives here. Exit codes: 0 everything uploaded or unchanged, 1 some files
failed (or the store could not be reached), 2 bad usage or configuration, 130/143 when
interrupted by SIGINT/SIGTERM (multipart uploads in flight are kept and resume next run).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MULTIPART_THRESHOLD,
    DEFAULT_PART_CONCURRENCY,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_WORKERS,
    MIN_DELETE_AFTER,
    MIN_PART_SIZE,
    MIN_SCAN_INTERVAL,
    CleanupSettings,
    PushConfig,
    StoreConfig,
    TransferConfig,
    WatchConfig,
    check_delete_after,
    check_destination_outside,
    default_state_dir,
    descriptors_needed,
    ensure_open_files,
    parse_destination,
    parse_seconds,
    parse_size,
    validate_endpoint,
    validate_source,
)
from .errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, AsyncsyncError, ConfigError
from .names import PrintableFormatter, printable

log = logging.getLogger("asyncsync")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 with one line (its default prints the usage too)."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"asyncsync: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
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
        "deleted from the bucket.",
    )
    push.add_argument("source", metavar="SRC", help="local directory to upload")
    push.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    add_transfer_options(push)
    push.add_argument("--reconcile", action="store_true",
                      help="list the destination once and re-send objects missing or changed "
                      "there; rebuilds a lost manifest without re-uploading")
    push.add_argument("--dry-run", action="store_true",
                      help="show what would be uploaded; send nothing")
    add_output_options(push)

    watch = commands.add_parser(
        "watch",
        help="keep a directory mirrored while training writes it (a daemon)",
        description="Keep SRC mirrored to s3://BUCKET/PREFIX: files are uploaded once they "
        "have been still for --settle seconds, never torn; runs until SIGTERM/SIGINT, then "
        "sends what changed and exits 0.",
    )
    watch.add_argument("source", metavar="SRC", help="directory to keep mirrored (may not "
                       "exist yet)")
    watch.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    add_transfer_options(watch)
    add_watch_options(watch)
    watch.add_argument("-q", "--quiet", action="store_true", help="errors only")
    watch.add_argument("-v", "--verbose", action="count", default=1,
                       help="more detail (-vv: debug); upload decisions are logged by default")

    run = commands.add_parser(
        "run",
        help="run a training command and keep its output directory mirrored",
        description="Start COMMAND, keep DIR mirrored to s3://BUCKET/PREFIX while it runs "
        "(as watch does), forward SIGTERM/SIGINT to it, flush when it ends however it ends, "
        "and exit with its exit code (128+N if it died of signal N).",
        usage="asyncsync run [options] DIR DEST -- COMMAND [ARGS...]",
    )
    run.add_argument("source", metavar="DIR", help="where the training writes (may not exist "
                     "yet)")
    run.add_argument("destination", metavar="DEST", help="s3://BUCKET[/PREFIX]")
    add_transfer_options(run)
    add_watch_options(run)
    run.add_argument("-q", "--quiet", action="store_true", help="errors only")
    run.add_argument("-v", "--verbose", action="count", default=1,
                     help="more detail (-vv: debug)")
    return parser


def add_watch_options(parser: argparse.ArgumentParser) -> None:
    """Options of the daemon (watch, and later run)."""
    when = parser.add_argument_group("when to upload")
    when.add_argument("--interval", default=10.0, metavar="SECONDS",
                      help="full stat scan period (default 10, at least "
                      f"{MIN_SCAN_INTERVAL:g}; with inotify events, --rescan-interval "
                      "applies instead)")
    when.add_argument("--rescan-interval", default=120.0, metavar="SECONDS",
                      help="safety-net full scan period while inotify events are used "
                      f"(default 120, at least {MIN_SCAN_INTERVAL:g})")
    when.add_argument("--no-events", dest="events", action="store_false",
                      help="do not use inotify; rely on the periodic scan alone")
    when.add_argument("--settle", default=5.0, metavar="SECONDS",
                      help="upload a file once its size and mtime held still this long "
                      "(default 5)")
    when.add_argument("--checkpoint-interval", default=300.0, metavar="SECONDS",
                      help="upload checkpoints at most this often; 0 = every settled version "
                      "(default 300)")
    when.add_argument("--checkpoint-glob", action="append", metavar="GLOB",
                      help="what counts as a checkpoint (repeatable; default *.pt)")
    when.add_argument("--history-glob", action="append", metavar="GLOB",
                      help="append-only files whose previous object is kept when they shrink "
                      "or are recreated (repeatable; default *.csv)")
    when.add_argument("--grace", default=30.0, metavar="SECONDS",
                      help="on SIGTERM/SIGINT, wait this long for uploads (default 30)")
    daemon = parser.add_argument_group("daemon")
    daemon.add_argument("--metrics-addr", metavar="HOST:PORT",
                        help="serve /healthz, /readyz and /metrics here (e.g. :9100)")
    daemon.add_argument("--low-priority", action="store_true",
                        help="run at low CPU and idle I/O priority, so training comes first")
    daemon.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per log line (for Kubernetes)")
    cleanup = parser.add_argument_group("local cleanup (off by default)")
    cleanup.add_argument("--delete-after", metavar="DURATION",
                         help="delete a run's local files once the run has been quiet this "
                         "long (e.g. 2h, 7d) and each file is verified in the bucket")
    cleanup.add_argument("--allow-short-delete-after", action="store_true",
                         help="allow a --delete-after under "
                         f"{MIN_DELETE_AFTER / 60:g} minutes (e.g. for a scratch disk)")
    cleanup.add_argument("--keep", action="append", default=[], metavar="GLOB",
                         help="never delete these (repeatable; e.g. weights/best.pt)")
    cleanup.add_argument("--delete-dry-run", action="store_true",
                         help="log what cleanup would delete; delete nothing")
    cleanup.add_argument("--run-depth", type=_positive_int, default=1, metavar="N",
                         help="runs are directories N levels below SRC (default 1; "
                         "runs/detect/train is 2)")


def add_transfer_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that uploads shares (push, and later watch and run)."""
    store = parser.add_argument_group("store")
    store.add_argument("--endpoint-url", metavar="URL",
                       help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    store.add_argument("--region", help="region (default: from the AWS configuration)")
    store.add_argument("--profile", help="named profile from the shared AWS config files")
    store.add_argument("--addressing-style", choices=("auto", "path", "virtual"),
                       default="auto", help="bucket in the path or in the host name")
    store.add_argument("--no-direct-uploads", dest="direct_uploads", action="store_false",
                       help="send file bodies through botocore's full request pipeline "
                       "(slower; for stores that refuse UNSIGNED-PAYLOAD)")
    store.add_argument("--retries", type=_positive_int, default=DEFAULT_RETRIES, metavar="N",
                       help="attempts per request for transient errors "
                       f"(default {DEFAULT_RETRIES})")
    store.add_argument("--connect-timeout", default=DEFAULT_CONNECT_TIMEOUT, metavar="SECONDS",
                       help="give up on a connection attempt after this long (default "
                       f"{DEFAULT_CONNECT_TIMEOUT:g})")
    store.add_argument("--read-timeout", default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                       help="give up on a request after this long without an answer, or "
                       f"with its body stalled (default {DEFAULT_READ_TIMEOUT:g})")
    transfer = parser.add_argument_group("transfer")
    transfer.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS, metavar="N",
                          help=f"files transferred at once (default {DEFAULT_WORKERS})")
    transfer.add_argument("--max-memory", default=f"{DEFAULT_MAX_MEMORY // 2**20}MiB",
                          metavar="SIZE", help="bound on bytes buffered in flight (default "
                          f"{DEFAULT_MAX_MEMORY // 2**20}MiB)")
    transfer.add_argument("--multipart-threshold", metavar="SIZE",
                          default=f"{DEFAULT_MULTIPART_THRESHOLD // 2**20}MiB",
                          help="files larger than this use multipart uploads (default "
                          f"{DEFAULT_MULTIPART_THRESHOLD // 2**20}MiB)")
    transfer.add_argument("--part-size", metavar="SIZE",
                          help="multipart part size (default: chosen from each file's size)")
    transfer.add_argument("--part-concurrency", type=_positive_int, metavar="N",
                          default=DEFAULT_PART_CONCURRENCY,
                          help=f"parts of one file in flight (default {DEFAULT_PART_CONCURRENCY})")
    transfer.add_argument("--include", action="append", default=[], metavar="GLOB",
                          help="only files matching GLOB (repeatable)")
    transfer.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                          help="skip files matching GLOB (repeatable; wins over --include)")
    transfer.add_argument("--max-bandwidth", metavar="RATE",
                          help="cap on upload bandwidth over all transfers (e.g. 50MB/s)")
    transfer.add_argument("--gzip", action="store_true",
                          help="gzip csv/yaml/json/txt/log files (Content-Encoding: gzip)")
    transfer.add_argument("--follow-symlinks", action="store_true",
                          help="follow symlinks that stay inside SRC (never outside)")
    transfer.add_argument("--state-dir", metavar="DIR",
                          help="where the manifest lives (default: $ASYNCSYNC_STATE_DIR, "
                          "else $XDG_STATE_HOME/asyncsync, else ~/.local/state/asyncsync)")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="one JSON object per file on stdout, then a summary object")
    output.add_argument("-q", "--quiet", action="store_true", help="errors only")
    output.add_argument("-v", "--verbose", action="count", default=0,
                        help="log each upload decision (-vv: also unchanged files)")


def _size(text: str | None, what: str) -> int | None:
    return None if text is None else parse_size(text, what=what)


def push_config(args: argparse.Namespace, *, source_may_be_missing: bool = False) -> PushConfig:
    """Validate the arguments once; everything downstream reads the frozen result."""
    from .pipeline.ratelimit import parse_rate

    destination = parse_destination(args.destination)
    if source_may_be_missing and not Path(args.source).exists():
        source = Path(args.source).absolute()
    else:
        source = validate_source(Path(args.source))
    max_memory = _size(args.max_memory, "--max-memory") or 0
    threshold = _size(args.multipart_threshold, "--multipart-threshold") or 0
    part_size = _size(args.part_size, "--part-size")
    if max_memory < MIN_PART_SIZE:
        raise ConfigError(f"--max-memory {args.max_memory}: must be at least 5MiB (one part)")
    if threshold < MIN_PART_SIZE:
        raise ConfigError(f"--multipart-threshold {args.multipart_threshold}: "
                          "must be at least 5MiB (S3's smallest part)")
    if part_size is not None and not MIN_PART_SIZE <= part_size <= 5 * 2**30:
        raise ConfigError(f"--part-size {args.part_size}: must be between 5MiB and 5GiB")
    check_destination_outside(source, destination)
    connect_timeout = parse_seconds(args.connect_timeout, what="--connect-timeout",
                                    positive=True)
    read_timeout = parse_seconds(args.read_timeout, what="--read-timeout", positive=True)
    endpoint = validate_endpoint(
        args.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    # Enough connections that the pool never caps the workers: every worker, plus the parts
    # the byte budget lets be in flight at once (aiobotocore's default is 10).
    connections = args.workers + max(args.part_concurrency, max_memory // MIN_PART_SIZE)
    ensure_open_files(
        descriptors_needed(args.workers, connections, direct_uploads=args.direct_uploads),
        workers=args.workers,
    )
    store = StoreConfig(
        endpoint_url=endpoint, region=args.region, profile=args.profile,
        addressing_style=args.addressing_style, max_attempts=args.retries,
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        max_connections=connections, direct_uploads=args.direct_uploads,
    )
    transfer = TransferConfig(
        workers=args.workers, max_memory=max_memory, multipart_threshold=threshold,
        part_size=part_size, part_concurrency=args.part_concurrency, gzip=args.gzip,
        max_bandwidth=parse_rate(args.max_bandwidth) if args.max_bandwidth else None,
    )
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    return PushConfig(
        source=source, destination=destination, state_dir=state_dir.absolute(), store=store,
        transfer=transfer, include=tuple(args.include), exclude=tuple(args.exclude),
        follow_symlinks=args.follow_symlinks, reconcile=getattr(args, "reconcile", False),
        dry_run=getattr(args, "dry_run", False),
    )


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

    async def main() -> None:
        progress = asyncio.create_task(reporter.draw_progress())
        try:
            await run_push(config, reporter)
        finally:
            progress.cancel()

    interrupted = _run_with_signals(main)
    if interrupted:
        reporter.finish(quiet=args.quiet)
        log.error("interrupted: partial multipart uploads are kept; run again to resume")
        return 128 + interrupted
    summary = reporter.finish(quiet=args.quiet)
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def watch_config(args: argparse.Namespace) -> WatchConfig:
    from .service.health import parse_listen_address

    cleanup = None
    if args.delete_after is not None:
        from .commands.cleanup import parse_duration

        delete_after = check_delete_after(
            parse_duration(args.delete_after), args.delete_after,
            allow_short=args.allow_short_delete_after,
        )
        cleanup = CleanupSettings(
            delete_after=delete_after, keep=tuple(args.keep),
            dry_run=args.delete_dry_run, run_depth=args.run_depth,
        )
    elif args.keep or args.delete_dry_run or args.allow_short_delete_after:
        raise ConfigError(
            "--keep, --delete-dry-run and --allow-short-delete-after need --delete-after"
        )
    scans = "each full scan stats every file under SRC"
    return WatchConfig(
        push=push_config(args, source_may_be_missing=True),
        interval=parse_seconds(args.interval, what="--interval", minimum=MIN_SCAN_INTERVAL,
                               why=scans),
        rescan_interval=parse_seconds(args.rescan_interval, what="--rescan-interval",
                                      minimum=MIN_SCAN_INTERVAL, why=scans),
        events=args.events, settle=parse_seconds(args.settle, what="--settle"),
        checkpoint_interval=parse_seconds(args.checkpoint_interval,
                                          what="--checkpoint-interval"),
        checkpoint_globs=tuple(args.checkpoint_glob or ("*.pt",)),
        history_globs=tuple(args.history_glob or ("*.csv",)),
        grace=parse_seconds(args.grace, what="--grace"),
        metrics_addr=parse_listen_address(args.metrics_addr) if args.metrics_addr else None,
        low_priority=args.low_priority, cleanup=cleanup,
    )


def run_watch_command(args: argparse.Namespace) -> int:
    from .commands.watch import Watcher
    from .pipeline.budget import release_large_buffers_promptly

    config = watch_config(args)
    release_large_buffers_promptly()
    if config.low_priority:
        lower_priority()
    holder: list[Watcher] = []

    async def main() -> None:
        watcher = Watcher(config)
        holder.append(watcher)
        await watcher.run()

    _run_with_signals(main, on_first=lambda: holder[0].request_stop() if holder else None)
    return EXIT_OK


def run_run_command(args: argparse.Namespace) -> int:
    from .commands.run import run_training
    from .pipeline.budget import release_large_buffers_promptly

    command = args.training_command
    if not command:
        raise ConfigError("no command to run: asyncsync run DIR DEST -- COMMAND [ARGS...]")
    config = watch_config(args)
    if config.cleanup is not None:
        raise ConfigError("--delete-after is for watch, not run")
    release_large_buffers_promptly()
    if config.low_priority:
        lower_priority()
    with asyncio.Runner() as runner:
        return runner.run(run_training(config, command))


def lower_priority() -> None:
    """Nice 10 for CPU, and the idle I/O class where Linux allows it (ioprio_set)."""
    os.nice(10)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        ioprio_set, who_process, idle_class = 251, 1, 3  # x86_64 syscall number
        libc.syscall(ioprio_set, who_process, 0, idle_class << 13)
    except (OSError, AttributeError):  # not Linux/x86_64: CPU niceness alone
        pass


def _run_with_signals(main: Any, on_first: Any = None) -> int:
    """Run ``main``. The first SIGINT/SIGTERM calls ``on_first`` (default: cancel ``main``);
    a second one exits at once. Return the first signal's number, or 0."""
    received: list[int] = []
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task_holder: list[asyncio.Task[None]] = []

        def on_signal(signum: int) -> None:
            if received:
                # Second signal: stop waiting for anything.
                os._exit(128 + signum)
            received.append(signum)
            log.warning("%s received: stopping (again to force)", signal.Signals(signum).name)
            if on_first is not None:
                on_first()
            elif task_holder:
                task_holder[0].cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)

        async def wrapper() -> None:
            task_holder.append(asyncio.current_task())  # type: ignore[arg-type]
            await main()

        try:
            runner.run(wrapper())
        except asyncio.CancelledError:
            if not received:
                raise
    return received[0] if received else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run`'s training command comes after "--" and is never parsed as our options.
    training_command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        split = argv.index("--")
        argv, training_command = argv[:split], argv[split + 1:]
    args = parser.parse_args(argv)
    args.training_command = training_command
    configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False),
                      getattr(args, "log_format", "text"))
    try:
        if args.subcommand == "push":
            return run_push_command(args)
        if args.subcommand == "watch":
            return run_watch_command(args)
        if args.subcommand == "run":
            return run_run_command(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except AsyncsyncError as exc:
        log.error("%s", exc)
        return EXIT_SOME_FAILED
    except Exception as exc:  # a bug: say so plainly, with the traceback to report
        log.error("internal error: %s: %s (please report this)", type(exc).__name__, exc,
                  exc_info=True)
        return EXIT_SOME_FAILED
    parser.error(f"unknown command {args.subcommand!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

