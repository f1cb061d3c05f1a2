"""`asyncsync run DIR DEST -- COMMAND`: a training under the watch daemon, however it ends.

The training here is a small script shaped like ultralytics' writes (args.yaml at start,
results.csv appended and weights/last.pt rewritten in place each epoch); the real YOLO
training is exercised by the Ultralytics integration's own tests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .conftest import ASYNCSYNC, S3Server, bucket_keys, read_object, run_cli

pytestmark = pytest.mark.s3

TRAIN = r"""
import os, signal, sys, time
out, epochs, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
run = os.path.join(out, "exp")
os.makedirs(os.path.join(run, "weights"), exist_ok=True)
with open(os.path.join(run, "args.yaml"), "w") as f:
    f.write(f"epochs: {epochs}\n")
with open(os.path.join(run, "results.csv"), "w") as f:
    f.write("epoch,train/box_loss,metrics/mAP50(B)\n")
for epoch in range(1, epochs + 1):
    time.sleep(0.4)
    with open(os.path.join(run, "weights", "last.pt"), "wb") as f:  # in place
        f.write(os.urandom(400_000))
    with open(os.path.join(run, "results.csv"), "a") as f:
        f.write(f"{epoch},{1 / epoch:.4f},{epoch / 10:.2f}\n")
    if epoch == 2 and crash == "exit":
        os._exit(3)
    if epoch == 2 and crash == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if crash == "wait":
        time.sleep(600)
"""

FAST = ["--settle", "0.3", "--interval", "0.5", "--checkpoint-interval", "0"]


def train(tmp_path: Path, epochs: int, crash: str = "none") -> list[str]:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    return [sys.executable, str(script), str(tmp_path / "runs"), str(epochs), crash]


def assert_mirrored(server: S3Server, bucket: str, prefix: str, runs: Path) -> None:
    client = server.client()
    local = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*") if p.is_file())
    assert local, "the training wrote nothing"
    for name in local:
        assert read_object(client, bucket, f"{prefix}/{name}") == (runs / name).read_bytes()


def record(server: S3Server, bucket: str, prefix: str) -> dict[str, object]:
    body = read_object(server.client(), bucket, f"{prefix}/_asyncsync/run.json")
    return dict(json.loads(body))


@pytest.mark.parametrize(("crash", "code"), [("none", 0), ("exit", 3), ("kill", 128 + 9)])
def test_run_mirrors_the_training_however_it_ends(
    s3_server: S3Server, bucket: str, tmp_path: Path, crash: str, code: int
) -> None:
    result = run_cli("run", tmp_path / "runs", f"s3://{bucket}/t", "--state-dir",
                     tmp_path / "state", *FAST, "--", *train(tmp_path, 3, crash),
                     env=s3_server.env(), timeout=120)
    assert result.returncode == code, result.stderr
    assert_mirrored(s3_server, bucket, "t", tmp_path / "runs")
    run = record(s3_server, bucket, "t")
    assert run["status"] == ("finished" if code == 0 else "crashed")
    assert run["exit_code"] == code
    progress = run["runs"]
    assert isinstance(progress, list) and progress[0]["path"] == "exp"
    assert progress[0]["epochs"] == (3 if code == 0 else 2)
    assert progress[0]["metrics"]["metrics/mAP50(B)"] == ("0.30" if code == 0 else "0.20")
    assert "train.py" not in json.dumps(run)  # the program's name only, never its arguments


def test_sigterm_is_passed_to_the_training_and_everything_is_flushed(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        [ASYNCSYNC, "run", str(tmp_path / "runs"), f"s3://{bucket}/s", "--state-dir",
         str(tmp_path / "state"), *FAST, "--", *train(tmp_path, 1, "wait")],
        env=s3_server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    client = s3_server.client()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "s/exp/weights/last.pt" not in bucket_keys(
        client, bucket
    ):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "passing it to the training" in stderr
    assert_mirrored(s3_server, bucket, "s", tmp_path / "runs")
    assert record(s3_server, bucket, "s")["status"] == "crashed"


def test_run_needs_a_command_and_a_runnable_one(
    tmp_path: Path, s3_server: S3Server, bucket: str
) -> None:
    missing = run_cli("run", tmp_path / "runs", "s3://bucket-a/x", env=s3_server.env())
    assert missing.returncode == 2 and "no command to run" in missing.stderr
    # The wrapper convention (env, timeout, the shells): 127 not found, 126 not executable.
    not_executable = tmp_path / "train.sh"
    not_executable.write_text("#!/bin/sh\necho hi\n")
    for program, code, why in (
        (tmp_path / "no-such-program", 127, "No such file or directory"),
        (not_executable, 126, "Permission denied"),
        (tmp_path, 126, "Permission denied"),  # a directory
    ):
        wrong = run_cli("run", tmp_path / "runs", f"s3://{bucket}/x", "--state-dir",
                        tmp_path / "s", "--", str(program), env=s3_server.env())
        assert wrong.returncode == code, wrong.stderr
        assert error_lines(wrong.stderr) == [
            f"asyncsync: error: cannot start {str(program)!r}: {why}"], wrong.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def touch(marker: Path) -> list[str]:
    return ["sh", "-c", f"touch '{marker}'"]


def test_a_missing_bucket_stops_run_before_the_training_starts(
    s3_server: S3Server, tmp_path: Path
) -> None:
    marker = tmp_path / "trained"
    missing = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    result = run_cli("run", tmp_path / "runs", f"s3://{missing}/x", "--state-dir",
                     tmp_path / "s", "--", *touch(marker), env=s3_server.env(), timeout=60)
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    assert result.stderr.strip().splitlines() == error_lines(result.stderr), result.stderr
    (line,) = error_lines(result.stderr)
    assert f"s3://{missing}" in line and "does not exist" in line and "not started" in line


@pytest.mark.servers("seaweedfs")  # moto takes any keys; s3rver does not check the secret
def test_wrong_credentials_stop_run_before_the_training_starts(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    marker = tmp_path / "trained"
    secret = "wrong-secret-value-789"
    result = run_cli("run", tmp_path / "runs", f"s3://{bucket}/x", "--state-dir",
                     tmp_path / "s", "--", *touch(marker),
                     env=s3_server.env(AWS_SECRET_ACCESS_KEY=secret), timeout=60)
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    (line,) = error_lines(result.stderr)
    assert "secret key does not match" in line and "not started" in line
    assert secret not in result.stderr
    assert bucket_keys(s3_server.client(), bucket) == []


def test_an_unreachable_store_does_not_hold_the_training_back(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    marker = tmp_path / "trained"
    # The training writes nothing under DIR, so nothing is left unsent: its exit code stands.
    result = run_cli("run", tmp_path / "runs", "s3://bucket-a/x", "--state-dir", tmp_path / "s",
                     "--retries", "2", "--", *touch(marker), env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    assert "starting the training anyway" in result.stderr


def _gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for init to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.split()[1:2] == ["Z"] for line in status.splitlines()
               if line.startswith("State:"))


# A data-loader worker of the training: in its process group, deaf to SIGINT and SIGTERM.
_WORKER = ("import os, signal, sys, time\n"
           "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
           "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
           "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
           "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
           "time.sleep(120)\n")


def test_a_second_sigint_kills_the_training_and_leaves_nothing_behind(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A training that ignores SIGINT, and a worker it started that ignores it too: the
    second SIGINT stops both (the training's whole process group), not only the training."""
    pid_file = tmp_path / "pid"
    # The training starts its worker, then writes both pids: "TRAINING WORKER".
    stubborn = ("import os, signal, subprocess, sys, time\n"
                "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "worker_file = sys.argv[1] + '.worker'\n"
                "subprocess.Popen([sys.executable, '-c', sys.argv[2], worker_file])\n"
                "while not os.path.exists(worker_file): time.sleep(0.02)\n"
                "pids = f'{os.getpid()} {open(worker_file).read()}'\n"
                "open(sys.argv[1] + '.tmp', 'w').write(pids)\n"
                "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
                "time.sleep(120)\n")
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [ASYNCSYNC, "run", str(tmp_path / "runs"), f"s3://{bucket}/k", "--state-dir",
             str(tmp_path / "state"), *FAST, "--", sys.executable, "-c", stubborn,
             str(pid_file), _WORKER],
            env=s3_server.env(), stdout=subprocess.DEVNULL, stderr=stderr,
        )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(pid) for pid in pid_file.read_text().split()]
        child, worker = pids
        assert os.getpgid(worker) == os.getpgid(child) != os.getpgid(0)
        process.send_signal(signal.SIGINT)
        while "passing it to the training" not in stderr_path.read_text():
            assert time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.05)
        time.sleep(0.3)
        # The first one was ignored, by both.
        assert process.poll() is None and not _gone(child) and not _gone(worker)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 128 + signal.SIGINT, stderr_path.read_text()
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 10
        while left := [pid for pid in pids if not _gone(pid)]:
            assert time.monotonic() < deadline, f"processes {left} of the training still run"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_run_opens_the_store_once_for_its_checks_record_and_uploads(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One store session serves the destination check, run.json and the daemon's uploads:
    `run` once opened a second one only to write run.json. Counted in-process, where every
    opening of the store passes through StoreSession."""
    from asyncsync import cli
    from asyncsync.stores import session as store_session

    sessions: list[object] = []
    openings: list[object] = []
    real_init = store_session.StoreSession.__init__

    def counting_init(self: object, opener: object, *args: object, **kwargs: object) -> None:
        sessions.append(self)

        def counted() -> object:
            openings.append(self)
            return opener()  # type: ignore[operator]

        real_init(self, counted, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_session.StoreSession, "__init__", counting_init)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    import logging

    # cli.main configures the "asyncsync" logger for a terminal; the tests after this one
    # read it through caplog.
    logger = logging.getLogger("asyncsync")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        code = cli.main(["run", str(tmp_path / "runs"), f"s3://{bucket}/one", "--state-dir",
                         str(tmp_path / "state"), *FAST, "--", *train(tmp_path, 2)])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    assert code == 0
    assert_mirrored(s3_server, bucket, "one", tmp_path / "runs")
    assert record(s3_server, bucket, "one")["status"] == "finished"
    assert len(sessions) == 1 and len(openings) == 1
