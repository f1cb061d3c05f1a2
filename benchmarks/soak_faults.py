"""The soak's faults: a seeded schedule, the proxy that injects the store's failures, and the
small filesystem under the state directory that can be filled up.

The schedule is drawn from the seed alone, before anything runs, so ``--seed`` gives the same
faults at the same offsets again (what the machine does in between still differs). Faults
that last (a store outage, a full disk, a burst of 503s) never overlap one of their own kind.

The faults that restart watch (SIGKILL, SIGTERM) come only until ``restarts_until``: after
it, every other kind keeps coming, against one watch process that lives on to the end, long
enough for its RSS and descriptor trends to be fitted. The first round (every kind once)
is not held to it, so even a soak too short for that still has every kind.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faultproxy import FaultProxy, _Request, _Rule  # noqa: E402

KINDS = ("sigkill", "sigterm", "store-outage", "503-burst", "slowdown", "reset-mid-body",
         "latency-spike", "disk-full")
# How often each kind is drawn, relative to the others.
_WEIGHTS = {"sigkill": 3, "sigterm": 2, "store-outage": 1.2, "503-burst": 2, "slowdown": 2,
            "reset-mid-body": 2, "latency-spike": 2, "disk-full": 1.2}
# Faults that last, and must not overlap one of their own kind; the watch faults include the
# restart that follows.
_LASTING = {"store-outage", "disk-full", "503-burst", "latency-spike", "sigkill", "sigterm"}
WATCH_FAULTS = {"sigkill", "sigterm"}


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the soak's start
    kind: str
    duration: float = 0.0  # outage, full disk, burst; for watch faults: the pause before restart
    count: int = 0  # requests hit (slowdown, resets, latency spikes)
    delay: float = 0.0  # latency spike: seconds added to each request hit

    def describe(self) -> str:
        extra = []
        if self.duration:
            extra.append(f"{self.duration:.1f}s")
        if self.count:
            extra.append(f"{self.count} requests")
        if self.delay:
            extra.append(f"+{self.delay:.1f}s each")
        return f"t+{self.at:6.1f}s {self.kind}" + (f" ({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class FaultTiming:
    """How dense and how long the faults are."""

    first_at: float
    last_at: float
    mean_gap_s: float
    outage_min_s: float
    outage_max_s: float
    disk_full_min_s: float
    disk_full_max_s: float
    # Watch faults (SIGKILL, SIGTERM) are drawn only before this offset (the first round
    # aside); None: all through.
    restarts_until: float | None = None


def fault_schedule(seed: int, timing: FaultTiming, kinds: tuple[str, ...] = KINDS
                   ) -> list[Fault]:
    """The faults of one soak, drawn from ``seed`` alone: every kind once, in a random
    order, then kinds at random (no watch fault after ``timing.restarts_until``); a lasting
    fault waits for the end of one of its kind."""
    rng = random.Random(seed)
    first_round = list(kinds)
    rng.shuffle(first_round)
    weights = [_WEIGHTS[k] for k in kinds]
    # After restarts_until the same draw (one random number) from the other kinds only: a
    # seed's stream of draws does not change with the cutoff.
    late_weights = [0.0 if k in WATCH_FAULTS else _WEIGHTS[k] for k in kinds]
    if not any(late_weights):
        late_weights = weights
    cutoff = timing.last_at if timing.restarts_until is None else timing.restarts_until
    busy_until: dict[str, float] = {}
    faults: list[Fault] = []
    at = timing.first_at
    while True:
        gap = rng.expovariate(1 / timing.mean_gap_s)
        # The first round is never spread out by a long gap: a short soak still has it all.
        at += min(gap, timing.mean_gap_s) if first_round else gap
        if at > timing.last_at:
            return faults
        drawn = rng.choices(kinds, weights if at <= cutoff else late_weights)[0]
        in_first_round = bool(first_round)
        kind = first_round.pop(0) if first_round else drawn
        # Draw every parameter whether used or not: the stream stays the same for a seed.
        outage = rng.uniform(timing.outage_min_s, timing.outage_max_s)
        disk = rng.uniform(timing.disk_full_min_s, timing.disk_full_max_s)
        burst = rng.uniform(2.0, 6.0)
        count = rng.randint(4, 24)
        delay = rng.uniform(1.0, 5.0)
        pause = rng.uniform(0.2, 3.0)
        group = "watch" if kind in WATCH_FAULTS else kind
        if (group == "watch" and not in_first_round and timing.restarts_until is not None
                and busy_until.get(group, -1.0) + 1.0 > cutoff):
            continue  # it would wait for the last restart past the cutoff: not drawn
        at = max(at, busy_until.get(group, -1.0) + 1.0)
        if at > timing.last_at:
            return faults
        fault = {
            "sigkill": Fault(at, kind, duration=pause),
            "sigterm": Fault(at, kind, duration=pause),
            "store-outage": Fault(at, kind, duration=outage),
            "disk-full": Fault(at, kind, duration=disk),
            "503-burst": Fault(at, kind, duration=burst),
            "slowdown": Fault(at, kind, count=count),
            # aiohttp resends an idempotent request once by itself after a reset: two resets
            # per failure the client sees.
            "reset-mid-body": Fault(at, kind, count=2 * (count // 4 + 1)),
            "latency-spike": Fault(at, kind, count=count, delay=delay, duration=delay),
        }[kind]
        if kind in _LASTING:
            # A watch fault's restart and the daemon's start-up take a few seconds more.
            busy_until[group] = at + fault.duration + (8.0 if group == "watch" else 0.0)
        faults.append(fault)


@dataclass
class Arrival:
    at: float  # time.monotonic()
    method: str
    path: str
    faulted: str  # the action given, "" when forwarded


class ChaosProxy(FaultProxy):
    """The fault proxy, plus a seeded error rate (that share of requests answered 503
    SlowDown), a seeded latency (each request not answered with a fault held 0.5 to 1.5
    times ``latency`` seconds before it is forwarded: a slow store, whose 503s still come at
    once) and, while ``record`` is set, the arrival time of every request.

    It keeps no per-request history otherwise: a soak sends hundreds of thousands of them."""

    def __init__(self, upstream: str, seed: int) -> None:
        super().__init__(upstream)
        self._chaos = random.Random(seed)
        self._error_rate = 0.0
        self._latency = 0.0
        self.record = False
        self.arrivals: list[Arrival] = []

    def __enter__(self) -> ChaosProxy:
        self.start()
        return self

    def set_error_rate(self, rate: float) -> None:
        with self._lock:
            self._error_rate = rate

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = seconds

    def _admit(self, request: _Request) -> _Rule | None:
        rule = super()._admit(request)
        with self._lock:
            self._stats.seen.clear()
            faulted = rule.action if rule else ""
            if rule is None and self._error_rate and self._chaos.random() < self._error_rate:
                rule = _Rule("503", 1, None, None, None, 0.0)
                faulted = "503"
                s = self._stats
                s.faults += 1
                s.faults_by_action["503"] = s.faults_by_action.get("503", 0) + 1
            elif rule is None and self._latency:
                # Not a fault (neither counted nor recorded as one): the store is just slow.
                rule = _Rule("delay", 1, None, None, None,
                             self._latency * self._chaos.uniform(0.5, 1.5))
            if self.record:
                self.arrivals.append(Arrival(time.monotonic(), request.method, request.path,
                                             faulted))
        return rule


@dataclass
class StateDisk:
    """A small filesystem for the state directory, that the soak can fill and free.

    As root, a tmpfs of ``size`` bytes is mounted for the soak; otherwise the directory given
    is used only if it already is a small tmpfs (filling a large or shared one would hurt the
    machine). ``how`` says which, or why the disk-full fault is skipped."""

    path: Path
    size: int
    how: str = ""
    mounted: bool = False
    fills: int = 0
    used_before: list[int] = field(default_factory=list)  # bytes in use when each fill began
    filler: Path | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def usable(self) -> bool:
        return self.how.startswith(("tmpfs", "existing"))

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "soak-state",
                 str(self.path)], capture_output=True, text=True)
            if done.returncode == 0:
                self.mounted = True
                self.how = f"tmpfs of {self.size // (1024 * 1024)} MiB mounted for the soak"
                return
            reason = done.stderr.strip() or f"mount exited {done.returncode}"
        else:
            reason = "not root, cannot mount"
        stat = os.statvfs(self.path)
        total = stat.f_blocks * stat.f_frsize
        if _fs_type(self.path) == "tmpfs" and total <= 4 * self.size:
            self.how = f"existing tmpfs of {total // (1024 * 1024)} MiB ({reason})"
        else:
            self.how = f"skipped: {reason}, and {self.path} is not a small tmpfs"

    def fill(self) -> None:
        """Take every free byte (what a runaway log or a full /var does)."""
        with self._lock:
            if not self.usable or self.filler is not None:
                return
            self.filler = self.path / ".soak-filler"
            stat = os.statvfs(self.path)
            free = stat.f_bavail * stat.f_frsize
            self.used_before.append((stat.f_blocks - stat.f_bfree) * stat.f_frsize)
            self.fills += 1
            try:
                # Unbuffered: a buffer left unwritten would raise ENOSPC again at close.
                f = open(self.filler, "wb", buffering=0)  # noqa: SIM115 - closed below
            except OSError:
                return  # already full: the daemon's own files took it all
            with f:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(f.fileno(), 0, free)
                # fallocate may leave a few blocks; write into them until ENOSPC.
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()

    def free(self) -> None:
        with self._lock:
            if self.filler is not None:
                self.filler.unlink(missing_ok=True)
                self.filler = None

    def release(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False


def _fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = "", ""
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and (
                    len(point) > len(best)):
                best, kind = point, fields[2]
    return kind


@contextlib.contextmanager
def state_disk(path: Path, size: int) -> Iterator[StateDisk]:
    disk = StateDisk(path, size)
    disk.prepare()
    try:
        yield disk
    finally:
        disk.release()
