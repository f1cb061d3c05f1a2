"""service.daemon: the one signal policy (real processes, real signals), the lifecycle around
a service, and the state snapshot that /readyz and the metrics read. No S3 server needed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncsync.config import PushConfig, WatchConfig, parse_destination
from asyncsync.pipeline.events import Failure, FileOutcome, Status
from asyncsync.service.daemon import ABOVE_RUNS, Daemon, RunStatus, run_depth_of, run_of

# -- signals, through real processes ----------------------------------------------------------

# A daemon whose work is nothing, and whose shutdown takes as long as argv[1] says: the first
# signal must start that shutdown (with a flush), a second must cut it short.
DAEMON = r"""
import asyncio, sys
from pathlib import Path
from asyncsync.config import PushConfig, WatchConfig, parse_destination
from asyncsync.cli import configure_logging
from asyncsync.service.daemon import Daemon

class Service:
    async def start(self):
        print("started", flush=True)

    async def tick(self, now):
        return now + 60

    async def shutdown(self, *, flush):
        print(f"shutdown flush={flush}", flush=True)
        await asyncio.sleep(float(sys.argv[1]))

async def main():
    config = WatchConfig(push=PushConfig(source=Path("."), state_dir=Path("state"),
                                         destination=parse_destination("s3://bucket/p")))
    daemon = Daemon(config)
    async with daemon.running():
        await daemon.serve(Service())
    print("drained", flush=True)

configure_logging(0, False)
asyncio.run(main())
"""

# run's policy: a training in its own process group (with a grandchild in that group, as a
# dataloader worker would be) that ignores SIGINT but notes that it came.
TRAINING = r"""
import os, signal, subprocess, sys, time
marker = sys.argv[1]
signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the worker, through exec
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
signal.signal(signal.SIGINT, lambda *_: open(marker + ".sigint", "w").close())
with open(marker + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {worker.pid}")
os.rename(marker + ".tmp", marker)
while True:
    time.sleep(0.1)
"""

SUPERVISOR = r"""
import asyncio, sys
from asyncsync.cli import configure_logging
from asyncsync.service.signals import Signals

async def main():
    signals = Signals(lambda signum: print("drained", flush=True))
    signals.install(asyncio.get_running_loop())
    with signals.spawning():
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", sys.argv[1],
                                                     sys.argv[2], start_new_session=True)
        signals.started(child.pid)
    print("returncode", await child.wait(), flush=True)

configure_logging(0, False)
asyncio.run(main())
"""

# Two signals while the child is being spawned: neither may exit before its pid is known
# (the child would be left behind); once it is, the second one kills it and exits.
SPAWNING = r"""
import asyncio, os, signal, sys
from asyncsync.cli import configure_logging
from asyncsync.service.signals import Signals

async def main():
    signals = Signals(lambda signum: print("drained", flush=True))
    signals.install(asyncio.get_running_loop())
    with signals.spawning():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.3)  # both handled while the pid is unknown
        print("alive", len(signals.received), flush=True)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(120)", start_new_session=True)
        print("child", child.pid, flush=True)
        signals.started(child.pid)
    print("not reached", flush=True)

configure_logging(0, False)
asyncio.run(main())
"""

# push's policy (cli._run_with_signals): the first signal cancels main, a second exits.
PUSH = r"""
import asyncio, sys
from asyncsync.cli import _run_with_signals, configure_logging

async def main():
    try:
        print("started", flush=True)
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        print("cancelled", flush=True)
        await asyncio.sleep(float(sys.argv[1]))  # cleanup that may take long
        raise

configure_logging(0, False)
print("returned", _run_with_signals(main), flush=True)
"""


class Child:
    """A Python script as a child process, its stdout read line by line."""

    def __init__(self, tmp_path: Path, script: str, *args: str) -> None:
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", script, *args], cwd=tmp_path, stdout=subprocess.PIPE,
                stderr=stderr, text=True,
            )
        self.lines: list[str] = []

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def expect(self, prefix: str) -> str:
        """Read stdout up to the first line starting with ``prefix``; return that line."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return line.rstrip("\n")
        raise AssertionError(f"no {prefix!r} in {self.lines}; stderr: {self.stderr}")

    def wait(self, timeout: float = 10) -> int:
        """The exit code; stdout is read to its end (the pipe closes when the process ends)."""
        assert self.process.stdout is not None
        with self.process.stdout:
            self.lines += self.process.stdout.read().splitlines()
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting to be reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.split()[1:2] == ["Z"] for line in status.splitlines()
               if line.startswith("State:"))


def wait_until(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_watch_first_signal_drains_and_exits_0(
    tmp_path: Path, children: list[Child], signum: int
) -> None:
    child = Child(tmp_path, DAEMON, "0.2")
    children.append(child)
    child.expect("started")
    child.process.send_signal(signum)
    assert child.expect("shutdown") == "shutdown flush=True"
    assert child.wait() == 0, child.stderr
    assert "drained" in child.lines
    assert f"{signal.Signals(signum).name} received: stopping (again to force)" in child.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_watch_second_signal_exits_at_once_with_128_plus_n(
    tmp_path: Path, children: list[Child], signum: int
) -> None:
    child = Child(tmp_path, DAEMON, "60")
    children.append(child)
    child.expect("started")
    child.process.send_signal(signum)
    child.expect("shutdown flush=True")
    started = time.monotonic()
    child.process.send_signal(signum)
    assert child.wait() == 128 + signum, child.stderr
    assert time.monotonic() - started < 5
    assert "drained" not in child.lines
    assert "received again: exiting now" in child.stderr


def test_run_first_signal_goes_to_the_training_second_kills_its_group(
    tmp_path: Path, children: list[Child]
) -> None:
    marker = tmp_path / "training"
    child = Child(tmp_path, SUPERVISOR, TRAINING, str(marker))
    children.append(child)
    wait_until(marker.exists)
    training, worker = map(int, marker.read_text().split())
    try:
        child.process.send_signal(signal.SIGINT)
        wait_until(Path(f"{marker}.sigint").exists)  # passed on to the training's group
        time.sleep(0.3)
        assert child.process.poll() is None and not gone(training) and not gone(worker)
        assert "drained" not in child.lines
        started = time.monotonic()
        child.process.send_signal(signal.SIGINT)
        assert child.wait() == 128 + signal.SIGINT, child.stderr
        assert time.monotonic() - started < 5
        wait_until(lambda: gone(training) and gone(worker))  # the whole group, SIGKILLed
    finally:
        for pid in (training, worker):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert "passing it to the training (again to kill it)" in child.stderr
    assert "killing the training and exiting" in child.stderr


def test_signals_while_spawning_wait_for_the_pid_then_kill_and_exit(
    tmp_path: Path, children: list[Child]
) -> None:
    child = Child(tmp_path, SPAWNING)
    children.append(child)
    assert child.expect("alive") == "alive 2"
    pid = int(child.expect("child").split()[1])
    try:
        assert child.wait() == 128 + signal.SIGINT, child.stderr
        assert "not reached" not in child.lines and "drained" not in child.lines
        wait_until(lambda: gone(pid))
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_push_first_signal_cancels(tmp_path: Path, children: list[Child]) -> None:
    child = Child(tmp_path, PUSH, "0")
    children.append(child)
    child.expect("started")
    child.process.send_signal(signal.SIGTERM)
    child.expect("cancelled")
    assert child.expect("returned") == f"returned {int(signal.SIGTERM)}"
    assert child.wait() == 0, child.stderr


def test_push_second_signal_exits_at_once(tmp_path: Path, children: list[Child]) -> None:
    child = Child(tmp_path, PUSH, "60")
    children.append(child)
    child.expect("started")
    child.process.send_signal(signal.SIGINT)
    child.expect("cancelled")
    child.process.send_signal(signal.SIGINT)
    assert child.wait() == 128 + signal.SIGINT, child.stderr
    assert not any(line.startswith("returned") for line in child.lines)


# -- lifecycle, in-process ------------------------------------------------------------------


def watch_config(tmp_path: Path, **changes: object) -> WatchConfig:
    push = PushConfig(source=tmp_path, destination=parse_destination("s3://bucket/p"),
                      state_dir=tmp_path / "state")
    return dataclasses.replace(WatchConfig(push=push), **changes)  # type: ignore[arg-type]


class Recorder:
    """A service that records what the daemon asks of it."""

    def __init__(self, daemon: Daemon, *, stop_after: int = 3,
                 fatal: BaseException | None = None, raises: BaseException | None = None):
        self.daemon, self.stop_after, self.fatal, self.raises = daemon, stop_after, fatal, raises
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def tick(self, now: float) -> float:
        self.calls.append("tick")
        if self.calls.count("tick") == self.stop_after:
            if self.raises is not None:
                raise self.raises
            if self.fatal is not None:
                self.daemon.fail(self.fatal)
            else:
                self.daemon.request_stop()
        self.daemon.wake()  # tick again at once, not in an hour
        return now + 3600

    async def shutdown(self, *, flush: bool) -> None:
        self.calls.append(f"shutdown flush={flush}")


def test_serve_ticks_until_stopped_then_flushes(tmp_path: Path) -> None:
    daemon = Daemon(watch_config(tmp_path))
    service = Recorder(daemon)
    asyncio.run(daemon.serve(service))
    assert service.calls == ["start", "tick", "tick", "tick", "shutdown flush=True"]


def test_a_fatal_failure_skips_the_flush_and_is_raised(tmp_path: Path) -> None:
    daemon = Daemon(watch_config(tmp_path))
    service = Recorder(daemon, stop_after=2, fatal=RuntimeError("manifest gone"))
    with pytest.raises(RuntimeError, match="manifest gone"):
        asyncio.run(daemon.serve(service))
    assert service.calls == ["start", "tick", "tick", "shutdown flush=False"]


def test_an_exception_in_a_tick_shuts_down_without_a_flush(tmp_path: Path) -> None:
    daemon = Daemon(watch_config(tmp_path))
    service = Recorder(daemon, stop_after=1, raises=ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        asyncio.run(daemon.serve(service))
    assert service.calls == ["start", "tick", "shutdown flush=False"]


# -- the snapshot ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "depth", "run"),
    [
        ("exp/weights/last.pt", 1, "exp"),
        ("exp/results.csv", 1, "exp"),
        ("notes.txt", 1, ABOVE_RUNS),
        ("detect/train2/weights/last.pt", 2, "detect/train2"),
        ("detect/train2/results.csv", 2, "detect/train2"),
        ("detect/notes.txt", 2, ABOVE_RUNS),  # above the runs: no run of its own
        ("notes.txt", 2, ABOVE_RUNS),
        ("a/b/c/d.txt", 3, "a/b/c"),
    ],
)
def test_run_of_follows_the_run_depth(relative: str, depth: int, run: str) -> None:
    assert run_of(relative, depth) == run


def test_run_depth_is_the_daemons_own_setting(tmp_path: Path) -> None:
    assert run_depth_of(watch_config(tmp_path)) == 1
    assert run_depth_of(watch_config(tmp_path, run_depth=2)) == 2


def metric_samples(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = daemon.metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_snapshot_per_run_pending_last_sync_and_failures(tmp_path: Path) -> None:
    daemon = Daemon(watch_config(tmp_path, run_depth=2))
    for relative in ("detect/train2/weights/last.pt", "detect/train2/results.csv",
                     "detect/train/args.yaml", "detect/notes.txt", "README.md"):
        daemon.pending(relative, 1, 1000)
    before = time.time()
    daemon.outcome(FileOutcome("detect/train2/results.csv", "k", Status.UPLOADED, "new", 100))
    daemon.pending("detect/train2/results.csv", -1, 1000)
    last = "detect/train2/weights/last.pt"
    daemon.outcome(FileOutcome(last, "k", Status.FAILED, "new", 9, failure=Failure.READ))
    daemon.outcome(FileOutcome(last, "k", Status.FAILED, "new", 9, failure=Failure.STORE,
                               cause="throttled"))
    daemon.in_flight(1, 1000)

    snapshot = daemon.snapshot()
    assert set(snapshot.runs) == {"detect/train2", "detect/train", ABOVE_RUNS}
    train2 = snapshot.runs["detect/train2"]
    assert (train2.pending, train2.failures) == (1, 2)
    assert train2.last_sync is not None and before <= train2.last_sync <= time.time()
    assert snapshot.runs["detect/train"] == RunStatus(pending=1, pending_bytes=1000)
    assert snapshot.runs[ABOVE_RUNS] == RunStatus(pending=2, pending_bytes=2000)
    assert (snapshot.pending, snapshot.in_flight) == (4, 1)

    # Read-only, and a snapshot: later reports do not move it.
    with pytest.raises(TypeError):
        snapshot.runs["x"] = RunStatus()  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        train2.pending = 0  # type: ignore[misc]
    daemon.pending("detect/train/args.yaml", -1, 1000)
    assert snapshot.runs["detect/train"].pending == 1
    # A run with nothing left to say leaves the map.
    assert "detect/train" not in daemon.snapshot().runs

    # The metrics' gauges are what the snapshot says.
    published = daemon.publish()
    samples = metric_samples(daemon)
    assert samples[("asyncsync_queue_depth", frozenset())] == published.pending == 3
    assert samples[("asyncsync_uploads_in_flight", frozenset())] == 1
    syncs = {dict(labels)["run"]: value for (name, labels), value in samples.items()
             if name == "asyncsync_last_successful_sync_timestamp_seconds"}
    assert syncs == {"detect/train2": train2.last_sync}
    assert samples[("asyncsync_upload_failures_total", frozenset({("reason", "read")}))] == 1
    assert samples[("asyncsync_upload_failures_total",
                    frozenset({("reason", "throttled")}))] == 1
    assert samples[("asyncsync_files_uploaded_total", frozenset({("outcome", "new")}))] == 1
    assert samples[("asyncsync_bytes_in_flight", frozenset())] == 1000
    pending = {dict(labels)["run"]: value for (name, labels), value in samples.items()
               if name == "asyncsync_run_bytes_pending"}
    assert pending == {"detect/train2": 1000}  # the runs in sync say 0 once they were seen


def test_readiness_is_read_from_the_snapshot(tmp_path: Path) -> None:
    daemon = Daemon(watch_config(tmp_path))
    assert daemon.readiness() == (False, "manifest not open")
    daemon.manifest_open(True)
    assert daemon.readiness() == (True, "ready")  # the store not asked yet: not a failure
    daemon.store_reachable(False, "no answer from 127.0.0.1:9 within 10 s")
    assert daemon.readiness() == (False, "store unreachable: no answer from 127.0.0.1:9 "
                                         "within 10 s")
    assert daemon.snapshot().store_up is False
    daemon.store_reachable(True)
    assert daemon.readiness() == (True, "ready")
    daemon.publish()
    assert metric_samples(daemon)[("asyncsync_store_up", frozenset())] == 1


def test_the_queue_reports_pending_syncs_and_history_per_run(tmp_path: Path) -> None:
    """The SyncQueue's reports, through a real pipeline into a file:// store: the snapshot
    counts pending files by run as they are found and sent, and a results.csv that shrank
    has its previous object kept first (the planning stage's history rule)."""
    from asyncsync.commands.watch import open_pipeline
    from asyncsync.pipeline.syncqueue import SyncQueue

    src, bucket = tmp_path / "runs", tmp_path / "bucket"
    files = {"detect/train2/results.csv": b"epoch\n1\n2\n", "detect/train2/weights/last.pt": b"w",
             "detect/train/args.yaml": b"epochs: 3\n", "notes.txt": b"above the runs\n"}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    bucket.mkdir()
    push = PushConfig(source=src, destination=parse_destination(f"file://{bucket}"),
                      state_dir=tmp_path / "state")
    config = WatchConfig(push=push, settle=0.0, checkpoint_interval=0.0, run_depth=2)

    async def send_everything(queue: SyncQueue) -> None:
        await queue.scan()
        queue.start_due(time.time() + 1)
        while queue.uploading:
            await asyncio.sleep(0.01)

    async def main() -> None:
        daemon = Daemon(config)
        async with open_pipeline(config, daemon) as pipeline:
            assert daemon.readiness() == (True, "ready")
            queue = SyncQueue(config, pipeline, daemon)
            await queue.scan()
            pending = {run: status.pending for run, status in daemon.snapshot().runs.items()}
            assert pending == {"detect/train2": 2, "detect/train": 1, ABOVE_RUNS: 1}
            await send_everything(queue)
            snapshot = daemon.snapshot()
            assert snapshot.pending == 0 == len(queue)
            assert set(snapshot.runs) == {"detect/train2", "detect/train", ABOVE_RUNS}
            assert all(s.last_sync is not None and s.failures == 0
                       for s in snapshot.runs.values())

            (src / "detect/train2/results.csv").write_bytes(b"epoch\n1\n")  # a restarted run
            await queue.scan()
            assert daemon.snapshot().runs["detect/train2"].pending == 1
            await send_everything(queue)
            assert daemon.snapshot().pending == 0
        assert daemon.readiness() == (False, "manifest not open")

    asyncio.run(main())
    history = sorted((bucket / "_asyncsync/history/detect/train2/results.csv").iterdir())
    assert [path.read_bytes() for path in history] == [b"epoch\n1\n2\n"]
    assert (bucket / "detect/train2/results.csv").read_bytes() == b"epoch\n1\n"


def test_an_uploaded_file_costs_the_queue_one_manifest_lookup(tmp_path: Path) -> None:
    """watch read each uploaded file's manifest row again after its upload, to learn the
    identity the uploader had read (three lookups per file): the outcome carries it now."""
    from asyncsync.commands.watch import open_pipeline
    from asyncsync.pipeline.syncqueue import SyncQueue

    src, bucket = tmp_path / "runs", tmp_path / "bucket"
    for n in range(5):
        (src / "exp").mkdir(parents=True, exist_ok=True)
        (src / "exp" / f"f{n}.txt").write_bytes(b"%d" % n)
    bucket.mkdir()
    push = PushConfig(source=src, destination=parse_destination(f"file://{bucket}"),
                      state_dir=tmp_path / "state")
    config = WatchConfig(push=push, settle=0.0, checkpoint_interval=0.0)

    async def main() -> int:
        daemon = Daemon(config)
        async with open_pipeline(config, daemon) as pipeline:
            queue = SyncQueue(config, pipeline, daemon)
            await queue.scan()
            calls = 0
            real_lookup = pipeline.manifest.lookup

            def counting_lookup(*args: Any) -> Any:
                nonlocal calls
                calls += 1
                return real_lookup(*args)

            pipeline.manifest.lookup = counting_lookup  # type: ignore[method-assign]
            queue.start_due(time.time() + 1)
            while queue.uploading:
                await asyncio.sleep(0.01)
            assert daemon.snapshot().pending == 0
            return calls

    assert asyncio.run(main()) <= 5
    assert sorted(p.name for p in (bucket / "exp").iterdir()) == [f"f{n}.txt" for n in range(5)]
