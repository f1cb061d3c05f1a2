"""The completion reports of a sharded push (`push --shard I/N`), and `asyncsync shards DEST`.

The N shards of a push never talk to each other, so each one leaves a small JSON object in
the bucket, ``PREFIX/_asyncsync/shards/N/I.json``: written "running" when the shard starts
and rewritten "done" or "failed", with its counts, when it ends (`ShardReport`). The
shard's manifest checkpoint lies beside it, ``N/I.db.gz``, for a replacement pod to resume
from. Reports are the only sign of a shard: push writes them at its start and end alone,
so a report that still says running after hours cannot be told from a long shard, and is
shown as running, with its start.

`run_shards` lists ``PREFIX/_asyncsync/shards/`` once, reads the reports found and shows
each shard 0..N-1 as done, running, missing (no report), failed or unknown (a report that
cannot be read). Pushes with different N under one prefix keep separate folders: each is
shown, newest first, and the exit code is the newest one's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..config import Destination, StoreConfig, parse_destination, store_config_from
from ..errors import EXIT_OK, EXIT_SOME_FAILED
from ..names import printable
from ..options import Settings
from ..pipeline.shard import Shard
from ..report import human_bytes
from ..stores.protocol import ObjectInfo, ObjectStore
from ..stores.session import StoreSession
from .record import RunRecord, now_iso
from .runs import (
    OWN_DIRECTORY,
    READS_AT_ONCE,
    Unreadable,
    bounded,
    iso,
    parse_time,
    read_body,
    reading_store,
)

log = logging.getLogger("asyncsync")

SHARDS_DIRECTORY = f"{OWN_DIRECTORY}/shards"
_REPORT_NAME = re.compile(r"(0|[1-9][0-9]*)\.json")
_MANIFEST_NAME = re.compile(r"(0|[1-9][0-9]*)\.db\.gz")
_COUNT_NAME = re.compile(r"[1-9][0-9]*")
# The states a shard is shown in, in the order the counts line names them.
DONE, RUNNING, MISSING, FAILED, UNKNOWN = "done", "running", "missing", "failed", "unknown"
STATES = (DONE, RUNNING, MISSING, FAILED, UNKNOWN)
# The report's counts, as push's summary names them where it differs (`Reporter.summary`).
COUNTS = ("files", "uploaded", "unchanged", "failed", "bytes", "scanned")


def shards_folder(prefix: str) -> str:
    return f"{prefix}/{SHARDS_DIRECTORY}" if prefix else SHARDS_DIRECTORY


def report_key(prefix: str, shard: Shard) -> str:
    """The key of the shard's completion report, below the push's PREFIX (may be '')."""
    return f"{shards_folder(prefix)}/{shard.count}/{shard.index}.json"


def manifest_key(prefix: str, shard: Shard) -> str:
    """The key of the shard's manifest checkpoint, beside its report."""
    return f"{shards_folder(prefix)}/{shard.count}/{shard.index}.db.gz"


# -- the writer (push) ---------------------------------------------------------------------


class ShardReport(RunRecord):
    """The shard's completion report: "running" at `start`, "done" or "failed" at `finish`.
    A report that cannot be written is a warning (once per cause), never the push's
    failure: the files it uploaded are uploaded all the same."""

    what = "shard report"

    def __init__(self, session: StoreSession, prefix: str, shard: Shard) -> None:
        # run_depth is kept too: shards that split by different depths (or by run and by
        # file) do not partition the tree, and `asyncsync shards` says so.
        super().__init__(session, report_key(prefix, shard), pid=os.getpid(),
                         shard=shard.index, shards=shard.count, by=shard.by,
                         run_depth=shard.run_depth)
        self._began = time.monotonic()

    async def start(self) -> None:
        self._began = time.monotonic()
        await self.write(status=RUNNING, started=now_iso())

    async def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        """Rewrite the report with the push's summary (`Reporter.summary`) and exit code."""
        failed = int(summary.get("failed", 0))
        uploaded, unchanged = int(summary.get("uploaded", 0)), int(summary.get("skipped", 0))
        await self.write(
            status=DONE if exit_code == EXIT_OK and failed == 0 else FAILED,
            ended=now_iso(), seconds=round(time.monotonic() - self._began, 3),
            files=uploaded + unchanged, uploaded=uploaded, unchanged=unchanged, failed=failed,
            bytes=int(summary.get("bytes", 0)), scanned=summary.get("scanned"),
            exit_code=exit_code,
        )


# -- the reader (`asyncsync shards DEST`) --------------------------------------------------


@dataclass(frozen=True)
class ShardsConfig:
    destination: Destination
    store: StoreConfig
    json: bool = False


def shards_config_from(settings: Settings, destination: str) -> ShardsConfig:
    """DEST and validated settings -> the frozen config; the store's built as push's."""
    return ShardsConfig(parse_destination(destination),
                        store_config_from(settings, connections=READS_AT_ONCE),
                        json=settings["json"])


@dataclass
class ShardedPush:
    """One ``N/`` folder: the reports and manifest checkpoints listed in it."""

    count: int
    reports: dict[int, str] = field(default_factory=dict)  # shard index -> key
    manifests: dict[int, str] = field(default_factory=dict)
    newest: float | None = None  # the newest LastModified among its objects, where listed


def sharded_pushes(listed: list[ObjectInfo], folder: str) -> list[ShardedPush]:
    """The ``N/`` folders of a listing of ``folder/``, newest first (by N where the listing
    tells no times). Keys of no shard 0..N-1 are said as a warning and left out."""
    pushes: dict[int, ShardedPush] = {}
    for info in listed:
        count_text, slash, name = info.key[len(folder) + 1:].partition("/")
        if not slash or not _COUNT_NAME.fullmatch(count_text):
            continue
        count = int(count_text)
        report, manifest = _REPORT_NAME.fullmatch(name), _MANIFEST_NAME.fullmatch(name)
        found = report or manifest
        if found is None:
            continue
        if int(found[1]) >= count:
            log.warning("%s: no shard of %d (0 to %d): ignored", printable(info.key), count,
                        count - 1)
            continue
        push = pushes.setdefault(count, ShardedPush(count))
        (push.reports if report else push.manifests)[int(found[1])] = info.key
        if info.last_modified is not None and (push.newest is None
                                               or info.last_modified > push.newest):
            push.newest = info.last_modified
    return sorted(pushes.values(), key=lambda push: (push.newest or 0.0, push.count),
                  reverse=True)


def _count(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _seconds(fields: dict[str, Any]) -> float | None:
    value = fields.get("seconds")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    return value if isinstance(value, str) else None


def state_of(fields: dict[str, Any] | None) -> str:
    """done, running or failed as the report says; unknown for a status this version does
    not know (or no report object at all). A report that says done but counts failed files
    or a non-zero exit is failed: done means every file of the shard is in the bucket."""
    if fields is None:
        return UNKNOWN
    status = fields.get("status")
    if status == DONE and (_count(fields, "failed") or _count(fields, "exit_code")):
        return FAILED
    return str(status) if status in (DONE, RUNNING, FAILED) else UNKNOWN


def rate(bytes_sent: int | None, seconds: float | None) -> float | None:
    if bytes_sent is None or not seconds or seconds <= 0:
        return None
    return round(bytes_sent / seconds, 1)


def describe_shard(push: ShardedPush, index: int, fields: dict[str, Any] | None,
                   state: str) -> dict[str, Any]:
    """One shard as `shards --json` prints it (the fields README documents)."""
    have = fields or {}
    seconds = _seconds(have) if state in (DONE, FAILED) else None
    counts = {name: _count(have, name) for name in COUNTS}
    return {
        "type": "shard", "shard": index, "shards": push.count, "status": state,
        "host": _text(have, "host"), "pid": _count(have, "pid"),
        "started": _text(have, "started"), "ended": _text(have, "ended"),
        "seconds": seconds, **counts,
        "bytes_per_second": rate(counts["bytes"], seconds),
        "exit_code": _count(have, "exit_code"),
        "report": push.reports.get(index), "manifest": push.manifests.get(index),
    }


def summarize(push: ShardedPush, shards: list[dict[str, Any]], judged: bool) -> dict[str, Any]:
    """The push's counts of shards by state, and the totals of the shards that ended (their
    time: from the first start among them to the last end, as they ran side by side)."""
    states = {state: sum(1 for shard in shards if shard["status"] == state)
              for state in STATES}
    ended = [shard for shard in shards if shard["status"] in (DONE, FAILED)]
    totals = {name: sum(shard[name] or 0 for shard in ended) for name in COUNTS}
    starts = [moment for shard in ended if (moment := parse_time(shard["started"])) is not None]
    ends = [moment for shard in ended if (moment := parse_time(shard["ended"])) is not None]
    seconds = max(ends) - min(starts) if starts and ends else None
    return {
        "type": "summary", "shards": push.count, "judged": judged, **states, "totals": {
            **totals, "started": iso(min(starts)) if starts else None,
            "ended": iso(max(ends)) if ends else None, "seconds": seconds,
            "bytes_per_second": rate(totals["bytes"], seconds),
        },
        "complete": states[DONE] == push.count,
    }


def report_of(key: str, text: str) -> dict[str, Any] | None:
    try:
        fields = json.loads(text)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        log.warning("%s: not a shard report (not a JSON object)", printable(key))
        return None
    return fields


async def read_report(store: ObjectStore, key: str) -> tuple[str, dict[str, Any] | None]:
    """The shard's state and its report's fields; missing if it is gone since the listing,
    unknown (said as a warning) if it cannot be read."""
    try:
        text = await read_body(store, key)
    except Unreadable as exc:
        if exc.gone:
            return MISSING, None
        log.warning("%s: %s", printable(key), exc)
        return UNKNOWN, None
    fields = report_of(key, text)
    return state_of(fields), fields


def check_partition(push: ShardedPush, fields: list[dict[str, Any] | None]) -> None:
    """Warn when the reports disagree on what --shard splits: such shards together may
    upload a file twice, or never."""
    splits = {(found.get("by"), found.get("run_depth")) for found in fields
              if found is not None and "by" in found}
    if len(splits) > 1:
        said = ", ".join(f"--shard-by {by} --run-depth {depth}"
                         for by, depth in sorted(splits, key=str))
        log.warning("the %d shards disagree on what they split (%s): together they may miss "
                    "files or upload them twice", push.count, printable(said))


async def describe_push(store: ObjectStore, push: ShardedPush,
                        judged: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    indexes = list(range(push.count))

    async def read(key: str) -> tuple[str, dict[str, Any] | None]:
        return await read_report(store, key)

    read_back = await bounded(read, [push.reports.get(index) for index in indexes])
    states = [found[0] if found else MISSING for found in read_back]
    fields = [found[1] if found else None for found in read_back]
    shards = [describe_shard(push, index, fields[index], states[index]) for index in indexes]
    check_partition(push, fields)
    return shards, summarize(push, shards, judged)


# -- output ----------------------------------------------------------------------------------


def _when(text: object) -> str:
    moment = parse_time(text)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(moment)) if moment is not None \
        else "-"


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _size(value: int | None) -> str:
    return "-" if value is None else human_bytes(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{human_bytes(value)}/s"


def table(shards: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """The shards and their totals as a table (times in UTC), then the counts line."""
    header = ["SHARD", "STATUS", "HOST", "STARTED", "DURATION", "FILES", "SIZE", "FAILED",
              "RATE"]
    lines = [header]
    for shard in shards:
        lines.append([
            f"{shard['shard']}/{shard['shards']}", shard["status"],
            printable(shard["host"] or "-"), _when(shard["started"]),
            human_seconds(shard["seconds"]), _number(shard["files"]), _size(shard["bytes"]),
            _number(shard["failed"]), _rate(shard["bytes_per_second"]),
        ])
    totals = summary["totals"]
    lines.append(["total", "", "", _when(totals["started"]), human_seconds(totals["seconds"]),
                  str(totals["files"]), human_bytes(totals["bytes"]), str(totals["failed"]),
                  _rate(totals["bytes_per_second"])])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rows = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            .rstrip() for line in lines]
    return [*rows, counts_line(summary)]


def counts_line(summary: dict[str, Any]) -> str:
    """``3/4 done, 1 running, 0 missing, 0 failed`` (and the unknown, where there are)."""
    line = (f"{summary[DONE]}/{summary['shards']} done, {summary[RUNNING]} running, "
            f"{summary[MISSING]} missing, {summary[FAILED]} failed")
    return line + (f", {summary[UNKNOWN]} unknown" if summary[UNKNOWN] else "")


async def run_shards(config: ShardsConfig, out: TextIO | None = None) -> int:
    """Show the shards of the sharded push under DEST: 0 when all N are done without
    failures, 1 otherwise (or when there is no sharded push under DEST). A bad DEST, a
    missing bucket or refused credentials raise ConfigError (exit 2), a store that never
    answers EndpointUnreachable (exit 1)."""
    stream = out or sys.stdout
    folder = shards_folder(config.destination.prefix)
    async with reading_store(config.destination, config.store) as store:
        pushes = sharded_pushes([info async for info in store.list_objects(folder + "/")],
                                folder)
        described = [await describe_push(store, push, judged=index == 0)
                     for index, push in enumerate(pushes)]
    if not described:
        log.error("no sharded push found under %s (no %s/)", printable(config.destination.url),
                  SHARDS_DIRECTORY)
        return EXIT_SOME_FAILED
    if len(described) > 1:
        log.warning("%d sharded pushes under %s (N = %s): judged by the newest, N = %d",
                    len(described), printable(config.destination.url),
                    ", ".join(str(push.count) for push in pushes), pushes[0].count)
    for index, (shards, summary) in enumerate(described):
        if config.json:
            for record in (*shards, summary):
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            continue
        if len(described) > 1:
            title = f"push --shard I/{summary['shards']}"
            stream.write(("\n" if index else "") + title
                         + (" (the newest: judged)" if index == 0 else "") + "\n")
        stream.write("\n".join(table(shards, summary)) + "\n")
    return EXIT_OK if described[0][1]["complete"] else EXIT_SOME_FAILED
