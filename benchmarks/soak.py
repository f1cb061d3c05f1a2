#!/usr/bin/env python3
"""The chaos soak: a fleet of simulated trainings under `asyncsync watch`, random faults for
minutes on end, and the proof that nothing is lost, nothing is torn, nothing leaks.

Everything is real: the `asyncsync watch` command as its own process, an embedded SeaweedFS,
the fault proxy of the test suite between them (tests/faultproxy.py), signals, and a small
filesystem under the state directory that fills up. The load (soak_load.py): trainings that
write ultralytics-shaped runs, each file version carrying its own proof of completeness. The
faults (soak_faults.py), drawn from the seed: SIGKILL and SIGTERM of watch (restarted), the
store stopped for a while, 503 bursts, SlowDown answers, connections reset mid-body, latency
spikes, the state directory's disk full. The restarts come in the first 40% of the load
only (all through under --small): one watch process then lives through the rest under every
other fault, and the RSS and descriptor verdicts rest on a line fitted to its samples. A
poller reads every object version it can, all along, straight from the store, and checks
each one. At the end the trainings stop, the faults stop, watch gets its final SIGTERM, and
the soak checks what must hold. Then the two scenarios of soak_scenarios.py: a minute-long
push storm against 30% 503s, and 200 run directories under one watch.

    .venv/bin/python benchmarks/soak.py                 # 10 minutes; writes SOAK.md, soak.png
    .venv/bin/python benchmarks/soak.py --minutes 3 --seed 7
    .venv/bin/python benchmarks/soak.py --render-only   # redraw SOAK.md from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import xxhash

from asyncsync.embedded_s3 import SeaweedFS, find_program
from soak_faults import (
    KINDS,
    ChaosProxy,
    Fault,
    FaultTiming,
    StateDisk,
    fault_schedule,
    state_disk,
)
from soak_load import Fleet, LoadShape, MiB, torn_reason

HERE = Path(__file__).resolve().parent
BUCKET = "asyncsync-soak"
PREFIX = "soak"
HISTORY = f"{PREFIX}/_asyncsync/history/"

# Trainings and sizes of the issue; the test suite's minute-long version scales them down.
FULL_SHAPE = LoadShape(trainings=20, checkpoint_min=5 * MiB, checkpoint_max=40 * MiB,
                       epoch_min_s=1.0, epoch_max_s=5.0, epochs_min=8, epochs_max=40,
                       restart_chance=0.02, recreate_chance=0.015, plot_period_s=3.0)
SMALL_SHAPE = LoadShape(trainings=6, checkpoint_min=1 * MiB, checkpoint_max=10 * MiB,
                        epoch_min_s=1.0, epoch_max_s=3.0, epochs_min=4, epochs_max=12,
                        restart_chance=0.06, recreate_chance=0.05, plot_period_s=2.0)


@dataclass(frozen=True)
class SoakPlan:
    """Everything one soak run does, fixed before it starts."""

    seed: int
    load_s: float  # trainings run this long
    quiet_s: float  # the last part of the load with no fault: time-to-durable settles
    shape: LoadShape
    timing: FaultTiming
    settle_s: float = 1.0
    checkpoint_interval_s: float = 5.0
    grace_s: float = 30.0
    warmup_s: float = 20.0  # RSS and fd samples this soon after a (re)start are not fitted
    state_disk_bytes: int = 64 * MiB
    kinds: tuple[str, ...] = KINDS
    # The trend verdict: the longest-lived watch process must have lived this long under
    # load, and its first long_warmup_s (catching up on what its predecessors left) is not
    # fitted.
    long_life_min_s: float = 240.0
    long_warmup_s: float = 60.0

    @classmethod
    def for_minutes(cls, minutes: float, seed: int, small: bool = False,
                    restart_share: float | None = None) -> SoakPlan:
        """The plan of a soak of ``minutes`` of load. Restarts (SIGKILL, SIGTERM) fall in the
        first ``restart_share`` of the load, the other faults all through: by default 40% in
        the full soak, so one watch process lives through the rest, and all of it under
        --small (the suite's minute is too short for a trend anyway, and keeps its
        restarts)."""
        load = minutes * 60
        quiet = 15.0 if small else max(20.0, min(60.0, load * 0.15))
        shape = SMALL_SHAPE if small else FULL_SHAPE
        share = (1.0 if small else 0.4) if restart_share is None else restart_share
        timing = FaultTiming(
            first_at=5.0, last_at=load - quiet, mean_gap_s=2.5 if small else 6.0,
            outage_min_s=5.0, outage_max_s=8.0 if small else 30.0,
            disk_full_min_s=3.0, disk_full_max_s=6.0 if small else 20.0,
            restarts_until=None if share >= 1.0 else load * share)
        # Twenty trainings rewriting 5-40 MB checkpoints every 1-5 s write ~150 MB/s: more
        # than two shared cores can send with the store beside them. Paced every 5 s the
        # queue only grew (113 GB written, 25 GB sent in ten minutes) and time-to-durable
        # measured the backlog; every 20 s (a node's setting is minutes) it is ~20 MB/s.
        return cls(seed=seed, load_s=load, quiet_s=quiet, shape=shape, timing=timing,
                   checkpoint_interval_s=3.0 if small else 20.0,
                   grace_s=20.0 if small else 30.0, warmup_s=5.0 if small else 20.0,
                   long_life_min_s=30.0 if small else 240.0,
                   long_warmup_s=10.0 if small else 60.0)

    @classmethod
    def from_dict(cls, plan: dict[str, Any]) -> SoakPlan:
        """The plan a results file recorded (`asdict` of one)."""
        fields = dict(plan)
        fields["shape"] = LoadShape(**fields["shape"])
        fields["timing"] = FaultTiming(**fields["timing"])
        fields["kinds"] = tuple(fields["kinds"])
        return cls(**fields)

    def watch_options(self) -> list[str]:
        return ["--interval", "1", "--settle", str(self.settle_s),
                "--checkpoint-interval", str(self.checkpoint_interval_s),
                "--grace", str(self.grace_s), "--multipart-threshold", "8MiB",
                "--part-size", "5MiB", "--read-timeout", "20", "--connect-timeout", "3"]


# -- the daemon -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@dataclass
class WatchExit:
    at: float
    how: str  # sigkill, sigterm, final, unexpected
    code: int
    seconds: float  # from the signal to the exit


class Watch:
    """`asyncsync watch` as a child process that the soak kills and restarts."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path,
                 clock: Callable[[], float]) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.clock = clock
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.started_at = 0.0
        self.exits: list[WatchExit] = []
        self.lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        with self.lock:
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                log.write(f"--- soak: start {self.generation + 1} at t+{self.clock():.1f}s\n"
                          .encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [*self.argv, "--metrics-addr", f"127.0.0.1:{self.port}"], env=self.env,
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
            self.generation += 1
            self.started_at = self.clock()

    def wait_healthy(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                if http_get(self.port, "/healthz")[0] == 200:
                    return True
            time.sleep(0.1)
        return False

    def stop(self, how: str, sig: int, timeout: float) -> WatchExit | None:
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return None
        started = time.monotonic()
        if proc.poll() is not None:  # it had died by itself before the signal
            record = WatchExit(self.clock(), "unexpected", int(proc.returncode), 0.0)
            self.exits.append(record)
            return record
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -999  # ignored the signal for `timeout` seconds
        record = WatchExit(self.clock(), how, code, time.monotonic() - started)
        self.exits.append(record)
        return record

    def check_unexpected_exit(self) -> WatchExit | None:
        """The daemon died by itself: record it (and let the caller restart it)."""
        with self.lock:
            proc = self.proc
            if proc is None or proc.poll() is None:
                return None
            self.proc = None
        record = WatchExit(self.clock(), "unexpected", int(proc.returncode), 0.0)
        self.exits.append(record)
        return record


# -- watching it all ----------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    generation: int
    rss_mb: float | None = None
    fds: int | None = None
    in_flight: float | None = None
    queue: float | None = None
    ttd: dict[str, float] | None = None  # cumulative bucket counts of time-to-durable
    loadavg: float = 0.0


def proc_status_kib(pid: int, name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def _metrics(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """The unlabelled series of a /metrics text, and the time-to-durable buckets."""
    plain: dict[str, float] = {}
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("asyncsync_time_to_durable_seconds_bucket{"):
            found = re.search(r'le="([^"]+)"', name)
            if found:
                buckets[found[1]] = float(value)
        elif "{" not in name:
            plain[name] = float(value)
    return plain, buckets


class Sampler(threading.Thread):
    """Once a second: the daemon's RSS, open descriptors, in-flight uploads, queue and
    time-to-durable histogram."""

    def __init__(self, watch: Watch, stop: threading.Event) -> None:
        super().__init__(name="sampler", daemon=True)
        self.watch = watch
        self.stop_requested = stop
        self.samples: list[Sample] = []

    def run(self) -> None:
        while not self.stop_requested.wait(1.0):
            self.samples.append(self.sample())

    def sample(self) -> Sample:
        watch = self.watch
        sample = Sample(watch.clock(), watch.generation, loadavg=os.getloadavg()[0])
        pid = watch.pid
        if pid is None:
            return sample
        rss = proc_status_kib(pid, "VmRSS")
        sample.rss_mb = None if rss is None else rss / 1024
        with contextlib.suppress(OSError):
            sample.fds = len(os.listdir(f"/proc/{pid}/fd"))
        with contextlib.suppress(OSError, ValueError):
            status, text = http_get(watch.port, "/metrics")
            if status == 200:
                plain, buckets = _metrics(text)
                sample.in_flight = plain.get("asyncsync_uploads_in_flight")
                sample.queue = plain.get("asyncsync_queue_depth")
                sample.ttd = buckets
        return sample


@dataclass
class TornVersion:
    key: str
    etag: str
    reason: str
    at: float
    saved: str


class Poller(threading.Thread):
    """Reads every object version it can, straight from the store (not through the proxy),
    and checks that each one is complete."""

    def __init__(self, client: Any, clock: Callable[[], float], torn_dir: Path,
                 stop: threading.Event) -> None:
        super().__init__(name="poller", daemon=True)
        self.client = client
        self.clock = clock
        self.torn_dir = torn_dir
        self.stop_requested = stop
        self.seen: set[tuple[str, str]] = set()
        self.versions_checked = 0
        self.bytes_read = 0
        self.torn: list[TornVersion] = []
        self.errors = 0
        self.csv_seen: dict[str, list[bytes]] = {}  # key: every results.csv version seen
        self._lock = threading.Lock()

    def run(self) -> None:
        with ThreadPoolExecutor(2, thread_name_prefix="poller-get") as pool:
            while not self.stop_requested.is_set():
                try:
                    listed = self._list()
                except Exception:
                    self.errors += 1
                    self.stop_requested.wait(1.0)
                    continue
                fresh = [(k, e) for k, e in listed if (k, e) not in self.seen]
                list(pool.map(lambda item: self._check(*item), fresh))
                self.stop_requested.wait(0.3)

    def _list(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for page in pages:
            found.extend((obj["Key"], obj["ETag"]) for obj in page.get("Contents", []))
        return found

    def _check(self, key: str, etag: str) -> None:
        try:
            answer = self.client.get_object(Bucket=BUCKET, Key=key)
            try:
                body = answer["Body"].read()
            finally:
                answer["Body"].close()
        except Exception:
            self.errors += 1  # gone since the listing, or the store is down: not a version
            return
        etag = answer.get("ETag", etag)
        with self._lock:
            if (key, etag) in self.seen:
                return
            self.seen.add((key, etag))
            self.versions_checked += 1
            self.bytes_read += len(body)
        reason = torn_reason(key, body)
        if reason is None:
            if key.endswith("results.csv") and not key.startswith(HISTORY):
                with self._lock:
                    self.csv_seen.setdefault(key, []).append(body)
            return
        self.torn_dir.mkdir(parents=True, exist_ok=True)
        saved = self.torn_dir / f"{len(self.torn):03d}-{key.replace('/', '_')}"
        saved.write_bytes(body)
        with self._lock:
            self.torn.append(TornVersion(key, etag, reason, self.clock(), str(saved)))


# -- the faults, applied ----------------------------------------------------------------------


@dataclass
class FaultLog:
    injected: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    windows: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, kind
    skipped: dict[str, str] = field(default_factory=dict)
    late_s: float = 0.0  # the most a fault ran behind its schedule


class Chaos:
    """Applies the schedule: each fault at its time, a lasting one ended by a timer."""

    def __init__(self, plan: SoakPlan, watch: Watch, store: SeaweedFS, proxy: ChaosProxy,
                 disk: StateDisk, clock: Callable[[], float]) -> None:
        self.plan = plan
        self.watch = watch
        self.store = store
        self.proxy = proxy
        self.disk = disk
        self.clock = clock
        self.log = FaultLog()
        self.store_down = threading.Event()
        self.store_lock = threading.Lock()
        self.timers: list[threading.Timer] = []
        self.unexpected: list[dict[str, Any]] = []  # found dead when a signal was due
        self.generation_starts = {watch.generation: watch.started_at}
        self.watch_faults: queue.Queue[Fault | None] = queue.Queue()
        self.watch_worker = threading.Thread(target=self._watch_faults, name="watch-faults",
                                             daemon=True)
        self.watch_worker.start()
        if not disk.usable:
            self.log.skipped["disk-full"] = disk.how

    def _later(self, seconds: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def _window(self, fault: Fault, length: float) -> None:
        start = self.clock()
        self.log.windows.append((start, start + length, fault.kind))

    def apply(self, fault: Fault) -> None:
        self.log.late_s = max(self.log.late_s, self.clock() - fault.at)
        kind = fault.kind
        if kind in self.log.skipped:
            return
        self.log.injected[kind] += 1
        if kind in ("sigkill", "sigterm"):
            # A SIGTERM drains for up to --grace seconds: the other faults must not wait.
            self.watch_faults.put(fault)
        elif kind == "store-outage":
            with self.store_lock:
                self.store.pause()
                self.store_down.set()
            self._window(fault, fault.duration)
            self._later(fault.duration, self._store_back)
        elif kind == "disk-full":
            self.disk.fill()
            self._window(fault, fault.duration)
            self._later(fault.duration, self.disk.free)
        elif kind == "503-burst":
            self.proxy.set_error_rate(0.5)
            self._window(fault, fault.duration)
            self._later(fault.duration, lambda: self.proxy.set_error_rate(0.0))
        elif kind == "slowdown":
            self.proxy.inject("503", fault.count, method="PUT")
            self._window(fault, 1.0)
        elif kind == "reset-mid-body":
            self.proxy.inject("reset", fault.count, method="PUT")
            self._window(fault, 1.0)
        elif kind == "latency-spike":
            self.proxy.inject("delay", fault.count, delay=fault.delay)
            self._window(fault, fault.duration)

    def _watch_faults(self) -> None:
        """One watch fault at a time, each with its restart, beside the other faults."""
        while (fault := self.watch_faults.get()) is not None:
            sig = signal.SIGKILL if fault.kind == "sigkill" else signal.SIGTERM
            started = self.clock()
            stopped = self.watch.stop(fault.kind, sig, timeout=self.plan.grace_s + 15)
            if stopped is not None and stopped.how == "unexpected":
                self.unexpected.append(asdict(stopped))
            time.sleep(fault.duration)
            self.watch.start()
            self.watch.wait_healthy()
            self.generation_starts[self.watch.generation] = self.watch.started_at
            self.log.windows.append((started, self.clock(), fault.kind))

    def stop_watch_faults(self) -> None:
        self.watch_faults.put(None)
        self.watch_worker.join()

    def _store_back(self) -> None:
        # The timer and calm() may both get here: one restart, the other waits for it.
        with self.store_lock:
            if self.store_down.is_set():
                self.store.resume(timeout=60)
                self.store_down.clear()

    def calm(self) -> None:
        """Every lasting fault ended now, whatever its timer says."""
        for timer in self.timers:
            timer.cancel()
        self.proxy.clear_rules()
        self.proxy.set_error_rate(0.0)
        self.disk.free()
        self._store_back()


# -- the figures ----------------------------------------------------------------------------


def pooled_slope(samples: list[Sample], value: Callable[[Sample], float | None],
                 starts: dict[int, float], warmup: float) -> tuple[float, int]:
    """The within-process slope of ``value`` per second (each daemon process has its own
    intercept; samples within ``warmup`` of its start are left out), and the samples used."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for s in samples:
        v = value(s)
        if v is None or s.t - starts.get(s.generation, 0.0) < warmup:
            continue
        groups.setdefault(s.generation, []).append((s.t, v))
    num = den = 0.0
    used = 0
    for points in groups.values():
        if len(points) < 3:
            continue
        mt = sum(t for t, _ in points) / len(points)
        mv = sum(v for _, v in points) / len(points)
        num += sum((t - mt) * (v - mv) for t, v in points)
        den += sum((t - mt) ** 2 for t, _ in points)
        used += len(points)
    return (num / den if den else 0.0), used


@dataclass(frozen=True)
class LifeTrend:
    """A line fitted to one watch process's samples, and how far to trust its slope."""

    generation: int
    life_s: float  # from its start to its last sample under load
    fitted_from: float  # offsets (s) of the first and last sample fitted
    fitted_to: float
    n: int
    slope_per_s: float
    intercept: float  # at t = 0
    residual_sd: float
    lag1: float  # lag-1 autocorrelation of the residuals
    slope_se_per_s: float  # standard error, widened for that autocorrelation (AR(1))

    def per_10min(self, value: float) -> float:
        return value * 600


def life_trend(samples: list[Sample], value: Callable[[Sample], float | None],
               starts: dict[int, float], warmup: float, until: float) -> LifeTrend | None:
    """The least-squares line through ``value`` of the longest-lived watch process, from
    ``warmup`` seconds after its start to ``until`` (the load's end); None if too few."""
    lives: dict[int, list[Sample]] = {}
    for s in samples:
        if s.t <= until and value(s) is not None:
            lives.setdefault(s.generation, []).append(s)
    if not lives:
        return None

    def life(generation: int) -> float:
        return lives[generation][-1].t - starts.get(generation, lives[generation][0].t)

    generation = max(lives, key=life)
    start = starts.get(generation, lives[generation][0].t)
    points = [(s.t, float(value(s))) for s in lives[generation]  # type: ignore[arg-type]
              if s.t - start >= warmup]
    n = len(points)
    if n < 10:
        return None
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    stt = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (v - mv) for t, v in points) / stt
    intercept = mv - slope * mt
    residuals = [v - (intercept + slope * t) for t, v in points]
    sd = (sum(r * r for r in residuals) / (n - 2)) ** 0.5
    ss = sum(r * r for r in residuals)
    lag1 = (sum(a * b for a, b in zip(residuals, residuals[1:], strict=False)) / ss
            if ss else 0.0)
    # Successive samples a second apart are far from independent: the AR(1) factor.
    rho = min(max(lag1, 0.0), 0.99)
    se = sd / stt ** 0.5 * ((1 + rho) / (1 - rho)) ** 0.5
    return LifeTrend(generation, round(life(generation), 1), round(points[0][0], 1),
                     round(points[-1][0], 1), n, slope, intercept, sd, lag1, se)


def ttd_counts(samples: list[Sample], keep: Callable[[float, float], bool]) -> dict[str, float]:
    """Time-to-durable observations, as bucket counts, made between consecutive scrapes of
    one daemon process for which ``keep(t_from, t_to)`` holds."""
    total: dict[str, float] = {}
    previous: dict[int, Sample] = {}
    for s in samples:
        if s.ttd is None:
            continue
        before = previous.get(s.generation)
        previous[s.generation] = s
        base = before.ttd if before is not None and before.ttd is not None else {}
        start = before.t if before is not None else s.t - 1.0
        if not keep(start, s.t):
            continue
        for le, count in s.ttd.items():
            total[le] = total.get(le, 0.0) + max(0.0, count - base.get(le, 0.0))
    return total


def quantile(buckets: dict[str, float], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (linear in a bucket)."""
    bounds = sorted(((float(le), n) for le, n in buckets.items()), key=lambda b: b[0])
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if upper == float("inf"):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


# -- the soak -------------------------------------------------------------------------------


def client_env(store: SeaweedFS, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(store.env())
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


class StoreReadError(Exception):
    """The store has the key but cannot serve its body (it lost the data it acknowledged)."""


def object_bytes(client: Any, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        answer = client.get_object(Bucket=BUCKET, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    except ClientError as exc:
        raise StoreReadError(f"{key}: {exc}") from exc
    try:
        return bytes(answer["Body"].read())
    finally:
        answer["Body"].close()


def bucket_keys(client: Any) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def local_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def missing_or_different(client: Any, root: Path) -> tuple[list[str], list[str]]:
    """The local files whose object is missing or not byte-identical to them, and those
    whose object the store lists but cannot serve."""
    wrong, unreadable = [], []
    for relative, path in local_files(root).items():
        try:
            body = object_bytes(client, f"{PREFIX}/{relative}")
        except StoreReadError as exc:
            unreadable.append(str(exc)[:300])
            continue
        if body is None or xxhash.xxh3_128_digest(body) != xxhash.xxh3_128_digest(
                path.read_bytes()):
            wrong.append(relative)
    return wrong, unreadable


def wait_converged(client: Any, root: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            wrong, _ = missing_or_different(client, root)
        except Exception as exc:  # the store still recovering
            wrong = [f"(store: {type(exc).__name__})"]
        if not wrong or time.monotonic() > deadline:
            return wrong
        time.sleep(2.0)


def history_check(client: Any, fleet: Fleet, csv_seen: dict[str, list[bytes]],
                  keys: list[str]) -> list[str]:
    """Each recreated results.csv whose old content reached the bucket (the poller saw a
    version of it with rows) has a copy of that content under the history area: a version
    with rows that the old content starts with. (Its last rows may never have gone up: watch
    may have been down when the training restarted.)"""
    from soak_load import CSV_HEADER

    header = len(CSV_HEADER)
    history: dict[str, list[bytes]] = {}
    for key in keys:
        if key.startswith(HISTORY):
            relative = key[len(HISTORY):].rsplit("/", 1)[0]
            with contextlib.suppress(StoreReadError):
                body = object_bytes(client, key)
                if body is not None:
                    history.setdefault(relative, []).append(body)
    problems = []
    for recreation in fleet.log.recreated:
        previous = recreation.previous
        seen = csv_seen.get(f"{PREFIX}/{recreation.relative}", [])
        if not any(len(b) > header and previous.startswith(b) for b in seen):
            continue
        kept = history.get(recreation.relative, [])
        if not any(len(h) > header and previous.startswith(h) for h in kept):
            how = "restarted in place" if recreation.in_place else "directory recreated"
            problems.append(f"{recreation.relative} ({how}): none of its {len(kept)} history "
                            f"copies holds the {len(previous)}-byte content it had before it was "
                            "recreated")
    return problems


def manifest_rows(state: Path) -> int:
    with sqlite3.connect(f"file:{state / 'manifest.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT count(*) FROM objects").fetchone()[0])


def leftover_temp(state: Path) -> list[str]:
    left: list[str] = []
    for name in ("tmp", "staging"):
        folder = state / name
        if folder.is_dir():
            left.extend(p.relative_to(state).as_posix() for p in folder.rglob("*"))
    return left


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "python": platform.python_version(), "asyncsync": metadata.version("asyncsync"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


# --trace-memory: watch under tracemalloc (a diagnosis, not a soak: it costs CPU and memory of
# its own). Once a second its traced Python memory, every 60 s the 25 lines that hold the
# most, appended as JSON lines to $ASYNCSYNC_SOAK_TRACE.<pid>.jsonl.
_TRACED_WATCH = """
import json, os, sys, threading, time, tracemalloc
tracemalloc.start(1)
out = os.environ["ASYNCSYNC_SOAK_TRACE"] + f".{os.getpid()}.jsonl"
def sample():
    n = 0
    with open(out, "a") as f:
        while True:
            time.sleep(1.0)
            n += 1
            current, peak = tracemalloc.get_traced_memory()
            record = {"t": time.time(), "traced_mb": current / 1e6, "peak_mb": peak / 1e6}
            if n % 60 == 0:
                snap = tracemalloc.take_snapshot()
                record["top"] = [[str(s.traceback[0]), s.size, s.count]
                                 for s in snap.statistics("lineno")[:25]]
            f.write(json.dumps(record) + "\\n")
            f.flush()
threading.Thread(target=sample, daemon=True, name="soak-tracemalloc").start()
from asyncsync.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_soak(plan: SoakPlan, work: Path, say: Callable[[str], None] = print,
             trace_memory: bool = False) -> dict[str, Any]:
    """One soak in ``work`` (emptied first); the results, every check's verdict included.
    ``trace_memory``: watch runs under tracemalloc (see _TRACED_WATCH)."""
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    root = work / "runs"
    schedule = fault_schedule(plan.seed, plan.timing, plan.kinds)
    say(f"soak: seed {plan.seed} (--seed {plan.seed} draws the same faults), "
        f"{len(schedule)} faults over {plan.load_s:.0f}s of load")
    for fault in schedule:
        say(f"  {fault.describe()}")
    results: dict[str, Any] = {"machine": machine(), "seed": plan.seed,
                               "plan": asdict(plan), "schedule": [asdict(f) for f in schedule]}
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    store = SeaweedFS(data_dir=work / "seaweedfs")
    store.start()
    stop_watching = threading.Event()
    watch: Watch | None = None
    try:
        with state_disk(work / "state", plan.state_disk_bytes) as disk, \
                ChaosProxy(store.endpoint, plan.seed) as proxy:
            say(f"soak: state directory: {disk.how}")
            client = store.client(max_pool_connections=8)
            client.create_bucket(Bucket=BUCKET)
            program = ([sys.executable, "-c", _TRACED_WATCH] if trace_memory
                       else [find_program("asyncsync", "pip install -e .")])
            argv = [*program, "watch", str(root), f"s3://{BUCKET}/{PREFIX}", "--state-dir",
                    str(disk.path), *plan.watch_options()]
            env = client_env(store, proxy.endpoint)
            if trace_memory:
                env["ASYNCSYNC_SOAK_TRACE"] = str(work / "tracemalloc")
            watch = Watch(argv, env, work / "watch.log", clock)
            watch.start()
            if not watch.wait_healthy():
                raise RuntimeError(f"watch did not start: see {watch.log_path}")
            fleet = Fleet(root, plan.shape, plan.seed ^ 0x7EA1)
            sampler = Sampler(watch, stop_watching)
            poller = Poller(store.client(max_pool_connections=4), clock, work / "torn",
                            stop_watching)
            chaos = Chaos(plan, watch, store, proxy, disk, clock)
            generation_starts = chaos.generation_starts
            sampler.start()
            poller.start()
            pending = list(schedule)
            unexpected = []
            while clock() < plan.load_s:
                fleet.tick()
                while pending and pending[0].at <= clock():
                    fault = pending.pop(0)
                    say(f"soak: t+{clock():6.1f}s {fault.kind}")
                    chaos.apply(fault)
                died = watch.check_unexpected_exit() if chaos.watch_faults.empty() else None
                if died is not None:
                    say(f"soak: watch exited {died.code} by itself at t+{died.at:.1f}s; "
                        "restarting it")
                    unexpected.append(asdict(died))
                    watch.start()
                    watch.wait_healthy()
                    generation_starts[watch.generation] = watch.started_at
                time.sleep(0.2)
            last_fault_end = max((end for _, end, _ in chaos.log.windows), default=0.0)
            say(f"soak: t+{clock():.1f}s trainings stopping")
            chaos.stop_watch_faults()
            chaos.calm()
            fleet.stop()
            load_end = clock()
            if watch.pid is None:
                watch.start()
                watch.wait_healthy()
                generation_starts[watch.generation] = watch.started_at
            wrong = wait_converged(client, root, timeout=max(120.0, plan.load_s / 2))
            converged_at = clock()
            say(f"soak: t+{converged_at:.1f}s bucket converged" if not wrong else
                f"soak: {len(wrong)} files still differ: {wrong[:5]}")
            final = watch.stop("final", signal.SIGTERM, timeout=plan.grace_s + 30)
            stop_watching.set()
            sampler.join(5)
            poller.join(30)
            # The definitive checks, with the daemon gone and the poller done.
            lost, unreadable = missing_or_different(client, root)
            keys = bucket_keys(client)
            uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
            history_problems = history_check(client, fleet, poller.csv_seen, keys)
            stats = proxy.stats
            files = local_files(root)
            samples = sampler.samples
            results.update(
                state_disk=disk.how, state_used_before_fills=disk.used_before,
                watch_log=str(watch.log_path),
                load=fleet.log.counts(), training_errors=fleet.log.errors[:20],
                t0_wall=time.time() - clock(),
                files=len(files), local_bytes=sum(p.stat().st_size for p in files.values()),
                keys=len(keys), history_keys=sum(k.startswith(HISTORY) for k in keys),
                faults=chaos.log.injected, fault_windows=chaos.log.windows,
                faults_skipped=chaos.log.skipped, fault_late_s=round(chaos.log.late_s, 1),
                proxy={"requests": stats.requests, "faults": stats.faults,
                       "faults_by_action": stats.faults_by_action,
                       "body_bytes_upstream": stats.body_bytes_upstream},
                restarts=watch.generation - 1, exits=[asdict(e) for e in watch.exits],
                unexpected_exits=unexpected + chaos.unexpected,
                final_exit=asdict(final) if final else None,
                versions_checked=poller.versions_checked, bytes_read=poller.bytes_read,
                torn=[asdict(t) for t in poller.torn], poller_errors=poller.errors,
                lost=lost, store_unreadable=unreadable, open_uploads=[u["Key"] for u in uploads],
                history_problems=history_problems,
                manifest_rows=manifest_rows(disk.path),
                manifest_bytes=(disk.path / "manifest.db").stat().st_size,
                leftover_temp=leftover_temp(disk.path),
                load_end_s=round(load_end, 1), converged_s=round(converged_at - load_end, 1),
                last_fault_end_s=round(last_fault_end, 1),
                samples=[asdict(s) for s in samples],
                generation_starts=generation_starts,
                loadavg_at_end=[round(x, 2) for x in os.getloadavg()],
            )
    finally:
        stop_watching.set()
        if watch is not None and watch.pid is not None:  # the soak itself failed
            watch.stop("abandoned", signal.SIGKILL, timeout=10)
        store.stop()
    summarise(results, plan)
    return results


def summarise(results: dict[str, Any], plan: SoakPlan) -> None:
    """The trend fits, the latency quantiles and the verdict of every check."""
    samples = [Sample(**s) for s in results["samples"]]
    starts = {int(k): float(v) for k, v in results["generation_starts"].items()}
    rss_slope, rss_n = pooled_slope(samples, lambda s: s.rss_mb, starts, plan.warmup_s)
    fd_slope, fd_n = pooled_slope(samples, lambda s: None if s.fds is None else float(s.fds),
                                  starts, plan.warmup_s)
    windows = [(a, b, k) for a, b, k in results["fault_windows"]]
    disruptive = [(a, b) for a, b, k in windows
                  if k in ("store-outage", "disk-full", "sigkill", "sigterm")]
    recovery = 15.0

    def outside_outages(start: float, end: float) -> bool:
        return all(end < a or start > b + recovery for a, b in disruptive)

    after_last = results["last_fault_end_s"] + 5.0
    load_end = results["load_end_s"]
    rss_life = life_trend(samples, lambda s: s.rss_mb, starts, plan.long_warmup_s, load_end)
    fd_life = life_trend(samples, lambda s: None if s.fds is None else float(s.fds), starts,
                         plan.long_warmup_s, load_end)
    quiet = ttd_counts(samples, lambda a, b: a >= after_last and b <= load_end)
    outside = ttd_counts(samples, outside_outages)
    everything = ttd_counts(samples, lambda a, b: True)
    rss = [s.rss_mb for s in samples if s.rss_mb is not None]
    fds = [s.fds for s in samples if s.fds is not None]
    def floors(fit: LifeTrend, value: Callable[[Sample], float | None]) -> list[float]:
        """The least value in the first and in the last third of the fitted stretch: a
        leak raises the floor the daemon comes back to between bursts."""
        span = (fit.fitted_to - fit.fitted_from) / 3
        thirds: list[list[float]] = [[], []]
        for s in samples:
            v = value(s)
            if s.generation != fit.generation or v is None:
                continue
            if fit.fitted_from <= s.t <= fit.fitted_from + span:
                thirds[0].append(v)
            elif fit.fitted_to - span <= s.t <= fit.fitted_to:
                thirds[1].append(v)
        return [round(min(third), 1) if third else float("nan") for third in thirds]

    def trend(fit: LifeTrend | None, value: Callable[[Sample], float | None]
              ) -> dict[str, Any] | None:
        if fit is None:
            return None
        return {"floors_first_last_third": floors(fit, value),
                "generation": fit.generation, "life_s": fit.life_s,
                "fitted_from_s": fit.fitted_from, "fitted_to_s": fit.fitted_to,
                "samples": fit.n, "slope_per_10min": round(fit.slope_per_s * 600, 2),
                "slope_se_per_10min": round(fit.slope_se_per_s * 600, 2),
                "upper95_per_10min": round((fit.slope_per_s + 1.645 * fit.slope_se_per_s)
                                           * 600, 2),
                "residual_sd": round(fit.residual_sd, 2), "lag1": round(fit.lag1, 2),
                "intercept": fit.intercept, "slope_per_s": fit.slope_per_s}

    figures: dict[str, Any] = {
        "rss_long_life": trend(rss_life, lambda s: s.rss_mb),
        "fd_long_life": trend(fd_life, lambda s: None if s.fds is None else float(s.fds)),
        "rss_slope_mb_per_10min": round(rss_slope * 600, 2), "rss_samples_fitted": rss_n,
        "rss_peak_mb": round(max(rss), 1) if rss else None,
        "fd_slope_per_10min": round(fd_slope * 600, 2), "fd_samples_fitted": fd_n,
        "fd_peak": max(fds) if fds else None,
        "ttd_all": _quantiles(everything), "ttd_outside_outages": _quantiles(outside),
        "ttd_after_last_fault": _quantiles(quiet),
        "loadavg_mean": round(sum(s.loadavg for s in samples) / len(samples), 2)
        if samples else None,
    }
    results["figures"] = figures
    bound = plan.settle_s + plan.checkpoint_interval_s + 5.0
    quiet_p99 = figures["ttd_after_last_fault"]["p99"]
    final = results["final_exit"]
    checks = {
        "every final version in the bucket, byte-identical": not results["lost"],
        "no torn version seen": not results["torn"],
        "no multipart upload left open": not results["open_uploads"],
        "recreated results.csv kept in the history area": not results["history_problems"],
        "final SIGTERM exits 0": final is not None and final["code"] == 0,
        "watch never exited by itself": not results["unexpected_exits"],
        "staging and temp directories empty": not results["leftover_temp"],
        "manifest proportional to the files": results["manifest_rows"] <= 2 * max(
            1, results["keys"]) and results["manifest_bytes"] <= 64 * 1024 + 4096 * max(
            1, results["keys"]),
        # On the longest-lived process, which must have lived long enough under load for a
        # trend to mean something; one-sided: a process that gives memory back is not
        # leaking.
        f"RSS flat (slope < 1 MB / 10 min, one process >= {plan.long_life_min_s:g} s)":
        rss_life is not None and rss_life.life_s >= plan.long_life_min_s
        and rss_life.slope_per_s * 600 < 1.0,
        f"open fds flat (slope < 1 / 10 min, one process >= {plan.long_life_min_s:g} s)":
        fd_life is not None and fd_life.life_s >= plan.long_life_min_s
        and fd_life.slope_per_s * 600 < 1.0,
        f"time-to-durable p99 after the last fault <= {bound:g}s": quiet_p99 is not None
        and quiet_p99 <= bound,
    }
    results["checks"] = checks


def _quantiles(buckets: dict[str, float]) -> dict[str, Any]:
    count = max(buckets.values(), default=0.0)
    p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
    return {"count": int(count), "p50": None if p50 is None else round(p50, 2),
            "p99": None if p99 is None else round(p99, 2)}


# -- the report ------------------------------------------------------------------------------


def render(results: dict[str, Any], plot_name: str | None) -> str:
    m, f, load = results["machine"], results["figures"], results["load"]
    plan = results["plan"]
    minutes = plan["load_s"] / 60
    lines = [
        "# Chaos soak of `asyncsync watch`",
        "",
        "Written by `benchmarks/soak.py` (`make soak`); every figure below comes from one run.",
        *([] if not results.get("note") else ["", f"> {results['note']}", ""]),
        f"{minutes:g} minutes of load, seed **{results['seed']}** "
        f"(`benchmarks/soak.py --minutes {minutes:g} --seed {results['seed']}` draws the same "
        "faults at the same offsets). How it works: the module docstrings of "
        "`benchmarks/soak.py`, `soak_load.py` and `soak_faults.py`.",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), Python {m['python']}, asyncsync "
        f"{m['asyncsync']}, {m['date']}. The machine is shared: load average "
        f"{'/'.join(map(str, m['loadavg_at_start']))} at the start, "
        f"{'/'.join(map(str, results['loadavg_at_end']))} at the end, "
        f"{f['loadavg_mean']} (1-minute) on average over the soak.",
        f"State directory: {results['state_disk']}.",
        "",
        "## What must hold",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {name} | {'pass' if ok else '**FAIL**'} |"
              for name, ok in results["checks"].items()]
    ttd = f["ttd_all"], f["ttd_outside_outages"], f["ttd_after_last_fault"]
    lines += [
        "",
        "## Figures",
        "",
        "| | |",
        "|---|---|",
        f"| trainings at once / runs started | {plan['shape']['trainings']} / "
        f"{load['runs_started']} |",
        f"| epochs / checkpoint versions written | {load['epochs']} / "
        f"{load['checkpoint_versions']} |",
        f"| exist_ok restarts / directories recreated | {load['restarts']} / "
        f"{load['recreations']} |",
        f"| bytes written by the trainings | {load['bytes_written'] / 1e9:.2f} GB |",
        f"| files at the end / objects (history copies) | {results['files']} / "
        f"{results['keys']} ({results['history_keys']}) |",
        f"| bytes through the proxy to the store | "
        f"{results['proxy']['body_bytes_upstream'] / 1e9:.2f} GB |",
        f"| object versions read and checked by the poller | {results['versions_checked']} "
        f"({results['bytes_read'] / 1e9:.2f} GB) |",
        f"| torn versions seen | {len(results['torn'])} |",
        f"| lost files (final version missing or different) | {len(results['lost'])} |",
        f"| objects the store listed but could not serve (its own loss) | "
        f"{len(results['store_unreadable'])} |",
        f"| watch restarts / exits by itself | {results['restarts']} / "
        f"{len(results['unexpected_exits'])} |",
        f"| requests through the proxy / answered with a fault | "
        f"{results['proxy']['requests']} / {results['proxy']['faults']} |",
        f"| watch RSS: peak / trend of the long-lived process | {f['rss_peak_mb']} MB / "
        f"{_trend_cell(f.get('rss_long_life'), 'MB')} |",
        f"| watch open fds: peak / trend of the long-lived process | {f['fd_peak']} / "
        f"{_trend_cell(f.get('fd_long_life'), '')} |",
        f"| RSS / fd trend pooled over all processes (each its own level) | "
        f"{f['rss_slope_mb_per_10min']:+} MB / {f['fd_slope_per_10min']:+} per 10 min |",
        f"| manifest | {results['manifest_rows']} rows, "
        f"{results['manifest_bytes'] / 1024:.0f} KiB |",
        f"| time-to-durable p50 / p99, all ({ttd[0]['count']} files) | {ttd[0]['p50']} s / "
        f"{ttd[0]['p99']} s |",
        f"| time-to-durable p50 / p99, outside outages ({ttd[1]['count']}) | {ttd[1]['p50']} "
        f"s / {ttd[1]['p99']} s |",
        f"| time-to-durable p50 / p99, after the last fault ({ttd[2]['count']}) | "
        f"{ttd[2]['p50']} s / {ttd[2]['p99']} s |",
        f"| from the trainings' end to the bucket converged | {results['converged_s']} s |",
        "",
        "Faults injected:",
        "",
        "| fault | count |",
        "|---|---|",
    ]
    lines += [f"| {kind} | {count}"
              + (f" (skipped: {results['faults_skipped'][kind]})"
                 if kind in results["faults_skipped"] else "") + " |"
              for kind, count in results["faults"].items()]
    lines += [
        "",
        f"Proxy faults by action: {json.dumps(results['proxy']['faults_by_action'])}. "
        "The proxy's 503 answers carry the code SlowDown: a *503-burst* answers half of all "
        "requests with it for 2-6 s, a *slowdown* the next uploads (PUTs); a "
        "*reset-mid-body* takes a little of an upload's body and resets the connection; a "
        "*latency-spike* holds the next requests 1-5 s each. Time-to-durable is watch's own "
        "histogram (`asyncsync_time_to_durable_seconds`, from a file's last change to the "
        "store's acknowledgement), scraped every second; *outside outages* leaves out what "
        "was observed during a store outage, a full disk or a watch restart and 15 s after; "
        "checkpoints go up at most every "
        f"{plan['checkpoint_interval_s']:g} s (`--checkpoint-interval`), which the bound of "
        "the last check includes.",
    ]
    lines += ["", _trend_text(results, plan)]
    if (results["torn"] or results["unexpected_exits"] or results["lost"]
            or results["open_uploads"] or results["history_problems"]):
        lines += ["", "## Defects seen", ""]
        lines += [f"- torn: `{t['key']}` at t+{t['at']:.1f}s: {t['reason']}"
                  for t in results["torn"][:10]]
        lines += [f"- watch exited {e['code']} by itself at t+{e['at']:.1f}s"
                  for e in results["unexpected_exits"][:10]]
        lines += [f"- lost: `{p}`" for p in results["lost"][:10]]
        if results["open_uploads"]:
            keys = sorted(set(results["open_uploads"]))
            lines.append(f"- {len(results['open_uploads'])} multipart uploads left open, on "
                         f"{len(keys)} keys: " + ", ".join(f"`{k}`" for k in keys[:6]))
        lines += [f"- history: {p}" for p in results["history_problems"][:10]]
    if plot_name:
        lines += ["", f"![RSS, in-flight uploads and faults over time]({plot_name})"]
    rerun = results.get("scenario_figures", {}).get("machine")
    for scenario in results.get("scenarios", []):
        lines += ["", f"## Also under load: {scenario['title']}", "", scenario["text"]]
    if rerun and results.get("scenarios"):
        lines += ["", f"The two scenarios above were run again on their own "
                  f"(`--scenarios-only`), ending {rerun['date']} with a load average of "
                  f"{'/'.join(map(str, rerun['loadavg_at_start']))}."]
    return "\n".join(lines) + "\n"


def _trend_cell(fit: dict[str, Any] | None, unit: str) -> str:
    if fit is None:
        return "none fitted"
    unit = f" {unit}" if unit else ""
    return (f"{fit['slope_per_10min']:+}{unit} / 10 min (± {fit['slope_se_per_10min']}; "
            f"process {fit['generation']}, lived {fit['life_s']:.0f} s)")


def _trend_text(results: dict[str, Any], plan: dict[str, Any]) -> str:
    """How the RSS and fd verdicts were reached, in words, from the figures."""
    f = results["figures"]
    rss, fds = f.get("rss_long_life"), f.get("fd_long_life")
    cutoff = plan["timing"].get("restarts_until")
    where = (f"The restarts (SIGKILL, SIGTERM) fell in the first {cutoff:.0f} s of the load "
             "only; every other kind of fault went on to the end"
             if cutoff is not None else "The restarts fell all through the load")
    if rss is None or fds is None:
        return (f"{where}. No watch process lived long enough for a trend to be fitted: "
                "the RSS and fd checks fail for want of one.")
    long_enough = rss["life_s"] >= plan["long_life_min_s"]
    return (
        f"{where}. The trend verdict rests on the longest-lived watch process: process "
        f"{rss['generation']} of {results['restarts'] + 1}, which lived {rss['life_s']:.0f} s "
        f"under load ({'enough' if long_enough else 'short'} of the "
        f"{plan['long_life_min_s']:g} s required). A least-squares line is fitted to its "
        f"once-a-second samples from {plan['long_warmup_s']:g} s after its start (the "
        "start-up and the first catch-up on its predecessors' backlog are left out) to the "
        "trainings' end: "
        f"t+{rss['fitted_from_s']:.0f}s to t+{rss['fitted_to_s']:.0f}s, {rss['samples']} "
        f"samples. RSS: slope {rss['slope_per_10min']:+} MB / 10 min, residual standard "
        f"deviation {rss['residual_sd']} MB (lag-1 autocorrelation {rss['lag1']}), standard "
        f"error of the slope {rss['slope_se_per_10min']} MB / 10 min (widened for that "
        f"autocorrelation), so a climb above {rss['upper95_per_10min']:+} MB / 10 min is "
        f"ruled out at 95%. Open fds: slope {fds['slope_per_10min']:+} / 10 min, residual "
        f"standard deviation {fds['residual_sd']}, standard error "
        f"{fds['slope_se_per_10min']}, 95% bound {fds['upper95_per_10min']:+}. The floor "
        "the process came back to between bursts (least value in the first and in the last "
        f"third of that stretch): RSS {rss['floors_first_last_third'][0]} then "
        f"{rss['floors_first_last_third'][1]} MB, fds {fds['floors_first_last_third'][0]:g} "
        f"then {fds['floors_first_last_third'][1]:g}. A check "
        "passes when the fitted slope is below its bound (1 MB, 1 fd per 10 min) on a "
        "process that lived long enough; a negative slope passes (memory given back is not "
        "a leak). The pooled figure fits every process after a "
        f"{plan['warmup_s']:g}-s warm-up, each at its own level: the short lives of the "
        "restart phase mostly show their climb to a working set.")


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = results["samples"]
    t = [s["t"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(t, [s["rss_mb"] for s in samples], color="tab:blue", lw=1)
    top.set_ylabel("watch RSS (MB)")
    twin = top.twinx()
    twin.plot(t, [s["fds"] for s in samples], color="tab:gray", lw=0.8)
    twin.set_ylabel("open fds", color="tab:gray")
    bottom.plot(t, [s["in_flight"] for s in samples], color="tab:green", lw=1)
    bottom.set_ylabel("uploads in flight")
    bottom.set_xlabel("seconds")
    colours = dict(zip(KINDS, ("red", "darkred", "orange", "purple", "magenta", "brown",
                               "olive", "cyan"), strict=True))
    seen = set()
    for start, end, kind in results["fault_windows"]:
        for axis in (top, bottom):
            axis.axvspan(start, max(end, start + 0.5), color=colours[kind], alpha=0.15,
                         label=kind if axis is bottom and kind not in seen else None)
        seen.add(kind)
    fit = results.get("figures", {}).get("rss_long_life")
    if fit is not None:
        ends = [fit["fitted_from_s"], fit["fitted_to_s"]]
        top.plot(ends, [fit["intercept"] + fit["slope_per_s"] * x for x in ends],
                 color="black", lw=1.5, ls="--",
                 label=f"fit, process {fit['generation']}: {fit['slope_per_10min']:+} MB/10 min")
        top.legend(loc="upper left", fontsize=7)
    cutoff = results["plan"]["timing"].get("restarts_until")
    if cutoff is not None:
        for axis in (top, bottom):
            axis.axvline(cutoff, color="black", lw=0.8, ls=":")
        bottom.annotate("no restarts after", (cutoff, 0), xytext=(3, 3),
                        textcoords="offset points", fontsize=7)
    bottom.legend(loc="upper left", fontsize=7, ncol=4)
    fig.suptitle(f"asyncsync watch under chaos, seed {results['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# The scenarios' checks (soak_scenarios.checks): kept as recorded by --render-only.
_SCENARIO_CHECKS = ("push storm", "200 runs")


def resummarise(results: dict[str, Any]) -> None:
    """summarise() again over recorded results, their scenario checks kept."""
    results["plan"].setdefault("long_life_min_s", SoakPlan.long_life_min_s)
    results["plan"].setdefault("long_warmup_s", SoakPlan.long_warmup_s)
    scenario_checks = {k: v for k, v in results["checks"].items()
                       if k.startswith(_SCENARIO_CHECKS)}
    summarise(results, SoakPlan.from_dict(results["plan"]))
    results["checks"].update(scenario_checks)


def run_scenarios(results: dict[str, Any], work: Path, seed: int, small: bool) -> None:
    """The push storm and the 200-run node (soak_scenarios.py), into ``results``."""
    from soak_scenarios import checks, describe, many_runs, push_storm

    storm_s = 15.0 if small else 60.0
    print(f"soak: also under load: push --workers 256 against 30% 503s, {storm_s:g} s")
    storm = push_storm(work, seed, seconds=storm_s)
    print("soak: also under load: 200 run directories at once")
    many = many_runs(work)
    results["scenario_figures"] = {"push_storm": storm, "many_runs": many}
    results["scenarios"] = describe(storm, many)
    results["checks"] = {k: v for k, v in results["checks"].items()
                         if not k.startswith(_SCENARIO_CHECKS)}
    results["checks"].update(checks(storm, many))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load duration (10)")
    parser.add_argument("--seed", type=int, default=None, help="fault schedule (default: new)")
    parser.add_argument("--small", action="store_true",
                        help="the test suite's fleet: 6 trainings, 1-10 MB checkpoints")
    parser.add_argument("--work-dir", type=Path, default=HERE / "work" / "soak")
    parser.add_argument("--out", type=Path, default=HERE, help="where SOAK.md and the PNG go")
    parser.add_argument("--no-scenarios", action="store_true",
                        help="leave out the push storm and the 200-run node")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--scenarios-only", action="store_true",
                        help="run the two scenarios again into the recorded results")
    parser.add_argument("--restart-share", type=float, default=None,
                        help="restarts in this first share of the load (0.4; 1 under --small)")
    parser.add_argument("--trace-memory", action="store_true",
                        help="diagnosis: watch under tracemalloc (work dir: tracemalloc.*.jsonl)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results_path = args.out / "soak-results.json"
    if args.scenarios_only or args.render_only:
        # The figures and verdicts again, from the recorded samples (what a change to the
        # analysis says of a recorded run); with --scenarios-only, the scenarios run again.
        results = json.loads(results_path.read_text())
        resummarise(results)
        if args.scenarios_only:
            import shutil

            shutil.rmtree(args.work_dir / "scenarios", ignore_errors=True)
            run_scenarios(results, args.work_dir / "scenarios", results["seed"], args.small)
            results["scenario_figures"]["machine"] = machine()
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    else:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
        plan = SoakPlan.for_minutes(args.minutes, seed, small=args.small,
                                    restart_share=args.restart_share)
        results = run_soak(plan, args.work_dir, trace_memory=args.trace_memory)
        # Written now too: a scenario that fails must not lose the soak's figures.
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        if not args.no_scenarios:
            run_scenarios(results, args.work_dir / "scenarios", seed, args.small)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    drawn = plot(results, args.out / "soak.png")
    (args.out / "SOAK.md").write_text(render(results, "soak.png" if drawn else None))
    failed = [name for name, ok in results["checks"].items() if not ok]
    print(f"soak: seed {results['seed']}; {len(results['torn'])} torn, "
          f"{len(results['lost'])} lost; {'all checks pass' if not failed else 'FAILED: '}"
          + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
