"""Dedup in a real YOLOv8n training (pipeline/dedup.py): Ultralytics writes one serialized
checkpoint to last.pt and, on every improvement, the same bytes to best.pt. Under attach()
and under `asyncsync run`, the bytes that cross a real proxy in front of the store show each
such checkpoint sent once: best.pt is copied server-side from last.pt (or the other way
round), and every object still equals its file byte for byte."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import ASYNCSYNC, S3Server, bucket_keys
from ..faultproxy import FaultProxy, ProxyStats
from .test_ultralytics import (
    RUN_OPTIONS,
    assert_in_bucket,
    dataset,  # noqa: F401 - the module's dataset fixture
    train_command,
    training_env,
)

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.servers("seaweedfs")]
CHECKPOINTS = ("weights/last.pt", "weights/best.pt")


def checkpoint_traffic(stats: ProxyStats, prefix: str) -> tuple[list[str], list[str], int]:
    """What the proxy saw go to the checkpoints' keys: the content digests (the xxh128
    metadata every object carries) of the bodies sent and of the server-side copies made, in
    order, and the body bytes sent for them."""
    sent: list[str] = []
    copied: list[str] = []
    nbytes = 0
    keys = tuple(f"/{prefix}/{name}" for name in CHECKPOINTS)
    for request in stats.seen:
        path, _, query = request.target.partition("?")
        if not path.endswith(keys):
            continue
        digest = request.headers.get("x-amz-meta-xxh128", "")
        length = int(request.headers.get("content-length", "0"))
        if request.method == "POST" and "uploads" in query.split("&"):
            sent.append(digest)  # a multipart upload: its parts carry the bytes
        elif request.method != "PUT":
            continue
        elif "x-amz-copy-source" in request.headers:
            copied.append(digest)
        elif "partNumber=" in query:
            nbytes += length
        elif length:
            sent.append(digest)
            nbytes += length
    return sent, copied, nbytes


def check_sent_once(stats: ProxyStats, prefix: str) -> None:
    sent, copied, nbytes = checkpoint_traffic(stats, prefix)
    # The first epoch is always the best so far: best.pt got last.pt's bytes at least once,
    # and one of the two was copied rather than sent.
    assert copied, sent
    # No checkpoint content crossed the wire twice; each copy is of content sent before.
    assert len(sent) == len(set(sent)), sent
    assert set(copied) <= set(sent), (copied, sent)
    assert nbytes <= stats.body_bytes_upstream


def test_attach_sends_a_checkpoint_that_best_and_last_share_once(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path,  # noqa: F811
) -> None:
    project = tmp_path / "runs"
    with FaultProxy(s3_server.endpoint) as proxy:
        env = training_env(s3_server, tmp_path) | {"AWS_ENDPOINT_URL": proxy.endpoint}
        done = subprocess.run(
            train_command(dataset, project, "--attach", f"s3://{bucket}/yolo",
                          "--state-dir", str(tmp_path / "state"), "--epochs", "3"),
            env=env, capture_output=True, text=True, timeout=300,
        )
        stats = proxy.stats
    assert done.returncode == 0, done.stderr[-3000:]
    run = project / "exp"
    check_sent_once(stats, "yolo/exp")
    assert_in_bucket(s3_server, bucket, "yolo/exp", run)


def test_run_sends_a_checkpoint_that_best_and_last_share_once(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path,  # noqa: F811
) -> None:
    """Under `run` a checkpoint goes up once it settles: the trainer is held after the first
    epoch (whose last.pt and best.pt hold the same bytes) until both are in the bucket."""
    runs, hold = tmp_path / "runs", tmp_path / "hold"
    hold.mkdir()
    client = s3_server.client()
    with FaultProxy(s3_server.endpoint) as proxy:
        env = training_env(s3_server, tmp_path) | {"AWS_ENDPOINT_URL": proxy.endpoint}
        command = [ASYNCSYNC, "run", str(runs), f"s3://{bucket}/wrapped", "--state-dir",
                   str(tmp_path / "state"), *RUN_OPTIONS, "--",
                   *train_command(dataset, runs, "--hold", str(hold))]
        training = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 180
            wanted = {f"wrapped/exp/{name}" for name in CHECKPOINTS}
            while not wanted <= set(bucket_keys(client, bucket, "wrapped/exp/weights/")):
                assert training.poll() is None, training.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "epoch 1's checkpoints never arrived"
                time.sleep(0.1)
            assert (hold / "holding").exists()  # still epoch 1
        finally:
            (hold / "release").touch()
            _, stderr = training.communicate(timeout=240)
        stats = proxy.stats
    assert training.returncode == 0, stderr[-3000:]
    check_sent_once(stats, "wrapped/exp")
    assert_in_bucket(s3_server, bucket, "wrapped", runs)
