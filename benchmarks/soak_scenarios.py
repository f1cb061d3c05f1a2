"""The soak's two "also under load" scenarios, each against a SeaweedFS of its own.

* A push storm: `asyncsync push --workers 256` through a proxy that answers 30% of requests
  with 503 SlowDown: it must complete with every object right, its retries counted, and the
  retries spread out in time (backoff jitter), not sent back in lockstep.
* Many trainings, one node: 200 run directories changing at once under `watch` with
  `--max-memory` and `--max-bandwidth`: the daemon's peak RSS and the bytes per second that
  reach the proxy, against those bounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
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
    wrong = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        relative = path.relative_to(src).as_posix()
        try:
            answer = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{relative}")
            body = answer["Body"].read()
        except Exception:
            wrong.append(relative)
            continue
        if xxhash.xxh3_128_digest(body) != xxhash.xxh3_128_digest(path.read_bytes()):
            wrong.append(relative)
    return wrong


def push_storm(work: Path, seed: int, files: int = 2000, error_rate: float = 0.3
               ) -> dict[str, Any]:
    src = work / "storm"
    for i in range(files):
        path = src / f"d{i % 40:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(16 * KiB + i % 997))
    with SeaweedFS(data_dir=work / "storm-seaweedfs") as store, \
            ChaosProxy(store.endpoint, seed) as proxy:
        client = store.client()
        client.create_bucket(Bucket=BUCKET)
        proxy.record = True
        proxy.set_error_rate(error_rate)
        started = time.monotonic()
        done = subprocess.run(
            [find_program("asyncsync", "pip install -e ."), "push", str(src),
             f"s3://{BUCKET}/storm", "--workers", "256", "--retries", "12",
             "--state-dir", str(work / "storm-state"), "--json"],
            env=_env(store, proxy.endpoint), capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - started
        proxy.set_error_rate(0.0)
        proxy.record = False
        wrong = _wrong_objects(client, src, "storm")
        arrivals = list(proxy.arrivals)
        stats = proxy.stats
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
    return {
        "files": files, "exit_code": done.returncode, "seconds": round(seconds, 1),
        "wrong_objects": len(wrong), "requests": stats.requests, "answered_503": stats.faults,
        "retry_gaps": len(gaps),
        "retry_gap_s": {"min": round(min(gaps), 3), "p50": round(statistics.median(gaps), 3),
                        "max": round(max(gaps), 3),
                        "stdev": round(statistics.pstdev(gaps), 3)} if gaps else None,
        "peak_per_50ms": max(buckets.values(), default=0), "mean_per_50ms": round(mean, 1),
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
        "max_bandwidth_mib_s": max_bandwidth / MiB,
        "peak_rate_mib_s": round(max(rates, default=0.0) / MiB, 2),
        "median_busy_rate_mib_s": round(statistics.median(busy) / MiB, 2) if busy else 0.0,
    }


def describe(storm: dict[str, Any], many: dict[str, Any]) -> list[dict[str, str]]:
    gaps = storm["retry_gap_s"] or {}
    return [
        {"title": "push --workers 256, 30% of requests answered 503",
         "text": (
             f"{storm['files']} files; push exited {storm['exit_code']} after "
             f"{storm['seconds']} s; objects wrong or missing: {storm['wrong_objects']}; "
             f"{storm['requests']} requests through the proxy, {storm['answered_503']} "
             f"answered 503. Gap from a 503 to the next attempt at the same key "
             f"({storm['retry_gaps']} retries): min {gaps.get('min')} s, median "
             f"{gaps.get('p50')} s, max {gaps.get('max')} s, standard deviation "
             f"{gaps.get('stdev')} s (a spread, not one delay: jitter). Most requests in any "
             f"50 ms: {storm['peak_per_50ms']}, against {storm['mean_per_50ms']} on average.")},
        {"title": f"{many['runs']} run directories changing at once",
         "text": (
             f"watch with --max-memory {many['max_memory_mib']}MiB and --max-bandwidth "
             f"{many['max_bandwidth_mib_s']:g}MiB/s, {many['seconds']:g} s of epochs (a 256 KiB "
             f"last.pt and a results.csv row per run per epoch); exit {many['exit_code']}; "
             f"objects wrong or missing at the end: {many['wrong_objects']}. Peak RSS "
             f"(VmHWM) {many['peak_rss_mib']} MiB; bytes reaching the proxy: peak "
             f"{many['peak_rate_mib_s']} MiB/s over 2 s, median of the busier half "
             f"{many['median_busy_rate_mib_s']} MiB/s.")},
    ]
