"""`asyncsync run DIR DEST -- COMMAND`: a training under the watch daemon, however it ends.

The training here is a small script shaped like ultralytics' writes (args.yaml at start,
results.csv appended and weights/last.pt rewritten in place each epoch); the real YOLO
training is exercised by the Ultralytics integration's own tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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

FAST = ["--settle", "0.3", "--interval", "0.2", "--checkpoint-interval", "0"]


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


def test_run_needs_a_command_and_a_runnable_one(tmp_path: Path, s3_server: S3Server) -> None:
    missing = run_cli("run", tmp_path / "runs", "s3://bucket-a/x", env=s3_server.env())
    assert missing.returncode == 2 and "no command to run" in missing.stderr
    wrong = run_cli("run", tmp_path / "runs", "s3://bucket-a/x", "--state-dir",
                    tmp_path / "s", "--", str(tmp_path / "no-such-program"),
                    env=s3_server.env())
    assert wrong.returncode == 1 and "cannot start" in wrong.stderr
