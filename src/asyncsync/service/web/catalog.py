"""What the bucket says of each run, read once and revalidated by ETag.

A page load lists PREFIX once (`commands.runs` finds the runs in that listing); a run whose
records, results.csv and args.yaml have the ETags they had at the last load, and whose listed
objects did not change, keeps its summary: only its status is judged again (a running run
turns stale with time alone). So a reload over a thousand runs costs one listing and no
GET; a run that wrote an epoch costs one GET of its results.csv. Loads that arrive together
share one listing; a listing younger than `FRESH_FOR` is used as it is, and one younger than
`STALE_FOR` is shown while the next is made in the background, so a reload waits for no
listing (the page says when the bucket was read). A run's curves (its results.csv as
columns) are kept for the last few runs viewed, by ETag too. With the watch daemon's
`Snapshot` (``watch --serve``), each run also carries the node's live sync state: files
pending, failures, last upload.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ...commands.runs import (
    ARGS,
    RECORD_NAME,
    RESULTS,
    Record,
    Run,
    Tree,
    bounded,
    describe_run,
    parse_time,
    planned_epochs,
    read_text,
    record_of,
    runs_found,
    status_of,
)
from ...config import Destination
from ...stores.protocol import ObjectInfo, ObjectStore
from ..daemon import Snapshot
from ..training import Epoch, epochs_of, number, parse_results

StoreGetter = Callable[[], Awaitable[ObjectStore]]
# Curves kept in memory: the runs a few people are looking at.
CURVES_KEPT = 32
# A listing is used as it is this long; until STALE_FOR it is still shown while the next one
# is made in the background (the runs page refreshes every 10 s); older, it is made first.
FRESH_FOR = 2.0
STALE_FOR = 30.0


@dataclass(frozen=True)
class Summary:
    """One run's description (`commands.runs.describe_run`'s fields, plus the duration and
    the live sync state where there is one) and what its status is judged again from."""

    fingerprint: tuple[Any, ...]
    described: dict[str, Any]
    epoch_seconds: float | None


@dataclass(frozen=True)
class Curves:
    """A run's results.csv as columns: the epochs and, per numeric column, one value per
    epoch (None where a row has none)."""

    epochs: list[int]
    columns: dict[str, list[float | None]]


def curves_of(epochs: list[Epoch]) -> Curves:
    names: dict[str, None] = {}
    for epoch in epochs:
        names.update(dict.fromkeys(epoch.values))
    return Curves([epoch.epoch for epoch in epochs],
                  {name: [epoch.values.get(name) for epoch in epochs] for name in names})


class RunCatalog:
    """The runs under one destination, cached between page loads (see the module doc)."""

    def __init__(self, store: StoreGetter, destination: Destination, run_depth: int, *,
                 live: Callable[[], Snapshot] | None = None, fresh_for: float = FRESH_FOR,
                 stale_for: float = STALE_FOR) -> None:
        self.destination = destination
        self.run_depth = run_depth
        self.live = live
        self._store = store
        self._fresh_for = fresh_for
        self._stale_for = stale_for
        self._background: asyncio.Task[None] | None = None
        self._listed_wall: float | None = None
        prefix = destination.prefix
        self.base = f"{prefix}/" if prefix else ""
        self._records: dict[str, tuple[str, Record | None]] = {}  # key -> (etag, record)
        self._summaries: dict[str, Summary] = {}
        self._curves: OrderedDict[str, tuple[str, Curves]] = OrderedDict()
        self._runs: dict[str, Run] = {}
        self._listed: dict[str, ObjectInfo] = {}
        self._listed_at = -1e9
        self._lock = asyncio.Lock()
        self.reads = 0  # GETs made, for the benchmark and the tests
        self.listings = 0

    async def store(self) -> ObjectStore:
        return await self._store()

    async def runs(self) -> list[dict[str, Any]]:
        """Every run, described as of now (sorted by path). A listing younger than
        `fresh_for` is used as it is; one younger than `stale_for` too, while a new one is
        made in the background for the next load; an older one is made again first."""
        age = time.monotonic() - self._listed_at
        if age > self._stale_for:
            await self._refresh_once()
        elif age > self._fresh_for and self._background is None:
            self._background = asyncio.get_running_loop().create_task(self._refresh_once())
            self._background.add_done_callback(self._refreshed)
        now = time.time()
        snapshot = self.live() if self.live is not None else None
        return [self._current(self._summaries[path], now, snapshot)
                for path in sorted(self._runs)]

    @property
    def listed_at(self) -> float | None:
        """When the bucket was last listed (wall time), None before the first listing."""
        return self._listed_wall

    async def _refresh_once(self) -> None:
        started = time.monotonic()
        async with self._lock:
            if self._listed_at < started:  # not listed meanwhile by another load
                await self._refresh()

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._background = None
        if not task.cancelled() and task.exception() is not None:
            # The next load lists again in the foreground and says what failed.
            self._listed_at = -1e9

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)

    async def run(self, path: str) -> dict[str, Any] | None:
        for described in await self.runs():
            if described["run"] == path:
                return described
        return None

    def _text_read(self, store: ObjectStore) -> Callable[[str], Awaitable[str | None]]:
        async def read(key: str) -> str | None:
            self.reads += 1
            return await read_text(store, key)
        return read

    async def _refresh(self) -> None:
        store = await self._store()
        tree = Tree()
        listed: dict[str, ObjectInfo] = {}
        base = self.base
        async for info in store.list_objects(base):
            relative = info.key[len(base):]
            tree.add(relative, info)
            if relative.rpartition("/")[2] in (RECORD_NAME, RESULTS, ARGS):
                listed[info.key] = info
        self.listings += 1
        read = self._text_read(store)

        async def record(key: str) -> Record | None:
            etag = listed[key].etag
            known = self._records.get(key)
            if known is not None and known[0] == etag:
                return known[1]
            text = await read(key)
            found = None if text is None else record_of(key, tree.records[key], text)
            self._records[key] = (etag, found)
            return found

        records = [found for found in await bounded(record, list(tree.records)) if found]
        for key in [key for key in self._records if key not in tree.records]:
            del self._records[key]
        runs = runs_found(tree, records, self.run_depth, self.destination.url)
        self._listed = listed
        stale = []
        for run in runs:
            known = self._summaries.get(run.path)
            if known is None or known.fingerprint != self._fingerprint(run):
                stale.append(run)
        results = await bounded(read, [run.results for run in stale])
        args = await bounded(read, [run.args for run in stale])
        now = time.time()
        for run, csv_text, yaml_text in zip(stale, results, args, strict=True):
            rows = parse_results(csv_text) if csv_text is not None else None
            described = describe_run(run, rows, planned_epochs(yaml_text),
                                     self.destination.url, now)
            self._summaries[run.path] = Summary(self._fingerprint(run), described,
                                                _epoch_seconds(run, rows))
        self._runs = {run.path: run for run in runs}
        for path in [path for path in self._summaries if path not in self._runs]:
            del self._summaries[path]
        self._listed_at = time.monotonic()
        self._listed_wall = time.time()

    def _fingerprint(self, run: Run) -> tuple[Any, ...]:
        def etag(key: str | None) -> str | None:
            info = self._listed.get(key) if key is not None else None
            return info.etag if info is not None else None

        return (etag(run.record.key if run.record else None),
                etag(run.parent.key if run.parent else None), run.results, etag(run.results),
                etag(run.args), run.objects, run.bytes, run.newest, run.weights)

    def _current(self, summary: Summary, now: float, snapshot: Snapshot | None
                 ) -> dict[str, Any]:
        described = dict(summary.described)
        run = self._runs[described["run"]]
        if described["status"] in ("running", "stale"):
            described["status"] = status_of(run.fields, parse_time(described["last_sync"]),
                                            summary.epoch_seconds, now)
        started = parse_time(described["started"])
        until = parse_time(described["ended"]) or (
            now if described["status"] == "running" else parse_time(described["last_sync"]))
        described["duration"] = (until - started if started is not None and until is not None
                                 and until >= started else None)
        described["live"] = None
        if snapshot is not None:
            status = snapshot.runs.get(described["run"])
            described["live"] = {
                "pending": status.pending if status else 0,
                "pending_bytes": status.pending_bytes if status else 0,
                "failures": status.failures if status else 0,
                "last_upload": status.last_sync if status else None,
                "store_up": snapshot.store_up,
            }
        return described

    async def curves(self, path: str) -> Curves | None:
        """The run's results.csv as columns, or None when it has none (or no such run)."""
        async with self._lock:
            run = self._runs.get(path)
            info = self._listed.get(run.results) if run is not None and run.results else None
        if run is None or info is None:
            return None
        known = self._curves.get(info.key)
        if known is not None and known[0] == info.etag:
            self._curves.move_to_end(info.key)
            return known[1]
        text = await self._text_read(await self._store())(info.key)
        if text is None:
            return None
        curves = curves_of(epochs_of(text))
        self._curves[info.key] = (info.etag, curves)
        while len(self._curves) > CURVES_KEPT:
            self._curves.popitem(last=False)
        return curves

    async def objects(self, path: str) -> list[ObjectInfo]:
        """The objects of one run (listed now), without asyncsync's own."""
        store = await self._store()
        prefix = f"{self.base}{path}/" if path else self.base
        found = []
        async for info in store.list_objects(prefix):
            relative = info.key[len(prefix):]
            if "_asyncsync/" in f"/{relative}":
                continue
            found.append(info)
        return found

    async def text(self, key: str) -> str | None:
        return await self._text_read(await self._store())(key)


def _epoch_seconds(run: Run, rows: list[dict[str, str]] | None) -> float | None:
    """As `describe_run` judges staleness: the mean epoch from results.csv's ``time``."""
    fields = run.fields
    started = parse_time(fields.get("started")) if fields else None
    if not rows or started is None:
        return None
    elapsed = number(rows[-1].get("time"))
    return elapsed / len(rows) if elapsed is not None else None
