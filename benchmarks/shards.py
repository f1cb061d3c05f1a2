#!/usr/bin/env python3
"""Benchmark the scale-out of `asyncsync push --shard I/N`: N shards of one tree, at once.

`push SRC DEST --shard I/N --run-depth 1` uploads shard I's part of SRC: the unit is the run
directory one level below SRC, each shard walks only the run directories it owns, so N shards
together stat each file once and only the level above the runs is read by every one of them.
This benchmark measures what that partition costs, on one embedded SeaweedFS (run.py's
helpers: the server, measure(), the frozen source, the checks):

* for each corpus and round, for each N (in an order rotated per round): N processes
  `asyncsync push SRC s3://BUCKET/shards/<corpus>/r<round>/n<N> --shard I/N --run-depth 1
  --workers W --json --state-dir <per shard>`, started at once (each under measure(), in a
  thread of its own), to a fresh prefix with fresh state dirs. Recorded: wall (the first
  shard's start to the last one's exit), client CPU (user+sys of the N children together),
  the largest peak RSS, and the sum of the shards' `scanned`. The sum must equal the corpus's
  file count, and the bucket must hold exactly the corpus, or the benchmark stops;
* afterwards, one untimed pass per N with every shard under `strace -f -c -e
  trace=newfstatat,statx,fstat`: the stat-family syscalls of all N shards together, next to
  the corpus's file count (N shards should stat about as much as one, not N times as much).
  Skipped, with a note in the results, where strace is missing or cannot trace.

Medians over rounds go to shards-results.json (every raw round too) and SHARDS.md, with a
projection of what P pods on separate nodes would take for 100 M files, derived from the
1-vs-N differences.

    .venv/bin/python benchmarks/shards.py            # the full run, as `make bench-shards`
    .venv/bin/python benchmarks/shards.py --quick    # scaled down, 1 round, into
                                                     # work/quick-shards/
    .venv/bin/python benchmarks/shards.py --render-only   # redraw SHARDS.md from the JSON
    .venv/bin/python benchmarks/shards.py --corpora noop --shards 1 2 4 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from asyncsync.embedded_s3 import SeaweedFS
from corpus import CORPORA, DEFAULT_WORK_DIR, Corpus, ensure
from run import (
    BUCKET,
    QUICK_SCALE,
    BenchFailure,
    FrozenSource,
    Measured,
    _fmt,
    _loads,
    _rate,
    _secs,
    asyncsync_binary,
    cache_corpus,
    check_imports,
    child_env,
    delete_prefix,
    first_line,
    freeze_source,
    list_prefix,
    machine_info,
    measure,
    seaweedfs,
    settle,
    vacuum,
)

HERE = Path(__file__).resolve().parent
DEFAULT_CORPORA = ("noop", "runs")
DEFAULT_SHARDS = (1, 2, 4)
DEFAULT_ROUNDS = 3  # with 3 values of N, each N runs first once
RUN_DEPTH = 1  # where both corpora's units are: d000..d099, train..train12
STAT_SYSCALLS = ("newfstatat", "statx", "fstat")
# What a sharded push keeps for itself under its prefix (reports, manifest copies): not the
# corpus's, so left out when the bucket is compared with the corpus.
OWN_RECORDS = "_asyncsync/"
# The projection's tree, and the pod counts it is shown for.
PROJECTED_FILES = 100_000_000
PROJECTED_PODS = (1, 10, 100, 1000)


# -- one run of N shards ----------------------------------------------------------------------


@dataclass
class ShardSample:
    """N shards of one corpus, started at once: what they cost together, and what they did."""

    corpus: str
    shards: int
    round: int
    order: int  # position of this N within its round (0 = ran first)
    wall_s: float  # the first shard's start to the last one's exit
    cpu_s: float  # user+sys of the N children, summed
    user_s: float
    sys_s: float
    peak_rss_mb: float  # the largest of the N shards' ru_maxrss
    scanned: list[int]  # per shard, from its summary
    sent_bytes: list[int]  # per shard: its summary's `bytes` (the corpus's share, and more)
    shard_wall_s: list[float]
    shard_cpu_s: list[float]
    files: int
    bytes: int
    files_per_s: float
    verified: str


@dataclass
class StatCount:
    """The untimed strace pass of N shards: stat-family syscalls, all shards together."""

    corpus: str
    shards: int
    files: int
    calls: int
    per_syscall: dict[str, int]
    per_shard: list[int]
    scanned: list[int]


@dataclass
class Context:
    server: SeaweedFS
    client: Any
    env: dict[str, str]  # the shards': the server's credentials, PYTHONPATH on the frozen copy
    exe: str
    work: Path
    workers: int


def shard_argv(ctx: Context, src: Path, dest: str, index: int, count: int,
               state: Path) -> list[str]:
    # --checkpoint-manifest 0: the copy at exit only. The periodic copy fires by wall time
    # (every 60 s by default), so whether a run paid one more would depend on how slow the
    # shared machine was that round, not on N; the copy at exit is every shard's, and stays.
    return [ctx.exe, "push", str(src), dest, "--shard", f"{index}/{count}",
            "--run-depth", str(RUN_DEPTH), "--workers", str(ctx.workers), "--json",
            "--state-dir", str(state), "--checkpoint-manifest", "0"]


def strace_argv(output: Path, argv: list[str]) -> list[str]:
    """argv under strace, counting (-c) the stat family over every thread (-f) into output."""
    return ["strace", "-f", "-c", "-e", f"trace={','.join(STAT_SYSCALLS)}", "-o", str(output),
            *argv]


def run_at_once(argvs: Sequence[list[str]], env: dict[str, str],
                stems: Sequence[Path]) -> tuple[list[Measured], float]:
    """Every argv under measure() at the same moment; their results and the overall wall.

    measure() blocks until its child exits, so each runs in a thread of its own; a barrier
    releases them together, as the pods of one Job start. The wall is the first child's
    start to the last one's exit: each child's exit is when its thread saw measure() return,
    its start that minus the launcher's own wall, so the launcher's start-up (~20 ms of
    Python) is not counted, and for N = 1 the figure is exactly run.py's wall.
    """
    barrier = threading.Barrier(len(argvs))

    def one(argv: list[str], stem: Path) -> tuple[Measured, float]:
        barrier.wait(timeout=60)
        m = measure(argv, env, stem)
        return m, time.perf_counter()

    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        futures = [pool.submit(one, argv, stem) for argv, stem in zip(argvs, stems, strict=True)]
        done = [future.result() for future in futures]
    ends = [end for _, end in done]
    starts = [end - m.wall_s for m, end in done]
    return [m for m, _ in done], max(ends) - min(starts)


def shard_summary(m: Measured, label: str) -> dict[str, Any]:
    """The shard's --json summary (its last stdout line), checked: it ran and failed nothing."""
    if m.exit_code != 0:
        raise BenchFailure(f"{label} exited {m.exit_code}: see {m.stderr}")
    lines = m.stdout.read_text().splitlines()
    summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if summary.get("type") != "summary" or summary.get("failed"):
        raise BenchFailure(f"{label}: summary {summary or 'missing'}: see {m.stdout}")
    return summary


def verify(ctx: Context, corpus: Corpus, n: int, prefix: str,
           summaries: list[dict[str, Any]]) -> str:
    """The N summaries and the bucket against the corpus: every file taken by exactly one
    shard, uploaded once, and nothing else under the prefix but asyncsync's own records."""
    scanned = sum(int(s["scanned"]) for s in summaries)
    uploaded = sum(int(s["uploaded"]) for s in summaries)
    if scanned != corpus.files:
        raise BenchFailure(f"{corpus.name} N={n}: the shards scanned {scanned} files in all, "
                           f"the corpus has {corpus.files}")
    # The summaries' `bytes` is not compared: it counts all a shard sent, its report and
    # manifest copy included. The listing below checks the corpus's bytes.
    if uploaded != corpus.files:
        raise BenchFailure(f"{corpus.name} N={n}: the shards uploaded {uploaded} files, "
                           f"expected {corpus.files}")
    count, total, _ = list_prefix(ctx.client, prefix + "/")
    own_count, own_bytes, _ = list_prefix(ctx.client, f"{prefix}/{OWN_RECORDS}")
    count, total = count - own_count, total - own_bytes
    if (count, total) != (corpus.files, corpus.bytes):
        raise BenchFailure(f"{corpus.name} N={n}: bucket holds {count} objects / {total} bytes "
                           f"under {prefix}/ (besides {OWN_RECORDS}), expected "
                           f"{corpus.files} / {corpus.bytes}")
    return f"{count} objects, {total} bytes (+ {own_count} under {OWN_RECORDS})"


def push_shards(ctx: Context, corpus: Corpus, n: int, prefix: str, tag: str,
                traced: bool = False) -> tuple[list[Measured], float, list[dict[str, Any]], str,
                                               list[Path]]:
    """N shards of corpus to a fresh prefix with fresh state dirs, checked, then removed.

    Returns each shard's measurement, the overall wall, their summaries, what was verified,
    and (traced) each shard's strace summary file.
    """
    state = ctx.work / "shards-state" / f"{corpus.name}-{tag}-n{n}"
    shutil.rmtree(state, ignore_errors=True)
    stems = [ctx.work / "shards-logs" / f"{corpus.name}-{tag}-n{n}-s{i}" for i in range(n)]
    traces = [stem.with_suffix(".strace") for stem in stems]
    dest = f"s3://{BUCKET}/{prefix}"
    argvs = [shard_argv(ctx, corpus.path, dest, i, n, state / f"shard{i}") for i in range(n)]
    if traced:
        argvs = [strace_argv(trace, argv) for trace, argv in zip(traces, argvs, strict=True)]
    else:
        # The corpus in the page cache and the server idle for every N alike (run.py's why).
        cache_corpus(corpus.path)
        settle(ctx.server)
    try:
        measured, wall = run_at_once(argvs, ctx.env, stems)
        summaries = [shard_summary(m, f"{corpus.name} {tag} shard {i}/{n}")
                     for i, m in enumerate(measured)]
        verified = verify(ctx, corpus, n, prefix, summaries)
    finally:
        # Every run starts on the same store: an empty prefix tree, deleted needles compacted.
        delete_prefix(ctx.client, prefix + "/")
        shutil.rmtree(state, ignore_errors=True)
        vacuum(ctx.server)
    return measured, wall, summaries, verified, traces


def timed_run(ctx: Context, corpus: Corpus, n: int, rnd: int, order: int) -> ShardSample:
    prefix = f"shards/{corpus.name}/r{rnd}/n{n}"
    measured, wall, summaries, verified, _ = push_shards(ctx, corpus, n, prefix, f"r{rnd}")
    cpu = [m.user_s + m.sys_s for m in measured]
    return ShardSample(
        corpus=corpus.name, shards=n, round=rnd, order=order, wall_s=round(wall, 4),
        cpu_s=round(sum(cpu), 4), user_s=round(sum(m.user_s for m in measured), 4),
        sys_s=round(sum(m.sys_s for m in measured), 4),
        peak_rss_mb=round(max(m.peak_rss_mb for m in measured), 1),
        scanned=[int(s["scanned"]) for s in summaries],
        sent_bytes=[int(s["bytes"]) for s in summaries],
        shard_wall_s=[round(m.wall_s, 4) for m in measured],
        shard_cpu_s=[round(c, 4) for c in cpu], files=corpus.files, bytes=corpus.bytes,
        files_per_s=round(corpus.files / max(wall, 1e-9), 1), verified=verified,
    )


def parse_strace_counts(path: Path) -> dict[str, int]:
    """The calls column of `strace -c`'s table, per syscall of STAT_SYSCALLS.

    Rows read `% time  seconds  usecs/call  calls  [errors]  syscall`: the errors column is
    blank when there were none, so calls is always the fourth field and the name the last.
    """
    counts = dict.fromkeys(STAT_SYSCALLS, 0)
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in counts and fields[3].isdigit():
            counts[fields[-1]] += int(fields[3])
    return counts


def stat_pass(ctx: Context, corpus: Corpus, n: int) -> StatCount:
    prefix = f"shards/{corpus.name}/stat/n{n}"
    _, _, summaries, _, traces = push_shards(ctx, corpus, n, prefix, "stat", traced=True)
    per_shard = [parse_strace_counts(trace) for trace in traces]
    per_syscall = {name: sum(c[name] for c in per_shard) for name in STAT_SYSCALLS}
    return StatCount(corpus=corpus.name, shards=n, files=corpus.files,
                     calls=sum(per_syscall.values()), per_syscall=per_syscall,
                     per_shard=[sum(c.values()) for c in per_shard],
                     scanned=[int(s["scanned"]) for s in summaries])


def strace_problem() -> str | None:
    """Why the stat pass cannot run here (strace missing, or not allowed to trace), or None."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace): the stat pass was skipped"
    try:
        done = subprocess.run(["strace", "-f", "-c", "-o", os.devnull, "true"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"strace could not run ({exc}): the stat pass was skipped"
    if done.returncode != 0:
        return (f"strace cannot trace here ({done.stderr.strip() or done.returncode}): "
                "the stat pass was skipped")
    return None


def run_directories(root: Path) -> int:
    """How many units --run-depth makes of the tree: its directories RUN_DEPTH levels down."""
    level = [root]
    for _ in range(RUN_DEPTH):
        level = [entry for parent in level for entry in parent.iterdir() if entry.is_dir()]
    return len(level)


def rotated(values: Sequence[int], rnd: int) -> list[int]:
    """Round rnd's order of N: each N runs first in one of every len(values) rounds."""
    k = rnd % len(values)
    return [*values[k:], *values[:k]]


def report(s: ShardSample) -> None:
    print(f"  r{s.round} N={s.shards:<3} {s.wall_s:7.2f}s wall {s.cpu_s:7.2f}s cpu "
          f"{s.peak_rss_mb:5.0f} MB rss {s.files_per_s:9.0f} files/s  scanned "
          f"{'+'.join(str(x) for x in s.scanned)}", flush=True)


def prime(ctx: Context, corpus: Corpus) -> None:
    """One untimed N=1 push of the corpus before its rounds (run.py's prime: whatever a new
    corpus costs first, files not read for minutes, would be billed to round 0's first N)."""
    push_shards(ctx, corpus, 1, f"shards/{corpus.name}/prime/n1", "prime")
    print("  primed: one untimed push", flush=True)


# -- summarising ------------------------------------------------------------------------------


def medians(samples: list[ShardSample]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[ShardSample]] = {}
    for s in samples:
        groups.setdefault((s.corpus, s.shards), []).append(s)
    rows = []
    for (corpus, n), group in groups.items():
        row: dict[str, Any] = {
            "corpus": corpus, "shards": n, "rounds": len(group), "files": group[0].files,
            "bytes": group[0].bytes,
            "wall_s": round(statistics.median(s.wall_s for s in group), 3),
            "wall_min_s": min(s.wall_s for s in group),
            "wall_max_s": max(s.wall_s for s in group),
            "cpu_s": round(statistics.median(s.cpu_s for s in group), 3),
            "peak_rss_mb": round(statistics.median(s.peak_rss_mb for s in group), 1),
            "files_per_s": round(statistics.median(s.files_per_s for s in group), 1),
            # Who owns what is a hash of the unit's name: the same split every round.
            "scanned": group[0].scanned,
        }
        row["cpu_per_shard_s"] = round(row["cpu_s"] / n, 3)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["corpus"], r["shards"]))


def projection(corpus: dict[str, Any], rows: list[dict[str, Any]],
               stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What N=1 against the largest N says about one shard's cost, and the wall of
    PROJECTED_FILES files at each of PROJECTED_PODS pods; None without N=1 and an N > 1.

    A shard's cost is taken as a part per file plus a part every shard repeats whatever its
    share of the tree (start-up, its store session, its report and manifest copy, its read
    of the levels above the run depth): N shards cost the per-file part once and the
    repeated part N times, so the repeated part is (cost at the largest N - cost at N=1) /
    (N - 1), the same for stat calls. Any N between them tests that model: its cost is
    predicted, not fitted.
    """
    mine = {r["shards"]: r for r in rows if r["corpus"] == corpus["name"]}
    if 1 not in mine or max(mine) == 1:
        return None
    one, top = mine[1], max(mine)
    files = corpus["files"]
    # Below zero is noise, not a saving.
    repeated_raw = (mine[top]["cpu_s"] - one["cpu_s"]) / (top - 1)
    repeated_cpu = max(0.0, repeated_raw)
    # What one more file costs: N=1's CPU less its own repeated part. Total / files would
    # count a shard's start-up once per 180 files on `runs`, where it is much of the CPU.
    marginal_cpu = max(0.0, one["cpu_s"] - repeated_cpu) / files
    checks: list[dict[str, Any]] = [
        {"shards": n, "cpu_s": mine[n]["cpu_s"],
         "predicted_cpu_s": round(one["cpu_s"] + (n - 1) * repeated_cpu, 3)}
        for n in sorted(mine) if 1 < n < top
    ]
    counted = {s["shards"]: s for s in stats if s["corpus"] == corpus["name"]}
    stat_part: dict[str, Any] = {}
    if 1 in counted and top in counted:
        calls_one = counted[1]["calls"]
        repeated_stats = max(0.0, (counted[top]["calls"] - calls_one) / (top - 1))
        stat_part = {
            "stats_per_file": round(calls_one / files, 3),
            "repeated_stats": round(repeated_stats),
            "marginal_stats_per_file": round(max(0.0, calls_one - repeated_stats) / files, 3),
            "stats_ratio": round(counted[top]["calls"] / max(calls_one, 1), 3),
        }
        for check in checks:
            if check["shards"] in counted:
                check["stats"] = counted[check["shards"]]["calls"]
                check["predicted_stats"] = round(calls_one + (check["shards"] - 1)
                                                 * repeated_stats)
    mean_bytes = corpus["bytes"] / files
    pods = []
    for p in PROJECTED_PODS:
        per_pod = PROJECTED_FILES / p
        pods.append({"pods": p, "files_per_pod": per_pod,
                     "bytes_per_pod": per_pod * mean_bytes,
                     "wall_s": round(per_pod * marginal_cpu + repeated_cpu, 1)})
    shares = mine[top]["scanned"]
    return {
        "corpus": corpus["name"], "from_shards": top,
        "per_file_cpu_s": one["cpu_s"] / files, "marginal_cpu_per_file_s": marginal_cpu,
        "per_file_wall_s": one["wall_s"] / files,
        "repeated_cpu_s": round(repeated_cpu, 3), "repeated_cpu_raw_s": round(repeated_raw, 3),
        # How much of one shard's whole run on this corpus is the repeated part.
        "repeated_share": round(repeated_cpu / max(one["cpu_s"], 1e-9), 3),
        "cpu_ratio": round(mine[top]["cpu_s"] / max(one["cpu_s"], 1e-9), 3),
        "wall_ratio": round(mine[top]["wall_s"] / max(one["wall_s"], 1e-9), 3),
        # The largest shard against an even split: a Job takes as long as its largest pod.
        "imbalance": round(max(shares) / (sum(shares) / len(shares)), 2),
        "mean_bytes": mean_bytes, **stat_part, "checks": checks, "pods": pods,
    }


def summarise(results: dict[str, Any]) -> None:
    """Medians and projections, recomputed from the raw rounds (so --render-only needs no
    rerun after a change to either)."""
    rows = medians([ShardSample(**raw) for raw in results["rounds"]])
    results["medians"] = rows
    projections = (projection(c, rows, results["stat_counts"]) for c in results["corpora"])
    results["projections"] = [p for p in projections if p is not None]


# -- the report -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min" if minutes >= 10 else f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


def _count(value: float) -> str:
    """100 M, 1 M, 100 k, or the number itself."""
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:,.3g} {unit}"
    return f"{value:,.0f}"


def _bytes(value: float) -> str:
    for size, unit in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= size:
            return f"{value / size:,.3g} {unit}"
    return f"{value:,.0f} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    w = cfg["workers"]
    ns = cfg["shards"]
    stats = {(s["corpus"], s["shards"]): s for s in results["stat_counts"]}
    sizes = {c["name"]: c for c in results["corpora"]}
    quick = " **Quick run** (`--quick`): scaled-down corpora, one round; not results." \
        if cfg["quick"] else ""
    lines = [
        "# Scale-out: `asyncsync push --shard I/N`",
        "",
        "<!-- Generated by benchmarks/shards.py; edit the generator, not this file. -->",
        "",
        "N shards of one tree, started at once against one embedded SeaweedFS on loopback: "
        "what the partition costs (CPU, stat calls) as N grows, and from that what P pods "
        "on separate nodes would take for a tree of 100 M files.",
        "",
        "## What is measured, and how",
        "",
        "- **Corpora** (`corpus.py`, as for `run.py`): "
        + "; ".join(f"`{name}`: {c['files']:,} files, {c['bytes'] / 1e6:,.1f} MB"
                    for name, c in sizes.items())
        + ". Both keep their units one level below SRC (`noop`: 100 directories "
        "`d000`..`d099` of tiny text files; `runs`: 12 YOLOv8-shaped run directories), so "
        "`--run-depth 1` partitions them by directory.",
        f"- **One run of N shards** (N = {', '.join(str(n) for n in ns)}): N processes "
        "`asyncsync push SRC s3://bucket/shards/CORPUS/rROUND/nN --shard I/N --run-depth 1 "
        f"--workers {w} --json --state-dir STATE/shardI --checkpoint-manifest 0`, released "
        "together, each under run.py's launcher, to a fresh prefix with fresh state dirs "
        "(a cold upload). `--checkpoint-manifest 0` keeps the manifest copy each shard makes "
        "at exit and drops the periodic one, which fires by wall time (60 s by default) and "
        "so would depend on how slow the shared machine was, not on N.",
        "- **Checks** after every run: each shard's JSON summary reports no failure; the "
        "shards' `scanned` add up to the corpus's file count, and so do their uploads; the "
        "prefix, listed with botocore, holds exactly the corpus (object count "
        "and bytes, besides the shards' own reports and manifest copies under "
        "`_asyncsync/`). Otherwise the benchmark stops.",
        "- **Wall s**: the first shard's start to the last one's exit. **CPU s (total)**: "
        "user+sys of the N client processes together (`os.wait4`), not the server's. "
        "**CPU per shard**: that / N. **Peak RSS**: the largest shard's `ru_maxrss`. "
        "**scanned**: the files each shard took (the split is a hash of the run directory's "
        "name, the same every round). **files/s**: corpus files / wall.",
        "- **Stat syscalls**: after the timed rounds, one more untimed run per N, with every "
        "shard under `strace -f -c -e trace=newfstatat,statx,fstat`: the stat-family calls "
        "of all N shards and all their threads together, interpreter start-up included "
        "(Python's imports stat a few thousand paths).",
        f"- **Rounds**: {cfg['rounds']}; the order of N is rotated each round, so each N runs "
        "first as often as another; before each run the corpus is read into the page cache "
        "and the server left to go idle, and after it the prefix is deleted and the volumes "
        "compacted, so every run starts on the same store. One untimed N=1 push of each "
        "corpus precedes its rounds. Figures are **medians** over rounds, each column on its "
        "own; every raw round is in `shards-results.json`.",
        f"- **Caveat**: here the N shards and the server share the same {m['nproc']} cores "
        "and one store, so **wall does not fall with N on this machine**: N shards do the "
        "same work on the same cores. What the figures do show is the cost of the partition "
        "itself: total CPU and stat calls against N.",
        "",
        "## How to run",
        "",
        "```sh",
        "make bench-shards                               # the full run: this file",
        ".venv/bin/python benchmarks/shards.py --quick   # smoke run, scaled down, into "
        "benchmarks/work/quick-shards/",
        ".venv/bin/python benchmarks/shards.py --corpora noop --shards 1 2 4 8 --rounds 4",
        "```",
        "",
        "## Results",
        "",
        f"Date: {m['date']}. Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB "
        f"RAM, {m['os']}; Python {m['python']}. Versions: asyncsync {m['asyncsync']} (git "
        f"{m.get('asyncsync_git', 'unknown')}, source sha256 "
        f"{m.get('asyncsync_source', 'unknown')}); SeaweedFS {m['seaweedfs']}; "
        f"{m.get('strace', 'strace: unknown')}. Scale: {cfg['scale']:g}, rounds: "
        f"{cfg['rounds']}, workers per shard: {w}. Load average (1, 5, 15 min) at start: "
        f"{_loads(m.get('loadavg_at_start'))}, at end: {_loads(m.get('loadavg_at_end'))}."
        + quick,
    ]
    if results.get("stat_note"):
        lines += ["", f"Stat syscalls: {results['stat_note']}."]
    for c in results["corpora"]:
        rows = [r for r in results["medians"] if r["corpus"] == c["name"]]
        lines += [
            "",
            f"### {c['name']}: {c['files']:,} files, {c['bytes'] / 1e6:,.1f} MB",
            "",
            "| N | wall s | wall range | CPU s (total) | CPU per shard s | peak RSS MB "
            "| stat syscalls | scanned (per shard) | files/s |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in rows:
            counted = stats.get((c["name"], r["shards"]))
            stat_cell = "—" if counted is None else (
                f"{counted['calls']:,} ({counted['calls'] / c['files']:.2f}/file)")
            split = " / ".join(f"{x:,}" for x in r["scanned"])
            scanned = f"{sum(r['scanned']):,}" + (f" ({split})" if r["shards"] > 1 else "")
            spread = (f"{_secs(r['wall_min_s'])}–{_secs(r['wall_max_s'])}"
                      if r["rounds"] > 1 else "")
            lines.append(
                f"| {r['shards']} | {_secs(r['wall_s'])} | {spread} | {_secs(r['cpu_s'])} "
                f"| {_secs(r['cpu_per_shard_s'])} | {_fmt(r['peak_rss_mb'], 0)} "
                f"| {stat_cell} | {scanned} | {_rate(r['files_per_s'])} |")
    lines += render_projection(results)
    return "\n".join(lines) + "\n"


def _off(measured: float, predicted: float) -> str:
    return f"{(measured - predicted) / max(predicted, 1e-9) * 100:+.0f}%"


def render_projection(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    files = _count(PROJECTED_FILES)
    lines = [
        "",
        f"## What N pods would do on {files} files",
        "",
        "From the figures above, per corpus. A shard's cost is a part per file plus a part "
        "that every shard repeats whatever its share of the tree (interpreter start-up, its "
        "store session, its completion report and manifest copy, its read of the levels "
        "above the run depth, each entry of which every shard stats). N shards pay the first "
        "once and the second N times, so the **repeated part** is (CPU at the largest N − "
        "CPU at N=1) / (N − 1), likewise for stat calls, and the **per-file cost** is N=1's "
        "CPU less one repeated part, per file (N=1's total / files is given too). An N "
        "between the two tests this: its cost is predicted from them, then compared with "
        "what was measured. With P pods on separate nodes, each with a core of its own and "
        f"a store that keeps up: **wall ≈ ({files} / P) × per-file cost + the repeated "
        "part**, for shards of even size (a Job takes as long as its largest pod; the split "
        "is a hash of the run directories' names, even when they far outnumber the pods).",
    ]
    if not results["projections"]:
        lines += ["", "No projection: it needs N=1 and at least one N > 1 (`--shards 1 4`)."]
        return lines
    units = {c["name"]: c.get("units") for c in results["corpora"]}
    for p in results["projections"]:
        c = next(c for c in results["corpora"] if c["name"] == p["corpus"])
        top = p["from_shards"]
        noise = ("" if p["repeated_cpu_raw_s"] >= 0 else
                 f" (measured {p['repeated_cpu_raw_s']:.3f} s: within the noise, taken as 0)")
        stat_words = ""
        if "stats_ratio" in p:
            stat_words = (
                f" Stat calls: {p['repeated_stats']:,} per extra shard; "
                f"{p['marginal_stats_per_file']:.2f} per file beyond them "
                f"({p['stats_per_file']:.2f} per file at N=1 in all).")
        tests = []
        for check in p["checks"]:
            test = (f"N={check['shards']}: CPU {_secs(check['cpu_s'])} s measured, "
                    f"{_secs(check['predicted_cpu_s'])} s predicted "
                    f"({_off(check['cpu_s'], check['predicted_cpu_s'])})")
            if "stats" in check:
                test += (f", stat calls {check['stats']:,} against {check['predicted_stats']:,}"
                         f" ({_off(check['stats'], check['predicted_stats'])})")
            tests.append(test)
        pods = {row["pods"]: row for row in p["pods"]}
        example = pods.get(100) or p["pods"][-1]
        per_file = _ms(p["marginal_cpu_per_file_s"])
        lines += [
            "",
            f"### {p['corpus']} ({c['files']:,} files here, mean {_bytes(p['mean_bytes'])} "
            "a file)",
            "",
            f"- **Repeated part**: {p['repeated_cpu_s']:.3f} s of CPU per extra shard, from "
            f"N={top} against N=1{noise}; {p['repeated_share'] * 100:.0f}% of N=1's whole "
            f"run here.{stat_words}",
            f"- **Per-file cost**: {per_file} of client CPU per file ("
            f"{_ms(p['per_file_cpu_s'])} per file at N=1 with its repeated part; wall here "
            f"{_ms(p['per_file_wall_s'])} per file, with the server on the same cores).",
        ]
        if tests:
            lines.append(f"- **Test of the model**: {'; '.join(tests)}.")
        lines += [
            f"- **Projection**: {files} files shaped like `{p['corpus']}` "
            f"({_bytes(PROJECTED_FILES * p['mean_bytes'])}); at P = {example['pods']} pods "
            f"each takes {_count(example['files_per_pod'])} files: wall ≈ "
            f"{_count(example['files_per_pod'])} × {per_file} + {p['repeated_cpu_s']:.2f} s ≈ "
            f"**{_duration(example['wall_s'])}**, if its network and the store carry its "
            f"{_bytes(example['bytes_per_pod'])} in that time. Its manifest then holds "
            f"{_count(example['files_per_pod'])} rows, copied to the bucket at exit (and "
            "every 60 s by default: not measured here).",
            "",
            "| pods P | files per pod | bytes per pod | wall ≈ |",
            "|--:|--:|--:|--:|",
        ]
        for row in p["pods"]:
            lines.append(f"| {row['pods']:,} | {_count(row['files_per_pod'])} "
                         f"| {_bytes(row['bytes_per_pod'])} | {_duration(row['wall_s'])} |")
        if p["imbalance"] > 1.05:
            many = f"{units[p['corpus']]} " if units.get(p["corpus"]) else ""
            lines += ["", f"Here N={top}'s largest shard took {p['imbalance']:.2f}× an even "
                      f"share: {many}run directories hashed over {top} shards do not split "
                      "evenly. The shares even out as run directories outnumber pods, as the "
                      "projection assumes."]
    lines += [
        "",
        "### What this machine shows, and what it cannot",
        "",
        f"On this {m['nproc']}-core machine the N shards share the cores and the one store "
        "with each other and with the server, so wall here cannot fall with N the way it "
        "would on separate nodes ("
        + "; ".join(f"`{p['corpus']}`: N={p['from_shards']}'s wall is {p['wall_ratio']:.2f}× "
                    f"N=1's, not {1 / p['from_shards']:.2f}×" for p in results["projections"])
        + "): the projection's wall is derived, not measured. What the figures do show is "
        "what the partition costs:",
        "",
    ]
    for p in results["projections"]:
        top = p["from_shards"]
        stat_ratio = (f" and {p['stats_ratio']:.2f}× its stat calls" if "stats_ratio" in p
                      else "")
        # Constant in N, within what a shared machine can tell, when all N-1 extra shards'
        # repeated parts add less than 15% to N=1's run.
        verdict = (
            "total CPU and stat calls stay about constant in N: the partition costs nothing "
            "extra" if p["repeated_share"] * (top - 1) < 0.15 else
            "with this few files the fixed part is much of the total, but nothing per file "
            "is repeated, and against a real pod's share of files it is negligible")
        lines.append(
            f"- `{p['corpus']}`: N={top} took {p['cpu_ratio']:.2f}× N=1's CPU{stat_ratio}. "
            f"The excess is {top - 1} × the repeated part, a fixed cost per shard; the work "
            "per file is done once between the shards, whatever N: " + verdict + ".")
    return lines


# -- main -------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work_dir
    exe = asyncsync_binary()
    problem = strace_problem()
    if problem:
        print(f"shards.py: {problem}", file=sys.stderr)
    print(f"corpora (scale {args.scale:g}):", flush=True)
    sets: list[Corpus] = []
    for name in args.corpora:
        c = ensure(name, args.scale, work)
        print(f"  {c.name}: {c.files:,} files, {c.bytes / 1e6:,.1f} MB", flush=True)
        sets.append(c)
    shutil.rmtree(work / "shards-logs", ignore_errors=True)
    shutil.rmtree(work / "shards-state", ignore_errors=True)
    samples: list[ShardSample] = []
    counts: list[StatCount] = []
    # Its own server data dir, logs and state: run.py (work/seaweedfs, logs, state) may run
    # beside it from the same work dir.
    with seaweedfs(work / "shards-seaweedfs") as server:
        client = server.client(retries={"total_max_attempts": 5})
        client.create_bucket(Bucket=BUCKET)
        frozen: FrozenSource = freeze_source(work)
        env = child_env(server) | {"PYTHONPATH": str(frozen.root)}
        check_imports(env, frozen.root, "asyncsync")
        ctx = Context(server=server, client=client, env=env, exe=exe, work=work,
                      workers=args.workers)
        print(f"SeaweedFS at {server.endpoint}; asyncsync source {frozen.digest} frozen in "
              f"{frozen.root}", flush=True)
        machine = machine_info(frozen.digest, strace=first_line(["strace", "-V"]))
        for c in sets:
            print(f"{c.name}:", flush=True)
            prime(ctx, c)
            for rnd in range(args.rounds):
                for order, n in enumerate(rotated(args.shards, rnd)):
                    sample = timed_run(ctx, c, n, rnd, order)
                    samples.append(sample)
                    report(sample)
            if problem is None:
                for n in args.shards:
                    count = stat_pass(ctx, c, n)
                    counts.append(count)
                    print(f"  stat N={n:<3} {count.calls:,} stat-family syscalls "
                          f"({count.calls / c.files:.2f} per file; per shard "
                          f"{' + '.join(f'{x:,}' for x in count.per_shard)})", flush=True)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {
        "machine": machine,
        "config": {"rounds": args.rounds, "shards": args.shards, "workers": args.workers,
                   "scale": args.scale, "corpora": args.corpora, "quick": args.quick,
                   "run_depth": RUN_DEPTH},
        "corpora": [{"name": c.name, "files": c.files, "bytes": c.bytes,
                     "units": run_directories(c.path)} for c in sets],
        "stat_note": problem,
        "stat_counts": [asdict(s) for s in counts],
        "rounds": [asdict(s) for s in samples],
    }
    summarise(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark N concurrent `asyncsync push --shard I/N` on an embedded "
        "SeaweedFS: wall, total CPU, peak RSS and stat syscalls against N.")
    parser.add_argument("--corpora", nargs="+", default=list(DEFAULT_CORPORA), metavar="NAME",
                        help=f"which corpora (default: {' '.join(DEFAULT_CORPORA)})")
    parser.add_argument("--shards", nargs="+", type=int, default=list(DEFAULT_SHARDS),
                        metavar="N", help="shard counts to run (default: "
                        f"{' '.join(str(n) for n in DEFAULT_SHARDS)})")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds per corpus (default {DEFAULT_ROUNDS}; 1 with --quick)")
    parser.add_argument("--workers", type=int, default=32,
                        help="--workers of every shard (default 32)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: corpora scaled by {QUICK_SCALE}, one round, results "
                             "into work/quick-shards/ unless --out is given")
    parser.add_argument("--scale", type=float, default=None,
                        help="corpus scale (default 1; --quick sets it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for shards-results.json and SHARDS.md (default: "
                             "benchmarks/)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: redraw SHARDS.md from the shards-results.json in "
                             "--out")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="corpora, server data, state dirs and logs (default: "
                             "benchmarks/work/)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.corpora) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
    args.corpora = list(dict.fromkeys(args.corpora))
    args.shards = sorted(set(args.shards))
    if args.rounds is None:
        args.rounds = 1 if args.quick else DEFAULT_ROUNDS
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    if args.out is None:
        # A quick run never overwrites the committed SHARDS.md.
        args.out = args.work_dir / "quick-shards" if args.quick else HERE
    if args.rounds < 1 or args.workers < 1 or args.scale <= 0 or min(args.shards) < 1:
        parser.error("--rounds, --workers, --scale and --shards must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    results_path = out / "shards-results.json"
    if args.render_only:
        results = json.loads(results_path.read_text())
        summarise(results)
    else:
        try:
            results = run_benchmark(args)
        except (FileNotFoundError, BenchFailure) as exc:
            print(f"shards.py: {exc}", file=sys.stderr)
            return 1
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "SHARDS.md").write_text(render(results))
    print(f"wrote {results_path}, {out / 'SHARDS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
