"""`runs`: every training run under a prefix and how it stands, from the bucket alone.

One listing of ``PREFIX/`` finds the runs and their run records (`record.py`): `asyncsync
run` writes ``D/_asyncsync/run.json`` for the directory D it watches (D is PREFIX itself, or
a directory below it when a higher prefix is listed), naming each run directory under D by
its path; attach() writes ``RUN/_asyncsync/run.json`` inside the run it mirrors. A run is a
directory named by a record, or one ``--run-depth`` levels below PREFIX (below D, under a
directory `run` watched: the daemon's own run label, `service.daemon.run_of`) that holds
results.csv, args.yaml or weights/, or PREFIX itself when it holds results.csv or args.yaml;
a run without a record was pushed. The listing is kept per directory, not per object. Each
run's results.csv is read with GET (and args.yaml, for the planned epochs, when no record
says): the epochs done and the last and best values of the main metrics. Size is the sum of
its listed objects; the last sign of life is the newest time the bucket tells of it, and a
run whose record says running with no sign of life for `STALE_AFTER` is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, TypeVar

from ..config import Destination, StoreConfig, parse_destination, store_config_from
from ..errors import EXIT_OK, NotFound, StoreError, TransientStoreError, first_error
from ..names import printable
from ..options import Settings
from ..pipeline.session import Pipeline
from ..report import human_bytes
from ..service.daemon import ABOVE_RUNS, run_of
from ..service.training import number, parse_results
from ..stores.protocol import ObjectInfo, ObjectStore
from .record import RECORD_PATH

log = logging.getLogger("asyncsync")

T = TypeVar("T")

# A run whose record says running is stale once nothing in the bucket has shown it alive for
# this long, or for two of its mean epochs when its epochs take longer.
STALE_AFTER = 600.0
# Objects read at once (records, results.csv, args.yaml), and the most bytes read of one:
# results.csv of a thousand epochs is a few hundred KB.
READS_AT_ONCE = 8
MAX_BODY = 16 * 1024 * 1024
OWN_DIRECTORY, RECORD_NAME = RECORD_PATH.split("/")
RESULTS, ARGS, WEIGHTS = "results.csv", "args.yaml", "weights"
# The metrics shown, where results.csv has them: all of them the higher the better.
MAIN_METRICS = ("metrics/mAP50-95(B)", "metrics/mAP50(B)", "fitness")
_EPOCHS_LINE = re.compile(r"^epochs:\s*(\d+)\s*(?:#.*)?$", re.MULTILINE)


@dataclass(frozen=True)
class RunsConfig:
    destination: Destination
    store: StoreConfig
    run_depth: int
    json: bool = False


def runs_config_from(settings: Settings, destination: str) -> RunsConfig:
    """DEST and validated settings -> the frozen config; the store's built as push's."""
    return RunsConfig(parse_destination(destination),
                      store_config_from(settings, connections=READS_AT_ONCE),
                      run_depth=settings["run_depth"], json=settings["json"])


# -- what the listing shows ----------------------------------------------------------------


@dataclass
class Record:
    """One run record: where it lies (its directory below PREFIX) and what it says."""

    key: str
    directory: str  # below PREFIX, '' for PREFIX itself
    fields: dict[str, Any]

    @property
    def watches_directory(self) -> bool:
        """`asyncsync run`'s record of the directory it watched (attach()'s is one run's)."""
        return "program" in self.fields or isinstance(self.fields.get("runs"), list)

    def entries(self) -> dict[str, dict[str, Any]]:
        """The runs `asyncsync run` found under its directory, by their path below PREFIX."""
        found: dict[str, dict[str, Any]] = {}
        for entry in self.fields.get("runs") or ():
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                found[join(self.directory, entry["path"])] = entry
        return found


@dataclass
class Directory:
    """The listed objects directly in one directory: all a run needs of them."""

    objects: int = 0
    bytes: int = 0
    newest: float | None = None  # the newest LastModified, where the listing reports it
    results: str | None = None  # the key of its results.csv
    results_modified: float | None = None  # its results.csv's LastModified, where listed
    args: str | None = None  # the key of its args.yaml


class Tree:
    """One listing of PREFIX/, kept per directory (a prefix of a million objects holds a few
    thousand directories), and the run records' keys with their directories."""

    def __init__(self) -> None:
        self.directories: dict[str, Directory] = {}
        self.records: dict[str, str] = {}

    def add(self, relative: str, info: ObjectInfo) -> None:
        """One listed object, its key relative to PREFIX."""
        directory = record_directory(relative)
        if directory is not None:
            self.records[info.key] = directory
            return
        if is_own_key(relative):
            return
        parent, _, name = relative.rpartition("/")
        found = self.directories.get(parent)
        if found is None:
            found = self.directories[parent] = Directory()
        found.objects += 1
        found.bytes += info.size
        modified = last_modified(info)
        if modified is not None and (found.newest is None or modified > found.newest):
            found.newest = modified
        if name == RESULTS:
            found.results, found.results_modified = info.key, modified
        elif name == ARGS:
            found.args = info.key


@dataclass
class Run:
    path: str  # below PREFIX
    record: Record | None = None  # the run's own (attach()'s, or run's of this very directory)
    parent: Record | None = None  # `asyncsync run`'s record of a directory above it
    objects: int = 0
    bytes: int = 0
    newest: float | None = None  # the newest LastModified among its objects, where listed
    results: str | None = None  # the key of its results.csv
    results_modified: float | None = None  # its results.csv's LastModified, where listed
    args: str | None = None  # the key of its args.yaml
    weights: bool = False

    @property
    def marked(self) -> bool:
        return bool(self.results or self.args or self.weights)

    @property
    def fields(self) -> dict[str, Any] | None:
        """What the records say of the run as a whole (status, host, times): its own record,
        else the record of the directory `asyncsync run` watched above it."""
        for record in (self.record, self.parent):
            if record is not None:
                return record.fields
        return None

    def add(self, directory: Directory, inside: str) -> None:
        """The objects of one of its directories (``inside``: its path within the run)."""
        self.objects += directory.objects
        self.bytes += directory.bytes
        if directory.newest is not None and (self.newest is None
                                             or directory.newest > self.newest):
            self.newest = directory.newest
        if not inside:
            self.results, self.args = directory.results, directory.args
            self.results_modified = directory.results_modified
        elif inside == WEIGHTS or inside.startswith(WEIGHTS + "/"):
            self.weights = True


def last_modified(info: ObjectInfo) -> float | None:
    """The object's LastModified, where the store's listing reports it."""
    return info.last_modified


def join(directory: str, path: str) -> str:
    if path in ("", "."):
        return directory
    return f"{directory}/{path}" if directory else path


def record_directory(relative: str) -> str | None:
    """The directory of a run record's key (below PREFIX), or None for any other key."""
    head, slash, tail = relative.rpartition(f"{OWN_DIRECTORY}/{RECORD_NAME}")
    if tail or not slash or (head and not head.endswith("/")) or is_own_key(head):
        return None
    return head[:-1]


def is_own_key(relative: str) -> bool:
    """asyncsync's own objects (run records, history copies, doctor probes): not a run's."""
    return relative.startswith(OWN_DIRECTORY + "/") or f"/{OWN_DIRECTORY}/" in relative


def _deepest(path: str, among: Mapping[str, Any] | set[str]) -> str | None:
    """The deepest of ``among`` that is ``path`` or a directory above it ('' is above all)."""
    candidate = path
    while True:
        if candidate in among:
            return candidate
        if not candidate:
            return None
        candidate = candidate.rpartition("/")[0]


def find_runs(tree: Tree, records: list[Record], depth: int) -> tuple[list[Run], list[str]]:
    """The runs of the listed tree, given the run records read; and the results.csv that
    lie in none of them (the sign of a --run-depth that does not match the tree)."""
    roots = {record.directory: record for record in records if record.watches_directory}
    named = {record.directory for record in records if not record.watches_directory}
    for record in roots.values():
        named.update(record.entries())
    runs = {path: Run(path) for path in named}
    top = tree.directories.get("")
    if top is not None and (top.results or top.args) and "" not in roots:
        runs.setdefault("", Run(""))  # PREFIX is a run directory itself (one pushed there)
    candidates: dict[str, Run] = {}
    for directory, objects in tree.directories.items():
        path = _deepest(directory, runs)
        if path is None:
            # The daemon's run label: --run-depth levels below the directory `run` watched.
            root = _deepest(directory, roots) or ""
            inner = directory[len(root):].lstrip("/")
            below = run_of(f"{inner}/file", depth) if inner else ABOVE_RUNS
            if below == ABOVE_RUNS:
                continue
            path = join(root, below)
        run = runs.get(path) or candidates.setdefault(path, Run(path))
        run.add(objects, directory[len(path) + 1:] if path else directory)
    runs.update((path, run) for path, run in candidates.items() if run.marked)
    by_directory = {record.directory: record for record in records}
    for run in runs.values():
        run.record = by_directory.get(run.path)
        if run.path:
            above = _deepest(run.path.rpartition("/")[0], roots)
            run.parent = roots[above] if above is not None else None
    listed = {run.results for run in runs.values()}
    lost = [found.results for found in tree.directories.values()
            if found.results is not None and found.results not in listed]
    return sorted(runs.values(), key=lambda run: run.path), sorted(lost)


# -- what a run's objects say --------------------------------------------------------------


def epochs_done(rows: list[dict[str, str]]) -> int:
    """The last row's epoch (rows of a resumed training continue its count), else the rows."""
    last = number(rows[-1].get("epoch")) if rows else None
    return int(last) if last is not None and last >= len(rows) else len(rows)


def metric_summary(rows: list[dict[str, str]]) -> dict[str, dict[str, float | int | None]]:
    """Per main metric present: its last value, its best (highest) and that row's epoch."""
    summary: dict[str, dict[str, float | int | None]] = {}
    for name in MAIN_METRICS:
        if not rows or name not in rows[0]:
            continue
        best: tuple[float, int] | None = None
        for index, row in enumerate(rows, 1):
            value = number(row.get(name))
            if value is not None and (best is None or value > best[0]):
                epoch = number(row.get("epoch"))
                best = (value, int(epoch) if epoch is not None else index)
        summary[name] = {"last": number(rows[-1].get(name)),
                         "best": best[0] if best else None,
                         "best_epoch": best[1] if best else None}
    return summary


def parse_time(text: object) -> float | None:
    """A record's ISO time (``2024-05-01T10:00:00Z``) as POSIX seconds."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def status_of(fields: Mapping[str, Any] | None, last_seen: float | None,
              epoch_seconds: float | None, now: float) -> str:
    """pushed (no record), finished, crashed, running, stale (running, and nothing seen of
    it for STALE_AFTER or two mean epochs), or unknown (a status this version does not
    know)."""
    if fields is None:
        return "pushed"
    status = fields.get("status")
    if status in ("finished", "crashed"):
        return str(status)
    if status != "running":
        return "unknown"
    quiet_for = max(STALE_AFTER, 2 * epoch_seconds) if epoch_seconds else STALE_AFTER
    if last_seen is not None and now - last_seen > quiet_for:
        return "stale"
    return "running"


def describe_run(run: Run, rows: list[dict[str, str]] | None, planned: int | None,
                 base_url: str, now: float) -> dict[str, Any]:
    """The run as `runs --json` prints it (the fields README documents). ``rows``: its
    results.csv as read from the bucket; ``planned``: the epochs its args.yaml plans."""
    own = run.record.fields if run.record is not None else None
    parent = run.parent.fields if run.parent is not None else None
    fields = run.fields
    # The epochs and last metrics a record holds: attach()'s record of the run itself, or
    # `asyncsync run`'s entry for this directory (as it stood when that record was written).
    progress: dict[str, Any] = {}
    for record in (run.parent, run.record):
        if record is not None:
            progress = (record.entries().get(run.path, progress) if record.watches_directory
                        else record.fields)
    started = parse_time(fields.get("started")) if fields else None
    # The last sign of life: the newest of the objects' LastModified (where listed), the
    # records' writes (start, end), and ultralytics' results.csv, whose `time` column counts
    # the seconds since the training began.
    times = [run.newest, *(parse_time(f.get(name)) for f in (own, parent) if f
                           for name in ("started", "updated", "ended"))]
    epoch_seconds = None
    epochs: int | None
    if rows is not None:
        elapsed = number(rows[-1].get("time")) if rows else None
        if elapsed is not None and started is not None:
            times.append(started + elapsed)
            epoch_seconds = elapsed / len(rows)
        epochs = epochs_done(rows)
        metrics = metric_summary(rows)
    else:
        epochs = progress["epochs"] if isinstance(progress.get("epochs"), int) else None
        recorded = progress.get("metrics")
        last = recorded if isinstance(recorded, dict) else {}
        metrics = {name: {"last": number(last[name]), "best": None, "best_epoch": None}
                   for name in MAIN_METRICS if name in last}
    known = [moment for moment in times if moment is not None]
    last_sync = max(known) if known else None
    if own is not None and isinstance(own.get("epochs_planned"), int):
        planned = own["epochs_planned"]
    source = run.record or run.parent
    return {
        "run": run.path,
        "url": f"{base_url}/{run.path}" if run.path else base_url,
        "status": status_of(fields, last_sync, epoch_seconds, now),
        "host": fields.get("host") if fields else None,
        "started": fields.get("started") if fields else None,
        "ended": fields.get("ended") if fields else None,
        "exit_code": fields.get("exit_code") if fields else None,
        "epochs": epochs,
        "epochs_planned": planned,
        "metrics": metrics,
        "objects": run.objects,
        "bytes": run.bytes,
        "last_sync": iso(last_sync),
        "record": source.key if source is not None else None,
    }


# -- reading the bucket --------------------------------------------------------------------


class Unreadable(Exception):
    """Why a small object could not be read (the message says it, without the key)."""

    def __init__(self, reason: str, *, gone: bool = False) -> None:
        super().__init__(reason)
        self.gone = gone  # not found: deleted since the listing


async def read_body(store: ObjectStore, key: str) -> str:
    """A small object's text (a gzip body decoded); Unreadable if it is gone since the
    listing, cannot be read, or is larger than MAX_BODY."""
    try:
        async with store.get_object(key) as body:
            chunks, size = [], 0
            async for chunk in body:
                size += len(chunk)
                if size > MAX_BODY:
                    raise Unreadable(f"larger than {MAX_BODY} bytes: not read")
                chunks.append(chunk)
            encoding = (body.info.content_encoding or "").lower()
    except NotFound:
        raise Unreadable("gone since the listing", gone=True) from None
    except StoreError as exc:
        raise Unreadable(f"not read: {exc}") from None
    data = b"".join(chunks)
    if encoding == "gzip":
        try:
            decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            data = decoder.decompress(data, MAX_BODY)
        except zlib.error as exc:
            raise Unreadable(f"its gzip body does not decode ({exc}): not read") from None
    return data.decode(errors="replace")


async def read_text(store: ObjectStore, key: str) -> str | None:
    """`read_body`, or None if the object cannot be read (said once, as a warning; an object
    gone since the listing is not worth one)."""
    try:
        return await read_body(store, key)
    except Unreadable as exc:
        if not exc.gone:
            log.warning("%s: %s", printable(key), exc)
        return None


async def read_record(store: ObjectStore, key: str, directory: str) -> Record | None:
    text = await read_text(store, key)
    return None if text is None else record_of(key, directory, text)


def record_of(key: str, directory: str, text: str) -> Record | None:
    """The run record of this text, or None (said as a warning) if it is not one."""
    try:
        fields = json.loads(text)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        log.warning("%s: not a run record (not a JSON object): ignored", printable(key))
        return None
    return Record(key, directory, fields)


async def bounded(read: Callable[[str], Awaitable[T]], keys: list[str | None]) -> list[T | None]:
    """``read`` of each key (None for None), READS_AT_ONCE at a time: a slot is taken
    before each task is created, so a prefix of ten thousand runs never holds more."""
    slots = asyncio.Semaphore(READS_AT_ONCE)
    tasks: dict[int, asyncio.Task[T]] = {}

    async def in_slot(key: str) -> T:
        try:
            return await read(key)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            for index, key in enumerate(keys):
                if key is not None:
                    await slots.acquire()
                    tasks[index] = group.create_task(in_slot(key))
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return [tasks[index].result() if index in tasks else None for index in range(len(keys))]


async def discover_runs(store: ObjectStore, destination: Destination,
                        depth: int) -> list[Run]:
    """The runs under the destination, with their records: one listing, then the records
    read (`find_runs`)."""
    prefix = destination.prefix
    base = f"{prefix}/" if prefix else ""
    tree = Tree()
    async for info in store.list_objects(base):
        tree.add(info.key[len(base):], info)

    async def record(key: str) -> Record | None:
        return await read_record(store, key, tree.records[key])

    records = [found for found in await bounded(record, list(tree.records)) if found]
    return runs_found(tree, records, depth, destination.url)


def runs_found(tree: Tree, records: list[Record], depth: int, where: str) -> list[Run]:
    """`find_runs`, the results.csv it finds in no run said as a warning (a hint to fix
    --run-depth)."""
    runs, lost = find_runs(tree, records, depth)
    if lost:
        log.warning("%s: in no run %d level(s) below %s (see --run-depth)", printable(lost[0]),
                    depth, printable(where))
    return runs


async def list_runs(config: RunsConfig, store: ObjectStore,
                    now: float | None = None) -> list[dict[str, Any]]:
    """Every run under the destination, described (see `describe_run`)."""
    runs = await discover_runs(store, config.destination, config.run_depth)

    async def text(key: str) -> str | None:
        return await read_text(store, key)

    results = await bounded(text, [run.results for run in runs])
    args = await bounded(text, [None if _planned_by_record(run) else run.args for run in runs])
    moment = time.time() if now is None else now
    return [
        describe_run(run, parse_results(csv_text) if csv_text is not None else None,
                     planned_epochs(yaml_text), config.destination.url, moment)
        for run, csv_text, yaml_text in zip(runs, results, args, strict=True)
    ]


def _planned_by_record(run: Run) -> bool:
    return run.record is not None and isinstance(run.record.fields.get("epochs_planned"), int)


def planned_epochs(args_yaml: str | None) -> int | None:
    """``epochs: N`` of ultralytics' args.yaml (flat ``key: value`` lines)."""
    found = _EPOCHS_LINE.search(args_yaml) if args_yaml else None
    return int(found[1]) if found else None


# -- output ----------------------------------------------------------------------------------

_SHORT = {"metrics/mAP50-95(B)": "mAP50-95", "metrics/mAP50(B)": "mAP50", "fitness": "fitness"}


def _when(text: object) -> str:
    moment = parse_time(text)
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(moment)) if moment is not None else "-"


def _metric(values: Mapping[str, Any] | None) -> str:
    if not values or values.get("last") is None:
        return "-"
    best = values.get("best")
    return f"{values['last']:.3f}" + (f" ({best:.3f})" if best is not None else "")


def table(described: list[dict[str, Any]]) -> list[str]:
    """The runs as a table, times in UTC, metrics as last (best)."""
    metrics = [name for name in MAIN_METRICS if any(name in run["metrics"] for run in described)]
    header = ["RUN", "STATUS", "HOST", "STARTED", "ENDED", "EPOCHS",
              *(f"{_SHORT[name]} (best)" for name in metrics), "SIZE", "LAST SYNC"]
    lines = [header]
    for run in described:
        epochs = "-" if run["epochs"] is None else str(run["epochs"])
        if run["epochs_planned"] is not None:
            epochs += f"/{run['epochs_planned']}"
        lines.append([
            printable(run["run"] or "."), run["status"], printable(str(run["host"] or "-")),
            _when(run["started"]), _when(run["ended"]), epochs,
            *(_metric(run["metrics"].get(name)) for name in metrics),
            human_bytes(run["bytes"]), _when(run["last_sync"]),
        ])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            .rstrip() for line in lines]


def _retried(exc: TransientStoreError, attempt: int, pause: float) -> None:
    log.info("retry %d in %.2fs: %s", attempt, pause, printable(str(exc)))


@contextlib.asynccontextmanager
async def reading_store(destination: Destination, store: StoreConfig) -> AsyncIterator[ObjectStore]:
    """The store of a command that only reads the bucket (its retries said at -v), its
    bucket checked, closed when the block ends."""
    async with Pipeline.open_read(destination, store, on_retry=_retried) as session:
        yield await session.store()


async def run_runs(config: RunsConfig, out: TextIO | None = None) -> int:
    """List the runs; 0. A missing bucket or refused credentials raise ConfigError (exit 2),
    a store that never answers EndpointUnreachable (exit 1)."""
    stream = out or sys.stdout
    async with reading_store(config.destination, config.store) as store:
        described = await list_runs(config, store)
    if config.json:
        for run in described:
            stream.write(json.dumps(run, ensure_ascii=False) + "\n")
    elif described:
        stream.write("\n".join(table(described)) + "\n")
    else:
        log.warning("no runs under %s", printable(config.destination.url))
    return EXIT_OK

