"""`metrics export SRC`: every run's results.csv as OpenMetrics, one sample per epoch, for
``promtool tsdb create-blocks-from openmetrics FILE DATA`` (a backfill of past trainings).

SRC is ``s3://BUCKET[/PREFIX]`` (or a ``file://`` store), whose runs are found as `runs.py`
finds them (one listing, the run records, ``--run-depth``), or a local directory of runs: its
files are listed the same way (links not followed, mtime for LastModified) and read with
`read_beneath`, so a results.csv replaced by a symlink is refused, never followed. Each run
gives, per epoch (row of results.csv, `service.training.epochs_of`), with ``run`` its path
below SRC (``.`` for SRC itself):

- ``asyncsync_training_metric{run, metric, column}``: every numeric column, ``metric`` its
  sanitised name (`metric_name`), ``column`` as written;
- ``asyncsync_training_epoch{run}``: the epoch number;
- ``asyncsync_training_epoch_duration_seconds{run}``: its wall time, where ultralytics'
  ``time`` column tells it (the difference with the row before).

Timestamps: results.csv has none, so each epoch's end is derived, by the first rule whose
inputs are there. The record is the run's own (attach()'s) or, else, `asyncsync run`'s of
the directory it watched above it; one that started after results.csv was last written is
another training's (the next `asyncsync run` of the same directory) and is not used.

1. The record's ``started`` and a ``time`` in every row: ``started + time``.
2. The record's ``started``, no complete ``time`` column: the epochs spread evenly up to the
   end, which is the record's ``ended``, else its ``updated``, else results.csv's
   LastModified (its mtime in a local tree): epoch i of n ends at
   ``started + (end - started) * i / n``.
3. No such record: the last epoch ends at results.csv's LastModified (mtime), the epochs
   before it earlier by the differences of their ``time``, or `EPOCHS_APART` apart without.

Timestamps are written in seconds, rounded to the millisecond (what Prometheus keeps). A run
whose epochs would not end strictly one after the other (a ``time`` column that starts over,
as a resumed training's does; a record that ends before it starts) is skipped with a
warning, as is one whose results.csv cannot be read; the others are still exported, and the
exit code is 1. The metric families are written one after the other, each series' samples
in epoch order, as promtool requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import secrets
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..config import Destination, StoreConfig, store_config_from
from ..errors import (
    EXIT_CLOSED_PIPE,
    EXIT_OK,
    EXIT_SOME_FAILED,
    ConfigError,
    SourceNotRegular,
    SourceVanished,
)
from ..names import printable
from ..options import Settings
from ..pipeline.source import read_beneath
from ..service.training import Epoch, epoch_durations, epochs_of, metric_name
from ..stores.protocol import ObjectInfo
from .pull import parse_source
from .runs import (
    OWN_DIRECTORY,
    READS_AT_ONCE,
    RECORD_NAME,
    Record,
    Run,
    Tree,
    Unreadable,
    bounded,
    discover_runs,
    parse_time,
    read_body,
    reading_store,
    record_of,
    runs_found,
)

log = logging.getLogger("asyncsync")

METRIC = "asyncsync_training_metric"
EPOCH = "asyncsync_training_epoch"
DURATION = "asyncsync_training_epoch_duration_seconds"
# (name, unit, help) in the order written; every family is a gauge: a value per epoch.
FAMILIES = (
    (METRIC, "", "A numeric column of a run's results.csv at the end of each epoch (metric: "
                 "its sanitised name, column: as written)."),
    (EPOCH, "", "The epoch of a run's results.csv that ended at this time."),
    (DURATION, "seconds", "The wall time of the epoch that ended at this time (results.csv's "
                          "time column)."),
)
# The spacing assumed between epochs when neither a record nor a time column dates them.
EPOCHS_APART = 60.0


@dataclass(frozen=True)
class ExportConfig:
    source: str  # SRC as given, for messages
    bucket: Destination | None  # read through the store (s3://, or a file:// store)
    directory: Path | None  # else a local directory of runs, read as files
    store: StoreConfig | None
    run_depth: int
    run_glob: str | None = None
    output: str = "-"  # a file, or "-" for stdout


def export_config_from(settings: Settings, source: str, *, run_glob: str | None = None,
                       output: str = "-") -> ExportConfig:
    """SRC, --run, -o and validated settings -> the frozen config (ConfigError: exit 2)."""
    if output != "-" and not Path(output).absolute().parent.is_dir():
        raise ConfigError(f"output {output!r}: no such directory to write it in")
    if "://" in source:
        return ExportConfig(source, parse_source(source), None,
                            store_config_from(settings, connections=READS_AT_ONCE),
                            settings["run_depth"], run_glob, output)
    directory = Path(source)
    if not directory.is_dir():
        raise ConfigError(f"source {source!r}: neither s3://BUCKET[/PREFIX] nor a directory")
    return ExportConfig(source, None, directory.absolute(), None, settings["run_depth"],
                        run_glob, output)


# -- timestamps ------------------------------------------------------------------------------


class Undatable(Exception):
    """Why a run's epochs cannot be given increasing timestamps."""


def label_of(run: Run) -> str:
    return run.path or "."


def record_times(run: Run) -> tuple[float | None, float | None]:
    """The training's start and end as the run's record says them (end: ``ended``, else
    ``updated``), or no start where there is no record of this training (see the module's
    rule)."""
    fields = run.fields
    started = parse_time(fields.get("started")) if fields else None
    if fields is None or started is None:
        return None, None
    if run.results_modified is not None and started > run.results_modified:
        return None, None
    ended = parse_time(fields.get("ended"))
    return started, ended if ended is not None else parse_time(fields.get("updated"))


def epoch_ends(epochs: list[Epoch], started: float | None, ended: float | None,
               modified: float | None) -> list[int]:
    """Each epoch's end in milliseconds since 1970, by the module's rule: Undatable if
    they do not strictly increase."""
    count = len(epochs)
    elapsed = [epoch.elapsed for epoch in epochs if epoch.elapsed is not None]
    timed = len(elapsed) == count
    if started is not None and timed:
        ends = [started + seconds for seconds in elapsed]
    elif started is not None:
        end = ended if ended is not None else modified
        if end is None:
            raise Undatable("no end known (no ended in its record, no LastModified listed)")
        ends = [started + (end - started) * index / count for index in range(1, count + 1)]
    elif modified is None:
        raise Undatable("no record with its start, and no LastModified listed for results.csv")
    elif timed:
        ends = [modified - (elapsed[-1] - seconds) for seconds in elapsed]
    else:
        ends = [modified - EPOCHS_APART * (count - index) for index in range(1, count + 1)]
    stamps = [round(end * 1000) for end in ends]
    for before, after, epoch in zip(stamps, stamps[1:], epochs[1:], strict=False):
        if after <= before:
            why = ("its time column does not increase (a resumed training?)" if timed
                   else "its record ends before it started")
            raise Undatable(f"epoch {epoch.epoch} would not end after the one before: {why}")
    return stamps


# -- OpenMetrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dated:
    """One run to export: its label, its epochs, and when each ended (ms)."""

    run: str
    epochs: list[Epoch]
    ends: list[int]


def label_value(text: str) -> str:
    """A label value as OpenMetrics writes it: UTF-8 (an undecodable file name's bytes as
    U+FFFD), with backslash, double quote and newline escaped."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate no file name decodes to
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def seconds_text(milliseconds: int) -> str:
    """A timestamp in seconds, exactly to the millisecond: ``1733400000.5``, ``1733400030``."""
    sign = "-" if milliseconds < 0 else ""
    whole, part = divmod(abs(milliseconds), 1000)
    return f"{sign}{whole}" if not part else f"{sign}{whole}.{part:03d}".rstrip("0")


def value_text(value: float) -> str:
    """The shortest text that reads back as the same float (what results.csv held)."""
    return repr(float(value))


def family_lines(name: str, run: Dated) -> Iterator[str]:
    """One run's samples of one family: series after series, each in epoch order."""
    labels = f'run="{label_value(run.run)}"'
    stamps = [seconds_text(end) for end in run.ends]
    if name == EPOCH:
        for epoch, stamp in zip(run.epochs, stamps, strict=True):
            yield f"{name}{{{labels}}} {epoch.epoch} {stamp}\n"
    elif name == DURATION:
        for seconds, stamp in zip(epoch_durations(run.epochs), stamps, strict=True):
            if seconds is not None and seconds >= 0:  # < 0: a `time` that started over
                yield f"{name}{{{labels}}} {value_text(seconds)} {stamp}\n"
    else:
        columns = list(dict.fromkeys(column for epoch in run.epochs for column in epoch.values))
        for column in columns:
            series = (f'{labels},metric="{label_value(metric_name(column))}",'
                      f'column="{label_value(column)}"')
            for epoch, stamp in zip(run.epochs, stamps, strict=True):
                value = epoch.values.get(column)
                if value is not None:
                    yield f"{name}{{{series}}} {value_text(value)} {stamp}\n"


def openmetrics(runs: list[Dated]) -> Iterator[str]:
    """The OpenMetrics text of the runs: each family whole, then ``# EOF``."""
    for name, unit, help_text in FAMILIES:
        yield f"# TYPE {name} gauge\n"
        if unit:
            yield f"# UNIT {name} {unit}\n"
        yield f"# HELP {name} {help_text}\n"
        for run in runs:
            yield from family_lines(name, run)
    yield "# EOF\n"


# -- reading the runs ------------------------------------------------------------------------


def chosen(runs: list[Run], glob: str | None) -> list[Run]:
    """The runs with a results.csv, and whose path matches --run."""
    return [run for run in runs if run.results is not None
            and (glob is None or fnmatch.fnmatchcase(label_of(run), glob))]


async def read_bucket(config: ExportConfig) -> list[tuple[Run, str | Unreadable]]:
    """The chosen runs under s3://BUCKET/PREFIX and their results.csv (or why not read)."""
    assert config.bucket is not None and config.store is not None
    async with reading_store(config.bucket, config.store) as store:
        runs = chosen(await discover_runs(store, config.bucket, config.run_depth),
                      config.run_glob)

        async def attempt(key: str) -> str | Unreadable:
            try:
                return await read_body(store, key)
            except Unreadable as exc:
                return exc

        texts = await bounded(attempt, [run.results for run in runs])
    return [(run, text) for run, text in zip(runs, texts, strict=True) if text is not None]


def read_local(root: Path, relative: str) -> str | Unreadable:
    """A file of the local tree, reached without following any link, as text."""
    try:
        return read_beneath(str(root / relative), str(root)).decode(errors="replace")
    except (SourceNotRegular, SourceVanished) as exc:
        return Unreadable(str(exc))
    except OSError as exc:
        return Unreadable(exc.strerror or str(exc))


def local_tree(root: Path) -> Tree:
    """The local directory as a listing of it would show it: its regular files and links
    (a link is listed, to be refused when read, not followed) by path, their mtime as
    LastModified, and of asyncsync's own directories only the run record."""
    tree = Tree()
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            with os.scandir(root / relative) as listing:
                entries = list(listing)
        except OSError as exc:
            log.warning("%s: not listed: %s", printable(str(root / relative)),
                        exc.strerror or exc)
            continue
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name != OWN_DIRECTORY:
                        pending.append(path)
                        continue
                    path, found = f"{path}/{RECORD_NAME}", os.lstat(root / path / RECORD_NAME)
                else:
                    found = entry.stat(follow_symlinks=False)
            except OSError:  # gone since listed, or no record in _asyncsync/
                continue
            if stat.S_ISREG(found.st_mode) or stat.S_ISLNK(found.st_mode):
                tree.add(path, ObjectInfo(path, found.st_size, "", last_modified=found.st_mtime))
    return tree


def read_tree(config: ExportConfig) -> list[tuple[Run, str | Unreadable]]:
    """The chosen runs of the local directory and their results.csv (or why not read)."""
    root = config.directory
    assert root is not None
    tree = local_tree(root)
    records: list[Record] = []
    for key, directory in tree.records.items():
        text = read_local(root, key)
        if isinstance(text, Unreadable):
            log.warning("%s: not read: %s", printable(key), text)
            continue
        record = record_of(key, directory, text)
        if record is not None:
            records.append(record)
    runs = chosen(runs_found(tree, records, config.run_depth, str(root)), config.run_glob)
    return [(run, read_local(root, run.results)) for run in runs if run.results is not None]


def dated_runs(read: list[tuple[Run, str | Unreadable]]) -> tuple[list[Dated], int]:
    """The runs to export, and how many could not be (each said as a warning)."""
    dated: list[Dated] = []
    failed = 0
    for run, text in read:
        label = printable(label_of(run))
        if isinstance(text, Unreadable):
            log.warning("%s: not exported: its results.csv: %s", label, text)
            failed += 1
            continue
        epochs = epochs_of(text)
        if not epochs:
            log.info("%s: no epoch in its results.csv yet", label)
            continue
        started, ended = record_times(run)
        try:
            ends = epoch_ends(epochs, started, ended, run.results_modified)
        except Undatable as exc:
            log.warning("%s: not exported: %s", label, exc)
            failed += 1
            continue
        dated.append(Dated(label_of(run), epochs, ends))
    return dated, failed


# -- output ----------------------------------------------------------------------------------


def write_file(path: str, chunks: Iterable[str]) -> None:
    """The text written to a temporary file beside ``path``, then renamed over it: a reader
    (promtool) never sees half an export, and a failed one leaves the old file as it was."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # 0o666 less the umask, as the file would have had written directly.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with open(fd, "w", encoding="utf-8", newline="\n") as file:
                file.writelines(chunks)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise ConfigError(f"output {path!r}: not written: {exc.strerror or exc}") from None


def write_stream(stream: TextIO, chunks: Iterable[str]) -> bool:
    """The text written to ``stream`` (stdout as UTF-8 bytes, whatever its locale); False
    if the reader went away (``| head``), which is no error worth a traceback."""
    binary = stream.buffer if stream is sys.stdout and hasattr(stream, "buffer") else None
    try:
        if binary is not None:
            stream.flush()
            for chunk in chunks:
                binary.write(chunk.encode())
            binary.flush()
        else:
            stream.writelines(chunks)
            stream.flush()
    except BrokenPipeError:
        if stream is sys.stdout:
            # What is still buffered would fail again at exit, with Python's own message.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return False
    return True


async def run_export(config: ExportConfig, out: TextIO | None = None) -> int:
    """Export; 0, or 1 when some run could not be (each said as a warning) or the reader of
    stdout went away. A missing bucket or refused credentials raise ConfigError (exit 2)."""
    if config.directory is not None:
        read = await asyncio.to_thread(read_tree, config)
    else:
        read = await read_bucket(config)
    dated, failed = dated_runs(read)
    if not read:
        matching = f" matching {config.run_glob!r}" if config.run_glob else ""
        log.warning("no run with a results.csv%s under %s", matching,
                    printable(config.source))
    chunks = openmetrics(dated)
    if config.output != "-":
        write_file(config.output, chunks)
    elif not write_stream(out or sys.stdout, chunks):
        return EXIT_CLOSED_PIPE
    log.info("%d run(s), %d epoch(s) exported", len(dated),
             sum(len(run.epochs) for run in dated))
    return EXIT_SOME_FAILED if failed else EXIT_OK
