"""The soak's two "also under load" scenarios, each against a SeaweedFS of its own.

* A push storm: `asyncsync push --workers 256` through a proxy that answers 30% of requests
  with 503 SlowDown: it must complete with every object right, its retries counted, and the
  retries spread out in time (backoff jitter), not sent back in lockstep.
* Many trainings, one node: 200 run directories changing at once under `watch` with
  `--max-memory` and `--max-bandwidth`: the daemon's peak RSS and the bytes per second that
  reach the proxy, against those bounds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from asyncsync.embedded_s3 import SeaweedFS, find_program
from soak_faults import ChaosProxy

KiB, MiB = 1024, 1024 * 1024
BUCKET = "asyncsync-soak-scenario"


def _env(store: SeaweedFS, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(store.env())
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


def _wrong_objects(client: Any, src: Path, prefix: str) -> list[str]:
    """The files under ``src`` whose object is missing or not byte-identical (every object
    read back whole, a few at once)."""
    def wrong(path: Path) -> str | None:
        relative = path.relative_to(src).as_posix()
        try:
            answer = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{relative}")
            body = answer["Body"].read()
        except Exception:
            return relative
        if xxhash.xxh3_128_digest(body) != xxhash.xxh3_128_digest(path.read_bytes()):
            return relative
        return None

    paths = sorted(p for p in src.rglob("*") if p.is_file())
    with ThreadPoolExecutor(4) as pool:
        return [r for r in pool.map(wrong, paths) if r is not None]


def _storm_files(src: Path, files: int, first: int = 0) -> None:
    for i in range(first, first + files):
        path = src / f"d{i % 40:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(16 * KiB + i % 997))


def _push(src: Path, prefix: str, store: SeaweedFS, proxy: ChaosProxy, state: Path
          ) -> tuple[subprocess.CompletedProcess[str], float, dict[str, Any]]:
    """One `push --workers 256` of ``src``: the process, its seconds, its JSON summary."""
    started = time.monotonic()
    done = subprocess.run(
        [find_program("asyncsync", "pip install -e ."), "push", str(src),
         f"s3://{BUCKET}/{prefix}", "--workers", "256", "--retries", "12",
         "--state-dir", str(state), "--json"],
        env=_env(store, proxy.endpoint), capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    summary: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("type") == "summary":
                summary = record
    return done, seconds, summary


WORKERS = 256


def push_storm(work: Path, seed: int, seconds: float = 60.0, error_rate: float = 0.3,
               latency: float = 1.0) -> dict[str, Any]:
    """A push whose requests go on for at least ``seconds``, ``error_rate`` of them answered
    503 throughout. The store is slow, as a throttling one is: each request it serves is
    held 0.5-1.5 x ``latency`` s at the proxy (its 503s come at once). With WORKERS requests
    at a time, at most WORKERS / ``latency`` files a second go up whatever the machine, so
    1.1 x ``seconds`` x that many files take at least 1.1 x ``seconds``. No bandwidth cap
    paces it: the request times the proxy records are the client's own (its backoff)."""
    files = math.ceil(1.1 * seconds * WORKERS / latency)
    src = work / "storm"
    _storm_files(src, files)
    with SeaweedFS(data_dir=work / "storm-seaweedfs") as store, \
            ChaosProxy(store.endpoint, seed) as proxy:
        client = store.client(max_pool_connections=8)
        client.create_bucket(Bucket=BUCKET)
        proxy.set_error_rate(error_rate)
        proxy.set_latency(latency)
        proxy.record = True
        done, storm_s, summary = _push(src, "storm", store, proxy, work / "storm-state")
        proxy.set_error_rate(0.0)
        proxy.set_latency(0.0)
        proxy.record = False
        arrivals = list(proxy.arrivals)
        stats = proxy.stats
        wrong = _wrong_objects(client, src, "storm")
    # The gap between a PUT answered 503 and the next attempt at the same key: the backoff.
    last_fault: dict[str, float] = {}
    gaps = []
    for a in arrivals:
        if a.method != "PUT":
            continue
        if a.path in last_fault:
            gaps.append(a.at - last_fault.pop(a.path))
        if a.faulted:
            last_fault[a.path] = a.at
    # The most requests arriving in any 50 ms, against the mean: a herd shows as a spike.
    buckets: dict[int, int] = {}
    for a in arrivals:
        buckets[int(a.at / 0.05)] = buckets.get(int(a.at / 0.05), 0) + 1
    mean = statistics.mean(buckets.values()) if buckets else 0.0
    # The same past the first 2 s: 256 workers starting at once are not retries in step.
    first = min(buckets, default=0)
    later = [n for b, n in buckets.items() if b >= first + 40]
    faulted = [a.at for a in arrivals if a.faulted]
    return {
        "files": files, "exit_code": done.returncode, "seconds": round(storm_s, 1),
        "target_seconds": seconds, "error_rate": error_rate, "latency_s": latency,
        # From the first request answered 503 to the last: how long the storm really lasted.
        "fault_phase_s": round(faulted[-1] - faulted[0], 1) if faulted else 0.0,
        "wrong_objects": len(wrong), "requests": stats.requests, "answered_503": stats.faults,
        "retries_counted": summary.get("retries"), "uploaded": summary.get("uploaded"),
        "failed": summary.get("failed"),
        "retry_gaps": len(gaps),
        "retry_gap_s": {"min": round(min(gaps), 3), "p50": round(statistics.median(gaps), 3),
                        "p90": round(statistics.quantiles(gaps, n=10)[-1], 3),
                        "max": round(max(gaps), 3),
                        "stdev": round(statistics.pstdev(gaps), 3)} if len(gaps) > 1 else None,
        "peak_per_50ms": max(buckets.values(), default=0), "mean_per_50ms": round(mean, 1),
        "peak_per_50ms_after_2s": max(later, default=0),
        "stderr_tail": done.stderr[-500:],
    }


def many_runs(work: Path, runs: int = 200, seconds: float = 40.0,
              max_memory: int = 32 * MiB, max_bandwidth: int = 20 * MiB) -> dict[str, Any]:
    src = work / "many"
    src.mkdir(parents=True, exist_ok=True)
    with SeaweedFS(data_dir=work / "many-seaweedfs") as store, \
            ChaosProxy(store.endpoint, 0) as proxy:
        client = store.client()
        client.create_bucket(Bucket=BUCKET)
        argv = [find_program("asyncsync", "pip install -e ."), "watch", str(src),
                f"s3://{BUCKET}/many", "--state-dir", str(work / "many-state"),
                "--interval", "1", "--settle", "1", "--checkpoint-interval", "0",
                "--max-memory", str(max_memory), "--max-bandwidth", str(max_bandwidth)]
        with open(work / "many-watch.log", "wb") as log:
            watch = subprocess.Popen(argv, env=_env(store, proxy.endpoint), stdout=log,
                                     stderr=subprocess.STDOUT)
        # The process before any load: what the load's buffers come on top of.
        time.sleep(3.0)
        idle_kib = 0
        with open(f"/proc/{watch.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    idle_kib = int(line.split()[1])
        rates: list[float] = []
        peak_kib = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_kib
            before, at = proxy.stats.body_bytes_upstream, time.monotonic()
            while not stop.wait(2.0):
                now_bytes, now = proxy.stats.body_bytes_upstream, time.monotonic()
                rates.append((now_bytes - before) / (now - at))
                before, at = now_bytes, now
                with open(f"/proc/{watch.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            peak_kib = max(peak_kib, int(line.split()[1]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.monotonic() + seconds
        epoch = 0
        while time.monotonic() < deadline:
            epoch += 1
            for run in range(runs):
                folder = src / f"train{run:03d}" / "weights"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "last.pt").write_bytes(os.urandom(256 * KiB))
                with open(folder.parent / "results.csv", "a") as csv:
                    csv.write(f"{epoch},{run}\n")
            time.sleep(2.0)
        # Drain: the bandwidth cap sets how long the backlog takes.
        time.sleep(5)
        watch.terminate()
        code = watch.wait(300)
        stop.set()
        sampler.join()
        wrong = _wrong_objects(client, src, "many")
    busy = sorted(rates)[len(rates) // 2:] if rates else []
    return {
        "runs": runs, "seconds": seconds, "exit_code": code, "wrong_objects": len(wrong),
        "max_memory_mib": max_memory // MiB, "peak_rss_mib": round(peak_kib / 1024, 1),
        "idle_rss_mib": round(idle_kib / 1024, 1),
        "max_bandwidth_mib_s": max_bandwidth / MiB,
        "peak_rate_mib_s": round(max(rates, default=0.0) / MiB, 2),
        "median_busy_rate_mib_s": round(statistics.median(busy) / MiB, 2) if busy else 0.0,
    }


def checks(storm: dict[str, Any], many: dict[str, Any]) -> dict[str, bool]:
    """The scenarios' verdicts, beside the soak's own."""
    bound = many["max_bandwidth_mib_s"]
    # The token bucket holds a quarter second of rate: a 2-s window may see that much more.
    peak_bound = bound * (1 + 0.25 / 2)
    return {
        f"push storm: exit 0, every object right, 503s for >= {storm['target_seconds']:g} s, "
        "every 503 counted as a retry":
            storm["exit_code"] == 0 and storm["wrong_objects"] == 0
            and storm["fault_phase_s"] >= storm["target_seconds"]
            and storm["retries_counted"] == storm["answered_503"],
        f"{many['runs']} runs: exit 0, every object right": many["exit_code"] == 0
            and many["wrong_objects"] == 0,
        f"{many['runs']} runs: peak RSS over idle <= --max-memory":
            many["peak_rss_mib"] - many["idle_rss_mib"] <= many["max_memory_mib"],
        f"{many['runs']} runs: bytes/s at the proxy <= --max-bandwidth (2-s peak <= "
        f"{peak_bound:g} MiB/s)":
            many["peak_rate_mib_s"] <= peak_bound and many["median_busy_rate_mib_s"] <= bound,
    }


def describe(storm: dict[str, Any], many: dict[str, Any]) -> list[dict[str, str]]:
    gaps = storm["retry_gap_s"] or {}
    return [
        {"title": f"push --workers 256, {storm['error_rate']:.0%} of requests answered 503",
         "text": (
             f"{storm['files']} files of 16-17 KiB; the store served each request in "
             f"{0.5 * storm['latency_s']:g}-{1.5 * storm['latency_s']:g} s (the proxy held "
             f"it), so {WORKERS} workers could send at most {WORKERS / storm['latency_s']:g} "
             f"files/s: at least {storm['files'] * storm['latency_s'] / WORKERS:.0f} s. "
             f"push exited {storm['exit_code']} after {storm['seconds']} s; the proxy answered "
             f"{storm['error_rate']:.0%} of requests 503 SlowDown throughout, from the first "
             f"503 to the last {storm['fault_phase_s']} s; objects wrong or missing: "
             f"{storm['wrong_objects']}. {storm['requests']} requests through the proxy, "
             f"{storm['answered_503']} answered 503; push counted {storm['retries_counted']} "
             f"retries (its --json summary) and {storm['failed']} failed files. Gap from a 503 "
             f"to the next attempt at the same key ({storm['retry_gaps']} retries): min "
             f"{gaps.get('min')} s, median {gaps.get('p50')} s, p90 {gaps.get('p90')} s, max "
             f"{gaps.get('max')} s, standard deviation {gaps.get('stdev')} s (a spread, not "
             f"one delay: jitter). Most requests in any 50 ms: {storm['peak_per_50ms']} (past the "
             f"first 2 s, when 256 workers start at once: "
             f"{storm.get('peak_per_50ms_after_2s')}), against {storm['mean_per_50ms']} on "
             "average.")},
        {"title": f"{many['runs']} run directories changing at once",
         "text": (
             f"watch with --max-memory {many['max_memory_mib']}MiB and --max-bandwidth "
             f"{many['max_bandwidth_mib_s']:g}MiB/s, {many['seconds']:g} s of epochs (a 256 KiB "
             f"last.pt and a results.csv row per run per epoch); exit {many['exit_code']}; "
             f"objects wrong or missing at the end: {many['wrong_objects']}. RSS idle before "
             f"the load {many['idle_rss_mib']} MiB, peak (VmHWM) {many['peak_rss_mib']} MiB: "
             f"{many['peak_rss_mib'] - many['idle_rss_mib']:.1f} MiB over idle, against "
             f"--max-memory {many['max_memory_mib']} MiB (the bound on body bytes buffered). "
             f"Bytes reaching the proxy: peak {many['peak_rate_mib_s']} MiB/s over 2 s, "
             f"median of the busier half {many['median_busy_rate_mib_s']} MiB/s.")},
    ]
