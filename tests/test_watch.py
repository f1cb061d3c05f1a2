"""`asyncsync watch` end to end: real processes, real signals, real SeaweedFS.

Each test runs the installed command as a daemon against a directory that a "training"
(this test, or a writer process) keeps changing, and checks what is in the bucket.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from .conftest import (
    ASYNCSYNC,
    S3Server,
    bucket_keys,
    open_uploads,
    read_object,
    read_terminal,
    recorded_parts,
    wait_for,
)

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
FAST = ["--interval", "0.5", "--settle", "0.5", "--checkpoint-interval", "0"]



class Daemon:
    """`asyncsync watch` as a child process, with its log in a file."""

    def __init__(self, server: S3Server, src: Path, dest: str, state: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = state.parent / f"watch-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [ASYNCSYNC, "watch", str(src), dest, "--state-dir", str(state), *extra],
            env=env or server.env(), stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def wait_started(self, timeout: float = 30) -> None:
        """Until the daemon watches (its signal handlers are in place by then): a loaded
        machine can take seconds to start Python."""
        wait_for(lambda: "asyncsync: info: watching " in self.log, timeout, "watch to start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill()


def object_or_none(client: Any, bucket: str, key: str) -> bytes | None:
    try:
        return read_object(client, bucket, key)
    except client.exceptions.NoSuchKey:
        return None


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def is_complete(body: bytes) -> bool:
    return len(body) > 16 and xxhash.xxh3_128_digest(body[:-16]) == body[-16:]


WRITER = r"""
import os, sys, time
import xxhash
path, versions, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for version in range(1, versions + 1):
    payload = version.to_bytes(4, "little") + os.urandom(size - 20)
    body = payload + xxhash.xxh3_128_digest(payload)
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(0)  # in place, like torch.save over last.pt: no temp file, no rename
        for start in range(0, size, 1 << 20):
            f.write(body[start:start + (1 << 20)])
            f.flush()
            time.sleep(0.03)
    time.sleep(1.2 if version % 2 else 0.2)  # some versions settle, some do not
print("done", flush=True)
"""


# s3rver writes an object in place while it receives it: a GET meanwhile reads a torn file
# whatever the client sent (its filesystem store streams into the final path).
@pytest.mark.servers("seaweedfs", "moto")
def test_checkpoint_rewritten_in_place_is_never_seen_torn(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    src = tmp_path / "runs"
    (src / "exp" / "weights").mkdir(parents=True)
    path = src / "exp" / "weights" / "last.pt"
    key = "w/exp/weights/last.pt"
    daemon = Daemon(s3_server, src, f"s3://{bucket}/w", tmp_path / "state", *FAST,
                    "--multipart-threshold", "8MiB")
    daemons.append(daemon)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "8", str(30 * MiB)],
                              stdout=subprocess.DEVNULL)
    client = s3_server.client()
    seen: set[bytes] = set()
    while writer.poll() is None:
        body = object_or_none(client, bucket, key)
        if body is not None:
            assert is_complete(body), "a torn checkpoint reached the bucket"
            seen.add(body[:4])
        time.sleep(0.1)
    assert writer.returncode == 0
    final = path.read_bytes()
    wait_for(lambda: object_or_none(client, bucket, key) == final, 60, "the final version")
    assert daemon.stop() == 0, daemon.log
    assert len(seen) >= 2, "the poller should have seen several versions"
    assert open_uploads(client, bucket) == []
    assert "changed while uploading" in daemon.log or len(seen) < 8


def test_results_csv_appended_per_epoch_is_mirrored(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    src = tmp_path / "runs"
    run = src / "train"
    daemon = Daemon(s3_server, src, f"s3://{bucket}/r", tmp_path / "state", *FAST)
    daemons.append(daemon)
    # The run directory appears after the daemon started.
    wait_for(lambda: f"waiting for {src} to appear" in daemon.log, 30)
    run.mkdir(parents=True)
    (run / "args.yaml").write_text("epochs: 5\n")
    client = s3_server.client()
    with open(run / "results.csv", "w") as csv:
        csv.write("epoch,loss\n")
    for epoch in range(1, 6):
        with open(run / "results.csv", "a") as csv:
            csv.write(f"{epoch},{1 / epoch:.4f}\n")  # one write() per epoch, as ultralytics
        time.sleep(0.9)
    expected = (run / "results.csv").read_bytes()
    wait_for(lambda: object_or_none(client, bucket, "r/train/results.csv") == expected, 30,
             "results.csv")
    assert read_object(client, bucket, "r/train/args.yaml") == b"epochs: 5\n"
    assert daemon.stop() == 0
    assert "uploaded train/results.csv" in daemon.log
    assert f"waiting for {src} to appear" in daemon.log


def test_sigterm_right_after_the_last_write_flushes_it(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/t", tmp_path / "state", "--interval", "0.5",
                    "--settle", "60", "--checkpoint-interval", "600")
    daemons.append(daemon)
    daemon.wait_started()
    final = os.urandom(12 * MiB)
    (src / "exp" / "best.pt").write_bytes(final)
    (src / "exp" / "results.csv").write_text("epoch\n1\n2\n")
    code = daemon.stop(signal.SIGTERM)  # settle (60 s) never elapsed: only the flush sends
    assert code == 0, daemon.log
    client = s3_server.client()
    assert read_object(client, bucket, "t/exp/best.pt") == final
    assert read_object(client, bucket, "t/exp/results.csv") == b"epoch\n1\n2\n"
    assert "Traceback" not in daemon.log


@pytest.mark.servers("seaweedfs", "moto")  # no ListParts on s3rver: push's restart test
def test_sigkill_mid_multipart_then_restart_resumes(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    from .faultproxy import FaultProxy

    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    content = os.urandom(48 * MiB)
    (src / "exp" / "epoch5.pt").write_bytes(content)
    state = tmp_path / "state"
    client = s3_server.client()
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.set_bandwidth(16 * MiB)
        env = s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint)
        args = [*FAST, "--multipart-threshold", "8MiB", "--part-size", "8MiB",
                "--part-concurrency", "1"]
        first = Daemon(s3_server, src, f"s3://{bucket}/k", state, *args, env=env)
        daemons.append(first)
        wait_for(lambda: recorded_parts(state) >= 2, 60, "parts to be recorded")
        first.kill()
        assert len(open_uploads(client, bucket)) == 1
        proxy.set_bandwidth(None)
        second = Daemon(s3_server, src, f"s3://{bucket}/k", state, *args, env=env)
        daemons.append(second)
        wait_for(lambda: object_or_none(client, bucket, "k/exp/epoch5.pt") == content, 60,
                 "the resumed upload")
        assert second.stop() == 0
    assert "resuming upload" in second.log
    assert open_uploads(client, bucket) == []


def test_store_outage_is_ridden_out(tmp_path: Path, daemons: list[Daemon]) -> None:
    """SeaweedFS stopped for ~20 s in the middle of a training: the daemon keeps running,
    /readyz says so, and everything arrives once the store is back."""
    import json

    from asyncsync.embedded_s3 import SeaweedFS

    from .conftest import S3Server

    with SeaweedFS(data_dir=tmp_path / "seaweedfs") as weed:
        server = S3Server(weed.endpoint, weed.access_key, weed.secret_key)
        client = server.client()
        client.create_bucket(Bucket="outage")
        src = tmp_path / "runs"
        (src / "exp").mkdir(parents=True)
        port = free_port()
        daemon = Daemon(server, src, "s3://outage/o", tmp_path / "state", *FAST,
                        "--metrics-addr", f"127.0.0.1:{port}", "--retries", "2",
                        "--log-format", "json")
        daemons.append(daemon)
        (src / "exp" / "before.txt").write_text("before")
        wait_for(lambda: object_or_none(client, "outage", "o/exp/before.txt"), 30)
        assert http_get(port, "/readyz") == (200, "ready")
        weed.pause()
        written = {}
        for i in range(5):
            name = f"exp/during-{i}.bin"
            written[name] = os.urandom(100_000 + i)
            (src / name).write_bytes(written[name])
            time.sleep(4)
        assert daemon.process.poll() is None, daemon.log
        assert http_get(port, "/healthz")[0] == 200
        status, reason = http_get(port, "/readyz")
        assert status == 503 and "store" in reason
        assert "asyncsync_store_up 0.0" in http_get(port, "/metrics")[1]
        weed.resume()
        for name, data in written.items():
            wait_for(lambda n=name, d=data: object_or_none(client, "outage", f"o/{n}") == d,
                     90, name)
        wait_for(lambda: http_get(port, "/readyz") == (200, "ready"), 30, "ready again")
        assert daemon.stop() == 0
        lines = [json.loads(line) for line in daemon.log.splitlines() if line.startswith("{")]
        assert lines and all({"time", "level", "message"} <= set(entry) for entry in lines)
        assert any("will retry" in entry["message"] for entry in lines)


def test_run_directories_appearing_and_recreated(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """DDP deletes and recreates the run directory; new runs appear next to old ones.
    results.csv, recreated shorter, keeps its previous object under _asyncsync/history."""
    import shutil

    src = tmp_path / "runs"
    src.mkdir()
    daemon = Daemon(s3_server, src, f"s3://{bucket}/d", tmp_path / "state", *FAST)
    daemons.append(daemon)
    client = s3_server.client()
    first = src / "train"
    first.mkdir()
    long_csv = b"epoch,loss\n1,0.9\n2,0.8\n3,0.7\n"
    (first / "results.csv").write_bytes(long_csv)
    wait_for(lambda: object_or_none(client, bucket, "d/train/results.csv") == long_csv, 30)
    shutil.rmtree(first)  # the launcher's fresh start
    first.mkdir()
    short_csv = b"epoch,loss\n1,0.95\n"
    (first / "results.csv").write_bytes(short_csv)
    second = src / "train2"
    second.mkdir()
    (second / "args.yaml").write_text("name: train2\n")
    wait_for(lambda: object_or_none(client, bucket, "d/train/results.csv") == short_csv, 30)
    wait_for(lambda: object_or_none(client, bucket, "d/train2/args.yaml") == b"name: train2\n",
             30)
    history = [k for k in bucket_keys(client, bucket) if "_asyncsync/history/" in k]
    assert len(history) == 1 and history[0].startswith("d/_asyncsync/history/train/results.csv/")
    assert read_object(client, bucket, history[0]) == long_csv
    assert daemon.stop() == 0


def test_checkpoints_are_paced(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """With --checkpoint-interval, a checkpoint rewritten every 'epoch' goes up at most once
    per interval, and the newest version goes up at the latest at shutdown."""
    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/p", tmp_path / "state", "--interval", "0.5",
                    "--settle", "0.3", "--checkpoint-interval", "30", "-v")
    daemons.append(daemon)
    client = s3_server.client()
    versions = [os.urandom(200_000)]
    (src / "exp" / "last.pt").write_bytes(versions[0])
    # The first version goes up as soon as it settles; wait for it rather than guess how long a
    # loaded CI machine takes to start the daemon.
    wait_for(lambda: object_or_none(client, bucket, "p/exp/last.pt") == versions[0], 30,
             "the first checkpoint")
    for _ in range(3):
        versions.append(os.urandom(200_000))
        (src / "exp" / "last.pt").write_bytes(versions[-1])
        time.sleep(1.0)
    # Well inside the 30 s interval, none of the later epochs has gone up.
    assert object_or_none(client, bucket, "p/exp/last.pt") == versions[0]
    assert daemon.log.count("uploaded exp/last.pt") == 1
    assert daemon.stop() == 0
    assert read_object(client, bucket, "p/exp/last.pt") == versions[-1]


def test_torn_zip_checkpoint_is_held_back_until_complete(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A torch checkpoint (a zip archive) caught mid-write, then left alone long enough to
    'settle', is still not published until its central directory is there."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", os.urandom(300_000))
    whole = buffer.getvalue()
    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    path = src / "exp" / "best.pt"
    path.write_bytes(whole[: len(whole) // 2])  # the writer stalls half-way
    daemon = Daemon(s3_server, src, f"s3://{bucket}/z", tmp_path / "state", *FAST)
    daemons.append(daemon)
    time.sleep(3)
    client = s3_server.client()
    assert object_or_none(client, bucket, "z/exp/best.pt") is None
    with open(path, "ab") as f:
        f.write(whole[len(whole) // 2:])
    wait_for(lambda: object_or_none(client, bucket, "z/exp/best.pt") == whole, 30)
    assert daemon.stop() == 0


def test_a_checkpoint_emptied_in_place_never_replaces_its_object(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """torch.save truncates last.pt, then writes it. A writer stalled in between (a loaded
    node) leaves an empty file that holds still past --settle, and through a SIGTERM: an
    empty body passes every torn-read check, so only the checkpoint rule keeps the good
    version in the bucket. Found by the soak (an empty last.pt sent by a restarted daemon)."""
    src = tmp_path / "runs"
    (src / "exp" / "weights").mkdir(parents=True)
    path = src / "exp" / "weights" / "last.pt"
    good = os.urandom(300_000)
    path.write_bytes(good)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/e", tmp_path / "state", *FAST)
    daemons.append(daemon)
    client = s3_server.client()
    wait_for(lambda: object_or_none(client, bucket, "e/exp/weights/last.pt") == good, 30)
    with open(path, "r+b") as f:
        f.truncate(0)  # in place, as torch.save's open(path, "wb") does
    time.sleep(3)  # six settle periods and several scans
    assert read_object(client, bucket, "e/exp/weights/last.pt") == good
    assert "empty, while the bucket holds 300000 bytes of it" in daemon.log
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log  # the flush holds it back too
    assert read_object(client, bucket, "e/exp/weights/last.pt") == good
    # Written at last: the next daemon sends it.
    newer = os.urandom(200_000)
    path.write_bytes(newer)
    again = Daemon(s3_server, src, f"s3://{bucket}/e", tmp_path / "state", *FAST)
    daemons.append(again)
    wait_for(lambda: object_or_none(client, bucket, "e/exp/weights/last.pt") == newer, 30)
    assert again.stop() == 0, again.log


@pytest.mark.servers("seaweedfs")  # the decision is the daemon's, whatever the store
def test_a_checkpoint_truncated_after_it_was_queued_is_not_sent_empty(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A new last.pt is scanned and due, but its upload waits (the byte budget is held by a
    large file going out at 1 MB/s); meanwhile the next torch.save truncates it. What is read
    then is not the version the scan saw, on which every decision was made: it waits to
    settle again, and the emptied-checkpoint rule holds it. Found by the soak."""
    src = tmp_path / "runs"
    (src / "exp" / "weights").mkdir(parents=True)
    last = src / "exp" / "weights" / "last.pt"
    good = os.urandom(300_000)
    last.write_bytes(good)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/q", tmp_path / "state", *FAST,
                    "--max-memory", "5MiB", "--max-bandwidth", "1MB/s",
                    "--multipart-threshold", "5MiB", "--part-size", "5MiB")
    daemons.append(daemon)
    client = s3_server.client()
    key = "q/exp/weights/last.pt"
    wait_for(lambda: object_or_none(client, bucket, key) == good, 30)
    (src / "exp" / "big.bin").write_bytes(os.urandom(20 * MiB))  # holds the whole budget
    time.sleep(2.0)  # its first part is going out at 1 MB/s
    last.write_bytes(os.urandom(300_000))  # a new epoch's checkpoint, due 0.5 s later
    time.sleep(1.5)  # scanned and due, its upload waiting for the budget
    with open(last, "r+b") as f:
        f.truncate(0)  # the next torch.save, its writer stalled
    time.sleep(10)
    assert read_object(client, bucket, key) != b"", daemon.log
    daemon.kill()


@pytest.mark.servers("seaweedfs")  # the key is the planner's, whatever the store
def test_results_csv_recreated_twice_in_a_second_keeps_both_previous_versions(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A run restarted twice within one second: each previous results.csv goes to the
    history area, neither copy over the other (the copies were named by the upload time to
    the second). Found by the soak."""
    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    csv = src / "exp" / "results.csv"
    daemon = Daemon(s3_server, src, f"s3://{bucket}/h2", tmp_path / "state", "--interval",
                    "0.5", "--settle", "0.1", "--checkpoint-interval", "0")
    daemons.append(daemon)
    daemon.wait_started()
    client = s3_server.client()
    versions = [b"epoch,loss\n1,0.9\n2,0.8\n3,0.7\n", b"epoch,loss\n1,0.5\n2,0.4\n",
                b"epoch,loss\n1,0.3\n"]
    while time.time() % 1 > 0.05:  # just after a second starts: all three in one second
        time.sleep(0.01)
    for version in versions:  # each a restarted run's new, shorter results.csv
        csv.unlink(missing_ok=True)
        csv.write_bytes(version)
        wait_for(lambda v=version: object_or_none(client, bucket, "h2/exp/results.csv") == v,
                 10)
    assert daemon.stop() == 0, daemon.log
    kept = [read_object(client, bucket, k) for k in bucket_keys(client, bucket)
            if k.startswith("h2/_asyncsync/history/")]
    assert sorted(kept) == sorted(versions[:2]), daemon.log


def test_sigterm_while_a_plot_is_being_saved_sends_the_whole_plot(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A plot half-written (truncate, first chunk) when SIGTERM comes holds still while the
    flush reads it: the flush waits for a second of stillness instead, within --grace, and
    sends the finished plot, not the half."""
    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/p", tmp_path / "state", "--interval",
                    "0.5", "--settle", "60", "--checkpoint-interval", "600", "--grace", "20")
    daemons.append(daemon)
    daemon.wait_started()
    whole = os.urandom(400_000)
    with open(src / "exp" / "results.png", "wb") as plot:
        plot.write(whole[:100_000])
        plot.flush()
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # savefig still encoding the rest
        plot.write(whole[100_000:])
    daemon.process.wait(timeout=30)
    assert daemon.stop() == 0, daemon.log
    assert read_object(s3_server.client(), bucket, "p/exp/results.png") == whole
    assert "Traceback" not in daemon.log


def test_sigterm_while_a_log_is_appended_without_pause_sends_a_whole_prefix_soon(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The daemon stops while a training goes on (a DaemonSet rolled): its log, appended to
    every 50 ms, never holds still for a second. The flush does not wait all of --grace
    for it: after a few seconds it sends the log as it is, a prefix of what it becomes."""
    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    log_path = src / "exp" / "train.log"
    log_path.write_text("")
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "with open(sys.argv[1], 'a') as f:\n"
         "    for n in range(100000):\n"
         "        f.write(f'step {n} loss 0.{n}\\n'); f.flush(); time.sleep(0.05)\n",
         str(log_path)])
    try:
        daemon = Daemon(s3_server, src, f"s3://{bucket}/l", tmp_path / "state", "--interval",
                        "0.5", "--settle", "60", "--grace", "30")
        daemons.append(daemon)
        daemon.wait_started()
        time.sleep(1)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log
        assert time.monotonic() - started < 15, daemon.log  # not the whole --grace
        sent = read_object(s3_server.client(), bucket, "l/exp/train.log")
    finally:
        writer.kill()
        writer.wait()
    assert sent and log_path.read_bytes().startswith(sent) and sent.endswith(b"\n")


@pytest.mark.servers("seaweedfs")  # the state disk is the daemon's own, whatever the store
def test_watch_started_on_a_full_state_disk_waits_for_room(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A daemon restarted (a pod rescheduled, a crash) while its state disk is full cannot
    open its manifest: SQLite says "disk I/O error", not "full", when it cannot map its
    shared-memory file. It waits for room, as for a store outage, instead of exiting 2 into
    a crash loop; a SIGTERM while it waits exits 0. Found by the soak."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from soak_faults import StateDisk

    disk = StateDisk(tmp_path / "state", 16 * MiB)
    disk.prepare()
    if not disk.usable:
        pytest.skip(f"no small filesystem for the state directory: {disk.how}")
    try:
        src = tmp_path / "runs"
        (src / "exp").mkdir(parents=True)
        (src / "exp" / "before.txt").write_text("before\n")
        client = s3_server.client()
        first = Daemon(s3_server, src, f"s3://{bucket}/r", disk.path, *FAST)
        daemons.append(first)
        wait_for(lambda: object_or_none(client, bucket, "r/exp/before.txt") is not None, 30)
        assert first.stop() == 0, first.log
        disk.fill()
        (src / "exp" / "during.txt").write_text("during\n")
        stopped = Daemon(s3_server, src, f"s3://{bucket}/r", disk.path, *FAST)
        daemons.append(stopped)
        wait_for(lambda: "waiting for room" in stopped.log, 30)
        assert stopped.stop() == 0, stopped.log  # SIGTERM while waiting: nothing to flush
        waiting = Daemon(s3_server, src, f"s3://{bucket}/r", disk.path, *FAST)
        daemons.append(waiting)
        wait_for(lambda: "waiting for room" in waiting.log, 30)
        time.sleep(3)
        assert waiting.process.poll() is None, waiting.log
        assert object_or_none(client, bucket, "r/exp/during.txt") is None
        disk.free()
        wait_for(lambda: object_or_none(client, bucket, "r/exp/during.txt") == b"during\n", 30)
        assert waiting.stop() == 0, waiting.log
        assert waiting.log.count("waiting for room") == 1, waiting.log
        assert "there is room again" in waiting.log
    finally:
        disk.release()


def test_bad_configuration_exits_2_at_startup(
    s3_server: S3Server, tmp_path: Path
) -> None:
    from .conftest import run_cli

    src = tmp_path / "runs"
    src.mkdir()
    for args, needle in [
        (["s3://no-such-bucket-w/x"], "does not exist"),
        (["s3://Bad_Bucket/x"], "invalid bucket name"),
        (["s3://bucket-a/x", "--metrics-addr", "nonsense"], "nonsense"),
        (["s3://bucket-a/x", "--max-bandwidth", "fast"], "--max-bandwidth"),
        (["s3://bucket-a/x", "--keep", "best.pt"], "--delete-after"),
        *([(["s3://bucket-a/x", "--secret=wrong-secret"], "secret key does not match")]
          if s3_server.checks_credentials else []),
    ]:
        env = s3_server.env()
        if "--secret=wrong-secret" in args:
            args = args[:-1]
            env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
        result = run_cli("watch", src, *args, "--state-dir", tmp_path / "state",
                         env=env, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and needle in errors[0], (args, result.stderr)


def test_cleanup_deletes_only_verified_files(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    src = tmp_path / "runs"
    run = src / "exp"
    files = {"results.csv": b"epoch\n1\n", "weights/best.pt": os.urandom(50_000),
             "weights/last.pt": os.urandom(60_000), "plots/val_batch0_pred.jpg": os.urandom(9000)}
    for name, data in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/c", tmp_path / "state", "--interval", "0.5",
                    "--settle", "0.3", "--checkpoint-interval", "600", "--delete-after", "3",
                    "--allow-short-delete-after",
                    "--keep", "best.pt")
    daemons.append(daemon)
    client = s3_server.client()
    for name, data in files.items():
        wait_for(lambda n=name, d=data: object_or_none(client, bucket, f"c/exp/{n}") == d, 30)
    newer = os.urandom(61_000)
    (run / "weights" / "last.pt").write_bytes(newer)  # paced: not uploaded for 10 minutes
    wait_for(lambda: not (run / "results.csv").exists(), 30, "cleanup of results.csv")
    wait_for(lambda: not (run / "plots").exists(), 10, "cleanup of the emptied plots/")
    assert (run / "weights" / "best.pt").read_bytes() == files["weights/best.pt"]  # --keep
    assert (run / "weights" / "last.pt").read_bytes() == newer  # modified after its upload
    for name, data in files.items():  # the bucket is never touched by cleanup
        assert read_object(client, bucket, f"c/exp/{name}") == data
    assert daemon.stop() == 0
    assert read_object(client, bucket, "c/exp/weights/last.pt") == newer  # shutdown flush


def test_bandwidth_cap_and_low_priority(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    import json
    import re

    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/b", tmp_path / "state", *FAST,
                    "--max-bandwidth", "4MB/s", "--low-priority", "--log-format", "json")
    daemons.append(daemon)
    stat_file = Path(f"/proc/{daemon.process.pid}/stat")
    wait_for(lambda: int(stat_file.read_text().rsplit(")", 1)[1].split()[16]) == 10, 10,
             "nice 10")
    content = os.urandom(12_000_000)
    (src / "exp" / "last.pt").write_bytes(content)
    client = s3_server.client()
    wait_for(lambda: object_or_none(client, bucket, "b/exp/last.pt") == content, 60)
    assert daemon.stop() == 0
    messages = [json.loads(line)["message"] for line in daemon.log.splitlines()
                if line.startswith("{")]
    (took,) = [float(m) for line in messages if "uploaded exp/last.pt" in line
               for m in re.findall(r"([\d.]+)s\)$", line)]
    assert took >= 2.0  # 12 MB at 4 MB/s, less the first burst


def test_second_sigint_exits_at_once(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    from .faultproxy import FaultProxy

    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    (src / "exp" / "big.pt").write_bytes(os.urandom(24 * MiB))
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.set_bandwidth(1 * MiB)
        daemon = Daemon(s3_server, src, f"s3://{bucket}/s", tmp_path / "state", *FAST,
                        "--multipart-threshold", "8MiB",
                        env=s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint))
        daemons.append(daemon)
        wait_for(lambda: open_uploads(s3_server.client(), bucket), 30, "the upload to start")
        daemon.process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        code = daemon.stop(signal.SIGINT, timeout=10)
        assert time.monotonic() - started < 5
    assert code == 128 + signal.SIGINT


SECRET = b"outside SRC: a service-account token nobody meant to upload\n"


@pytest.mark.parametrize(("swap", "follow"), [
    ("files", False), ("files", True), ("directory", False), ("directory", True),
])
def test_files_swapped_for_symlinks_before_they_settle_never_leak(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon], swap: str,
    follow: bool,
) -> None:
    """The report's case: watch sees ten regular files; before they settle each one is
    replaced by a symlink to a file outside SRC (or their directory by a symlink to an
    outside directory holding files of the same names). None of the outside bytes reach the
    bucket, the swaps are reported, and an honest file written later still goes up."""
    src, outside = tmp_path / "runs", tmp_path / "outside"
    (src / "train").mkdir(parents=True)
    (outside / "train").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    for i in range(10):
        (src / "train" / f"f{i:02d}.txt").write_bytes(b"honest %d\n" % i)
        (outside / "train" / f"f{i:02d}.txt").write_bytes(SECRET)
    port = free_port()
    daemon = Daemon(s3_server, src, f"s3://{bucket}/w", tmp_path / "state", "--interval", "0.5",
                    "--settle", "3", "--metrics-addr", f"127.0.0.1:{port}",
                    *(["--follow-symlinks"] if follow else []))
    daemons.append(daemon)

    def queued() -> float:
        try:
            _, text = http_get(port, "/metrics")
        except OSError:
            return 0.0
        found = re.search(r"^asyncsync_queue_depth (\S+)$", text, re.MULTILINE)
        return float(found[1]) if found else 0.0

    # Scanned as regular files, not settled yet (a slow start must not let the scan see the
    # symlinks instead: the upload's own refusal is what this test is about).
    wait_for(lambda: queued() == 10, 30, "the ten files queued")
    if swap == "directory":
        # The directory renamed away (out of SRC), a link to the outside one in its place.
        link = src / ".train.swap"
        os.symlink(outside / "train", link)
        os.rename(src / "train", tmp_path / "train-old")
        os.rename(link, src / "train")
        late = "val/late.txt"  # train/ now writes outside: the honest file goes elsewhere
    else:
        for i in range(10):
            link = src / "train" / ".tmp"
            os.symlink(outside / "secret.txt", link)
            os.rename(link, src / "train" / f"f{i:02d}.txt")  # ln -s ... .tmp && mv -T .tmp f
        late = "train/late.txt"
    (src / late).parent.mkdir(exist_ok=True)
    (src / late).write_bytes(b"written after the swap\n")
    client = s3_server.client()
    wait_for(lambda: object_or_none(client, bucket, f"w/{late}"), 30, late)
    time.sleep(3.5)  # every swapped file's settle time has passed
    assert daemon.stop() == 0
    keys = bucket_keys(client, bucket, "w/")
    assert keys == [f"w/{late}"], keys
    for key in keys:  # not one outside byte, whatever the key
        assert SECRET not in read_object(client, bucket, key), key
    assert read_object(client, bucket, f"w/{late}") == b"written after the swap\n"
    log = daemon.log
    if swap == "directory":
        # The next scan finds the link where the directory was and says so; the ten files
        # it had queued are dropped unread (one that settled first is refused by its upload:
        # the walk beneath SRC meets the link).
        assert ("train: skipped symlink pointing outside the source" if follow
                else "train: skipped symlink (see --follow-symlinks)") in log, log
    else:
        for i in range(10):
            assert f"train/f{i:02d}.txt: " in log, log
        # Refused by the upload itself (the scan had seen regular files), not only by a scan.
        assert ("outside the source; not read" if follow
                else "replaced by a symlink; not read") in log, log


def test_gzip_of_a_large_log_on_a_fresh_state_directory(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A compressible file above the multipart threshold is compressed into the state
    directory's temp directory, which watch (unlike push) never created."""
    import gzip

    src = tmp_path / "runs"
    (src / "train").mkdir(parents=True)
    log_text = b"".join(b"epoch %d step %d loss 0.%04d\n" % (i // 1000, i, i % 9999)
                        for i in range(600_000))
    assert len(log_text) > 17 * MiB
    (src / "train" / "train.log").write_bytes(log_text)
    daemon = Daemon(s3_server, src, f"s3://{bucket}/g", tmp_path / "fresh-state", "--gzip",
                    "--settle", "1", "--interval", "1")
    daemons.append(daemon)
    client = s3_server.client()
    wait_for(lambda: object_or_none(client, bucket, "g/train/train.log"), 60, "train.log")
    assert daemon.stop() == 0
    head = client.head_object(Bucket=bucket, Key="g/train/train.log")
    assert head["ContentEncoding"] == "gzip"
    assert gzip.decompress(read_object(client, bucket, "g/train/train.log")) == log_text
    assert "cannot read" not in daemon.log
    assert oct((tmp_path / "fresh-state" / "tmp").stat().st_mode & 0o777) == "0o700"


@pytest.mark.servers("seaweedfs", "moto")  # s3rver cannot abort an upload
def test_an_upload_left_by_a_killed_daemon_for_a_deleted_file_is_aborted(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Only push used to abort orphaned multipart uploads: a daemon SIGKILLed mid-upload,
    whose file is then deleted (a run directory removed under DDP), left the upload in the
    bucket for ever. The next daemon aborts it at start."""
    from .faultproxy import FaultProxy

    src = tmp_path / "runs"
    (src / "exp").mkdir(parents=True)
    (src / "exp" / "epoch5.pt").write_bytes(os.urandom(24 * MiB))
    state = tmp_path / "state"
    client = s3_server.client()
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.set_bandwidth(8 * MiB)
        env = s3_server.env(AWS_ENDPOINT_URL=proxy.endpoint)
        args = [*FAST, "--multipart-threshold", "8MiB", "--part-size", "8MiB",
                "--part-concurrency", "1"]
        first = Daemon(s3_server, src, f"s3://{bucket}/o", state, *args, env=env)
        daemons.append(first)
        wait_for(lambda: recorded_parts(state) >= 1, 60, "a part to be recorded")
        first.kill()
        assert len(open_uploads(client, bucket)) == 1
        (src / "exp" / "epoch5.pt").unlink()
        proxy.set_bandwidth(None)
        second = Daemon(s3_server, src, f"s3://{bucket}/o", state, *args, env=env)
        daemons.append(second)
        wait_for(lambda: open_uploads(client, bucket) == [], 30, "the stale upload's abort")
        assert second.stop() == 0
    assert "aborted stale upload" in second.log
    assert bucket_keys(client, bucket, "o/") == []


def test_metrics_run_label_is_the_run_directory_at_run_depth(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The `run` label of the last-sync timestamp is the run directory as --run-depth says
    (`detect/train2`), not the top-level directory (`detect`); a file above the runs is in
    no run and makes no series (and --run-depth needs no --delete-after to reach the
    daemon)."""
    from prometheus_client.parser import text_string_to_metric_families

    src = tmp_path / "runs"
    (src / "detect" / "train2" / "weights").mkdir(parents=True)
    (src / "detect" / "train2" / "results.csv").write_text("epoch\n1\n")
    (src / "detect" / "train2" / "weights" / "best.pt").write_bytes(os.urandom(10_000))
    (src / "detect" / "notes.txt").write_text("above the runs\n")
    port = free_port()
    daemon = Daemon(s3_server, src, f"s3://{bucket}/m", tmp_path / "state", *FAST,
                    "--run-depth", "2", "--metrics-addr", f"127.0.0.1:{port}")
    daemons.append(daemon)
    client = s3_server.client()
    wait_for(lambda: len(bucket_keys(client, bucket, "m/")) == 3, 30, "the three uploads")

    def run_labels() -> set[str]:
        status, text = http_get(port, "/metrics")
        assert status == 200
        return {
            sample.labels["run"]
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "asyncsync_last_successful_sync_timestamp_seconds"
        }

    wait_for(lambda: run_labels() == {"detect/train2"}, 10, "the run labels")
    assert http_get(port, "/readyz") == (200, "ready")
    assert daemon.stop() == 0, daemon.log


def test_the_training_pod_flow_a_sidecar_stopped_after_the_training_flushes_everything(
    s3_server: S3Server, bucket: str, tmp_path: Path, daemons: list[Daemon]
) -> None:
    """deploy/k8s/training-job as processes: watch (the native sidecar) and a training share
    a directory; the training exits; the kubelet then SIGTERMs the sidecar, whose final
    flush puts everything in the bucket before it exits 0, within the grace period."""
    import sys

    runs = tmp_path / "runs"
    runs.mkdir()
    daemon = Daemon(s3_server, runs, f"s3://{bucket}/job", tmp_path / "state", "--interval",
                    "0.5", "--settle", "30", "--checkpoint-interval", "600", "--grace", "20")
    daemons.append(daemon)
    daemon.wait_started()  # the sidecar starts first (an initContainer), and is up by then
    training = subprocess.run(
        [sys.executable, "-c",
         "import os, pathlib\n"
         f"run = pathlib.Path({str(runs)!r}) / 'train'\n"
         "(run / 'weights').mkdir(parents=True)\n"
         "(run / 'args.yaml').write_text('epochs: 2\\n')\n"
         "for epoch in (1, 2):\n"
         "    with open(run / 'results.csv', 'a') as f: f.write(f'{epoch},0.{epoch}\\n')\n"
         "    (run / 'weights' / 'last.pt').write_bytes(os.urandom(9_000_000 + epoch))\n"
         "(run / 'weights' / 'best.pt').write_bytes((run / 'weights' / 'last.pt').read_bytes())\n"],
        timeout=60, check=True,
    )
    assert training.returncode == 0
    # The main container is done: the sidecar is stopped next (settle never elapsed).
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0, daemon.log
    assert time.monotonic() - started < 20  # within --grace, so the kubelet never SIGKILLs
    client = s3_server.client()
    for path in (runs / "train").rglob("*"):
        if path.is_file():
            relative = path.relative_to(runs).as_posix()
            assert read_object(client, bucket, f"job/{relative}") == path.read_bytes(), relative


# Written raw to a terminal, this name would turn it red and print a line of its own that
# reads as one of our diagnostics.
FORGED_NAME = "\x1b[31m\nasyncsync: error: forged.txt"


# moto answers 404 to a key with a newline in it; s3rver cannot list such keys back. What the
# terminal shows does not depend on the store.
@pytest.mark.servers("seaweedfs")
def test_on_a_terminal_watch_keeps_a_status_line_below_its_log(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """The status line stays one line below the log, never wider than the terminal; a file
    name's control characters reach the terminal escaped, in the status as in the log."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    src = tmp_path / "runs"
    (src / "train").mkdir(parents=True)
    main, terminal = pty.openpty()
    columns = 60
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(
        [ASYNCSYNC, "watch", str(src), f"s3://{bucket}/tty", "--state-dir",
         str(tmp_path / "state"), *FAST],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal,
        env=s3_server.env(),
    )
    os.close(terminal)
    chunks: list[bytes] = []
    reader = threading.Thread(target=read_terminal, args=(main, chunks), daemon=True)
    reader.start()
    try:
        (src / "train" / "results.csv").write_text("epoch\n1\n")
        client = s3_server.client()
        wait_for(lambda: object_or_none(client, bucket, "tty/train/results.csv"), 30,
                 "the upload")
        # (cut at the terminal's 60 columns: the name's end does not fit)
        wait_for(lambda: b"last upload train/results" in b"".join(chunks), 10,
                 f"the status line naming it: {b''.join(chunks)[-500:]!r}")
        (src / FORGED_NAME).write_bytes(b"a name is data\n")
        wait_for(lambda: object_or_none(client, bucket, f"tty/{FORGED_NAME}"), 30,
                 "the upload of the forged name")
        wait_for(lambda: b"last upload \\x1b[31m\\n" in b"".join(chunks), 10,
                 f"the status line naming it: {b''.join(chunks)[-500:]!r}")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        reader.join(timeout=10)
        os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    assert code == 0, text
    lines = text.replace("\r\n", "\n").split("\n")
    redraws = [part.replace("\x1b[K", "") for line in lines for part in line.split("\r")]
    statuses = [r for r in redraws if r.startswith("watching: ")]
    assert statuses and all(len(r) <= columns - 1 for r in statuses), statuses
    assert any("0 queued" in r for r in statuses), statuses
    # Every log record is a line of its own, never glued to the status.
    records = [r for r in redraws if r.startswith("asyncsync: ")]
    assert any("uploaded train/results.csv" in r for r in records), records
    assert not [r for r in redraws if "watching: " in r and not r.startswith("watching: ")]
    # The bucket keeps the name as it is; the terminal gets it escaped, everywhere: the only
    # control sequences written are the status line's own erases, no line is forged.
    assert read_object(client, bucket, f"tty/{FORGED_NAME}") == b"a name is data\n"
    assert "\x1b" not in text.replace("\x1b[K", ""), text
    assert not [r for r in redraws if r.startswith("asyncsync: error: forged")], redraws
    assert any("uploaded \\x1b[31m\\nasyncsync: error: forged.txt" in r for r in records), records
