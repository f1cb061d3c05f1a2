"""The Ultralytics integration and `asyncsync run` around a real YOLOv8n training.

Each test trains YOLOv8n for real (offline, on CPU, 64-pixel images, a generated dataset of
8 images per split) in a subprocess, so ultralytics writes its true run directory: args.yaml
at start, results.csv appended per epoch, weights rewritten in place and stripped at the
end, plots from background threads. Assertions read the bytes back from SeaweedFS.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from asyncsync.errors import ConfigError
from asyncsync.integrations import staging
from asyncsync.integrations.ultralytics import UltralyticsSync, attach
from asyncsync.pipeline.manifest import MANIFEST_FILE
from asyncsync.pipeline.source import OpenedSource

from ..conftest import S3Server, bucket_keys, read_object, run_cli

TRAIN = Path(__file__).with_name("yolo_train.py")
RUN_OPTIONS = ["--settle", "0.5", "--interval", "0.5", "--checkpoint-interval", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yolo-dataset")


def training_env(server: S3Server, tmp_path: Path) -> dict[str, str]:
    """Offline, single-threaded enough for 2 cores, settings kept out of $HOME."""
    return server.env(
        YOLO_OFFLINE="true", YOLO_CONFIG_DIR=str(tmp_path / "yolo-config"),
        OMP_NUM_THREADS="2", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
    )


def train_command(dataset: Path, project: Path, *options: str) -> list[str]:
    return [sys.executable, str(TRAIN), str(dataset), str(project), *options]


def local_files(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def assert_in_bucket(server: S3Server, bucket: str, prefix: str, run: Path,
                     names: list[str] | None = None) -> None:
    """Every local file of the run (or the named ones) is in the bucket, byte-identical."""
    client = server.client()
    files = local_files(run)
    assert files, f"the training wrote nothing under {run}"
    for name in names or sorted(files):
        assert name in files, f"{name} is not in the run directory"
        assert read_object(client, bucket, f"{prefix}/{name}") == files[name], name


def run_record(server: S3Server, bucket: str, key: str) -> dict[str, Any]:
    return dict(json.loads(read_object(server.client(), bucket, key)))


pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_attach_mirrors_the_whole_run_by_the_time_train_returns(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path
) -> None:
    project = tmp_path / "runs"
    done = subprocess.run(
        train_command(dataset, project, "--attach", f"s3://{bucket}/yolo",
                      "--state-dir", str(tmp_path / "state"), "--exit-when-train-returns"),
        env=training_env(s3_server, tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = project / "exp"
    files = local_files(run)
    # The real layout: stripped weights, results, args and ultralytics' plots.
    assert {"args.yaml", "results.csv", "weights/last.pt", "weights/best.pt"} <= set(files)
    assert any(name.startswith("val_batch") for name in files)
    assert_in_bucket(s3_server, bucket, "yolo/exp", run)
    keys = bucket_keys(s3_server.client(), bucket)
    assert set(keys) == {f"yolo/exp/{name}" for name in files} | {
        "yolo/exp/_asyncsync/run.json"
    }
    record = run_record(s3_server, bucket, "yolo/exp/_asyncsync/run.json")
    assert record["status"] == "finished"
    assert record["run"] == "exp" and record["epochs"] == 2 and record["epochs_planned"] == 2
    assert "metrics/mAP50(B)" in record["metrics"]
    assert record["unsent"] == 0 and "ended" in record
    # One summary line, and nothing left in the staging area.
    assert "exp -> s3://" in done.stderr and "in sync" in done.stderr
    assert not any((tmp_path / "state" / "staging").iterdir())


def test_attach_flushes_in_teardown_when_the_training_raises(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path
) -> None:
    project = tmp_path / "runs"
    done = subprocess.run(
        train_command(dataset, project, "--attach", f"s3://{bucket}/crash",
                      "--state-dir", str(tmp_path / "state"), "--crash", "raise",
                      "--epochs", "3"),
        env=training_env(s3_server, tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert done.returncode != 0 and "simulated failure in epoch 2" in done.stderr
    run = project / "exp"
    assert_in_bucket(s3_server, bucket, "crash/exp", run)
    assert (run / "results.csv").read_text().count("\n") == 2  # header and epoch 1
    record = run_record(s3_server, bucket, "crash/exp/_asyncsync/run.json")
    assert record["status"] == "crashed" and record["epochs"] == 1
    assert record["error"] == "RuntimeError: simulated failure in epoch 2"


def test_epoch_results_reach_the_bucket_while_the_training_runs(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path
) -> None:
    hold = tmp_path / "hold"
    hold.mkdir()
    project = tmp_path / "runs"
    training = subprocess.Popen(
        train_command(dataset, project, "--attach", f"s3://{bucket}/live",
                      "--state-dir", str(tmp_path / "state"), "--hold", str(hold)),
        env=training_env(s3_server, tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (hold / "holding").exists():
            assert training.poll() is None, training.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first epoch never ended"
            time.sleep(0.05)
        # The trainer now waits in a callback after epoch 1's on_fit_epoch_end.
        held_at = time.monotonic()
        client = s3_server.client()
        results = project / "exp" / "results.csv"
        while "live/exp/results.csv" not in bucket_keys(client, bucket, "live/exp/"):
            assert time.monotonic() - held_at < 10, "epoch 1's results.csv did not arrive"
            time.sleep(0.1)
        assert read_object(client, bucket, "live/exp/results.csv") == results.read_bytes()
        assert results.read_text().count("\n") == 2  # still epoch 1: the trainer waits
        # The first checkpoint, from the staging copy, arrives too.
        while "live/exp/weights/last.pt" not in bucket_keys(client, bucket, "live/exp/"):
            assert time.monotonic() - held_at < 20, "epoch 1's last.pt did not arrive"
            time.sleep(0.1)
        record = run_record(s3_server, bucket, "live/exp/_asyncsync/run.json")
        assert record["status"] == "running"
    finally:
        (hold / "release").touch()
        _, stderr = training.communicate(timeout=180)
    assert training.returncode == 0, stderr[-3000:]
    assert_in_bucket(s3_server, bucket, "live/exp", project / "exp")


def test_run_wraps_a_training_script(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path
) -> None:
    runs = tmp_path / "runs"  # does not exist yet: the training creates it
    result = run_cli(
        "run", runs, f"s3://{bucket}/wrapped", "--state-dir", tmp_path / "state",
        *RUN_OPTIONS, "--", *train_command(dataset, runs),
        env=training_env(s3_server, tmp_path), timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_in_bucket(s3_server, bucket, "wrapped", runs)
    record = run_record(s3_server, bucket, "wrapped/_asyncsync/run.json")
    assert record["status"] == "finished" and record["exit_code"] == 0
    assert record["runs"][0]["path"] == "exp" and record["runs"][0]["epochs"] == 2


@pytest.mark.parametrize(("crash", "code"), [("exit", 3), ("kill", 128 + signal.SIGKILL)])
def test_run_keeps_the_last_epoch_of_a_training_that_dies(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path, crash: str, code: int
) -> None:
    runs = tmp_path / "runs"
    result = run_cli(
        "run", runs, f"s3://{bucket}/died", "--state-dir", tmp_path / "state", *RUN_OPTIONS,
        "--", *train_command(dataset, runs, "--crash", crash, "--epochs", "3"),
        env=training_env(s3_server, tmp_path), timeout=240,
    )
    assert result.returncode == code, result.stderr[-3000:]
    run = runs / "exp"
    # It died right after saving its second epoch: that epoch's files, as they are on disk.
    assert (run / "results.csv").read_text().count("\n") == 3
    assert_in_bucket(s3_server, bucket, "died", runs,
                     ["exp/weights/last.pt", "exp/results.csv", "exp/args.yaml"])
    record = run_record(s3_server, bucket, "died/_asyncsync/run.json")
    assert record["status"] == "crashed" and record["exit_code"] == code
    assert record["runs"][0]["epochs"] == 2


def test_a_training_killed_mid_run_resumes_from_the_bucket(
    s3_server: S3Server, bucket: str, tmp_path: Path, dataset: Path
) -> None:
    """The seed's recovery story: a 4-epoch training under `asyncsync run` is SIGKILLed
    after epoch 2; its directory is wiped (a new machine); `asyncsync pull` brings the run
    back where it was trained, and ultralytics' own resume continues at epoch 3 and
    finishes epoch 4 in the restored directory."""
    import shutil

    runs = tmp_path / "runs"
    env = training_env(s3_server, tmp_path)
    killed = run_cli(
        "run", runs, f"s3://{bucket}/resumable", "--state-dir", tmp_path / "state",
        *RUN_OPTIONS, "--", *train_command(dataset, runs, "--crash", "kill", "--epochs", "4"),
        env=env, timeout=300,
    )
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr[-3000:]
    shutil.rmtree(runs)
    pulled = run_cli("pull", f"s3://{bucket}/resumable", runs, env=env, timeout=120)
    assert pulled.returncode == 0, pulled.stderr
    last = runs / "exp" / "weights" / "last.pt"
    assert (runs / "exp" / "results.csv").read_text().count("\n") == 3  # header, 2 epochs
    resumed = subprocess.run(
        [sys.executable, str(TRAIN), str(dataset), str(runs), "--resume", str(last)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming training" in resumed.stdout + resumed.stderr
    rows = (runs / "exp" / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(row.split(",")[0])) for row in rows] == [1, 2, 3, 4]


class FakeModel:
    """Where attach() registers its callbacks (the unit tests need no ultralytics)."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Any]] = {}

    def add_callback(self, event: str, callback: Any) -> None:
        self.callbacks.setdefault(event, []).append(callback)


def test_attach_registers_picklable_callbacks_that_hold_no_thread(tmp_path: Path) -> None:
    model = FakeModel()
    sync = attach(model, "s3://bucket-a/prefix", state_dir=tmp_path, workers=4,
                  max_bandwidth="20MB/s", exclude="*.jpg")
    assert set(model.callbacks) == {"on_pretrain_routine_start", "on_train_epoch_end",
                                    "on_model_save", "on_fit_epoch_end", "on_train_end",
                                    "teardown"}
    assert sync.run is None  # nothing started at attach time
    # DDP pickles the callbacks (bound methods of the sync object) into its workers.
    clone = pickle.loads(pickle.dumps(model.callbacks["on_model_save"][0]))
    assert isinstance(clone.__self__, UltralyticsSync)


def test_other_ranks_do_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = FakeModel()
    sync = attach(model, f"file://{tmp_path / 'bucket'}", state_dir=tmp_path / "state")
    monkeypatch.setenv("RANK", "1")

    class Trainer:
        save_dir = tmp_path / "runs" / "exp"
        epochs = 1

    for callbacks in model.callbacks.values():
        for callback in callbacks:
            callback(Trainer())
    assert sync.run is None and not (tmp_path / "state").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"workers": 0}, "workers=0"),
    ({"max_bandwidth": "fast"}, "fast"),
    ({"part_size": "1KiB"}, "--part-size"),
    ({"flush_timeout": 0}, "flush_timeout"),
    ({"flush_timeout": "soon"}, "flush_timeout 'soon'"),
    ({"checkpoint_interval": -1}, "checkpoint_interval -1: must be a number of seconds of at"),
    ({"checkpoint_interval": "often"}, "checkpoint_interval 'often'"),
    ({"wrokers": 3}, "unknown option 'wrokers'"),
])
def test_attach_rejects_bad_options_before_training(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        attach(FakeModel(), "s3://bucket-a/prefix", **options)
    with pytest.raises(ConfigError, match="expected s3://"):
        attach(FakeModel(), "bucket-a/prefix")


def test_the_integration_imports_no_training_framework() -> None:
    code = ("import sys, asyncsync.integrations.ultralytics; "
            "print([m for m in ('torch', 'ultralytics', 'botocore') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    assert out.stdout.strip() == "[]"


class FakeTrainer:
    """Writes like ultralytics' trainer (in place, weights every epoch) and calls the
    callbacks in its order, without torch: for the cases a real training cannot stage."""

    def __init__(self, model: FakeModel, run: Path, epochs: int) -> None:
        self.model, self.save_dir, self.wdir = model, run, run / "weights"
        self.epochs, self.epoch, self.stop = epochs, 0, False
        self.wdir.mkdir(parents=True)
        (run / "args.yaml").write_text(f"epochs: {epochs}\n")
        (run / "results.csv").write_text("epoch,metrics/mAP50(B)\n")

    def callback(self, event: str) -> None:
        for callback in self.model.callbacks.get(event, []):
            callback(self)

    def save_epoch(self, weights: bytes) -> None:
        self.callback("on_train_epoch_end")  # then validation, then the save
        with open(self.run / "results.csv", "a") as results:
            results.write(f"{self.epoch + 1},{self.epoch / 10:.2f}\n")
        (self.wdir / "last.pt").write_bytes(weights)  # truncated and rewritten in place
        self.stop = self.epoch + 1 >= self.epochs
        self.callback("on_model_save")
        self.callback("on_fit_epoch_end")

    @property
    def run(self) -> Path:
        return self.save_dir


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


def test_a_snapshot_is_what_was_saved_when_the_next_epoch_rewrites_the_file(
    s3_server: S3Server, bucket: str, tmp_path: Path, aws_env: None
) -> None:
    model = FakeModel()
    attach(model, f"s3://{bucket}/snap", state_dir=tmp_path / "state")
    trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=2)
    trainer.callback("on_pretrain_routine_start")
    saved = os.urandom(3_000_000)
    trainer.save_epoch(saved)
    # The next epoch rewrites last.pt in place as soon as its first callback returns.
    trainer.callback("on_train_epoch_end")
    with open(trainer.wdir / "last.pt", "r+b") as weights:
        weights.write(b"\0" * 1_000_000)
        client = s3_server.client()
        deadline = time.monotonic() + 20
        while "snap/exp/weights/last.pt" not in bucket_keys(client, bucket, "snap/"):
            assert time.monotonic() < deadline, "the snapshot was never uploaded"
            time.sleep(0.05)
        assert read_object(client, bucket, "snap/exp/weights/last.pt") == saved
    trainer.callback("on_train_end")
    trainer.callback("teardown")
    assert_in_bucket(s3_server, bucket, "snap/exp", trainer.run)


def test_attach_on_a_fresh_state_dir_keeps_everything_in_it_private(
    s3_server: S3Server, bucket: str, tmp_path: Path, aws_env: None
) -> None:
    """Under the usual umask 022: attach() makes its checkpoint staging before the manifest,
    and the state directory it makes on the way is 0700 all the same; each file in it is
    0600 and each directory 0700 (the manifest names the store and holds upload ids)."""
    state = tmp_path / "state"
    old_umask = os.umask(0o022)
    try:
        model = FakeModel()
        attach(model, f"s3://{bucket}/private", state_dir=state)
        trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=1)
        trainer.callback("on_pretrain_routine_start")
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        trainer.save_epoch(os.urandom(200_000))
        trainer.callback("on_train_end")
        trainer.callback("teardown")
    finally:
        os.umask(old_umask)
    assert_in_bucket(s3_server, bucket, "private/exp", trainer.run)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.lstat().st_mode)
             for path in [state, *state.rglob("*")]}
    assert f"state/{MANIFEST_FILE}" in modes, modes
    assert {name: m for name, m in modes.items()
            if m != (0o700 if (tmp_path / name).is_dir() else 0o600)} == {}, modes


def test_checkpoints_are_copied_off_the_training_thread_until_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_model_save returns while the copy is still being made; on_train_epoch_end, the
    trainer's last callback before it saves again, waits for it."""
    model = FakeModel()
    attach(model, f"file://{tmp_path / 'bucket'}", state_dir=tmp_path / "state")
    (tmp_path / "bucket").mkdir()
    trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=2)
    release = threading.Event()
    copiers: list[str] = []
    real_copy = staging.copy_checkpoint

    def held_copy(source: OpenedSource, staged: Path) -> None:
        copiers.append(threading.current_thread().name)
        assert release.wait(30)
        real_copy(source, staged)

    monkeypatch.setattr(staging, "copy_checkpoint", held_copy)
    trainer.callback("on_pretrain_routine_start")
    saved = os.urandom(1_000_000)
    trainer.save_epoch(saved)  # returns although the copy is held
    # The copier thread reaches the copy once it has opened the checkpoint: wait for it.
    deadline = time.monotonic() + 10
    while not copiers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert copiers and all(name.startswith("asyncsync-copy") for name in copiers)
    next_epoch = threading.Thread(target=trainer.callback, args=("on_train_epoch_end",))
    next_epoch.start()
    next_epoch.join(0.5)
    assert next_epoch.is_alive(), "the next epoch went on while its checkpoint was copied"
    release.set()
    next_epoch.join(10)
    assert not next_epoch.is_alive()
    (trainer.wdir / "last.pt").write_bytes(os.urandom(1_000_000))  # the next save
    trainer.callback("on_train_end")
    trainer.callback("teardown")
    assert (tmp_path / "bucket" / "exp" / "weights" / "last.pt").read_bytes() == \
        (trainer.wdir / "last.pt").read_bytes()


@pytest.mark.parametrize(("interval", "snapshots"), [(0, 3), (3600, 1)])
def test_checkpoints_are_paced_by_checkpoint_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interval: int, snapshots: int
) -> None:
    model = FakeModel()
    attach(model, f"file://{tmp_path / 'bucket'}", state_dir=tmp_path / "state",
           checkpoint_interval=interval)
    (tmp_path / "bucket").mkdir()
    trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=3)
    copied: list[str] = []
    real_copy = staging.copy_checkpoint

    def counted_copy(source: Path, staged: Path) -> None:
        copied.append(source.name)
        real_copy(source, staged)

    monkeypatch.setattr(staging, "copy_checkpoint", counted_copy)
    trainer.callback("on_pretrain_routine_start")
    for epoch in range(trainer.epochs):
        trainer.epoch = epoch
        trainer.save_epoch(os.urandom(100_000))
    trainer.callback("on_train_end")
    trainer.callback("teardown")
    assert copied == ["last.pt"] * snapshots
    # Whatever the pacing, the final flush sends the last version.
    assert (tmp_path / "bucket" / "exp" / "weights" / "last.pt").read_bytes() == \
        (trainer.wdir / "last.pt").read_bytes()


def test_the_final_weights_win_over_every_queued_snapshot(
    s3_server: S3Server, bucket: str, tmp_path: Path, aws_env: None
) -> None:
    model = FakeModel()
    attach(model, f"s3://{bucket}/order", state_dir=tmp_path / "state", max_bandwidth="20MB/s",
           checkpoint_interval=0)
    trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=12)
    trainer.callback("on_pretrain_routine_start")
    for epoch in range(trainer.epochs):  # faster than the capped uploads: snapshots queue up
        trainer.epoch = epoch
        trainer.save_epoch(os.urandom(2_000_000 + epoch))
    final = os.urandom(500_000)  # the stripped checkpoint, written in place at the end
    (trainer.wdir / "last.pt").write_bytes(final)
    trainer.callback("on_train_end")
    assert read_object(s3_server.client(), bucket, "order/exp/weights/last.pt") == final
    trainer.callback("teardown")
    assert_in_bucket(s3_server, bucket, "order/exp", trainer.run)
    record = run_record(s3_server, bucket, "order/exp/_asyncsync/run.json")
    assert record["status"] == "finished" and record["epochs"] == 12
    assert record["metrics"] == {"epoch": "12", "metrics/mAP50(B)": "1.10"}
    assert not list((tmp_path / "state" / "staging").iterdir())


def test_a_missing_bucket_is_reported_once_and_never_stops_the_training(
    s3_server: S3Server, tmp_path: Path, aws_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    model = FakeModel()
    attach(model, "s3://no-such-bucket-here/x", state_dir=tmp_path / "state",
           retries=1)
    trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=3)
    with caplog.at_level(logging.INFO, logger="asyncsync"):
        trainer.callback("on_pretrain_routine_start")
        for epoch in range(3):
            trainer.epoch = epoch
            trainer.save_epoch(os.urandom(1000))
        trainer.callback("on_train_end")
        trainer.callback("teardown")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    missing = [w for w in warnings if "no-such-bucket-here does not exist" in w]
    # The upload path and the run record say it once each, and the summary says it again.
    assert len(missing) == 3, warnings
    assert "exp -> s3://no-such-bucket-here/x/exp: NOT in sync" in warnings[-1]


def test_unpickled_callbacks_start_their_uploader_in_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a DDP worker gets: the callbacks after a pickle round trip, run with RANK=0."""
    model = FakeModel()
    attach(model, f"file://{tmp_path / 'bucket'}", state_dir=tmp_path / "state")
    (tmp_path / "bucket").mkdir()
    worker = FakeModel()
    worker.callbacks = pickle.loads(pickle.dumps(model.callbacks))
    monkeypatch.setenv("RANK", "0")
    trainer = FakeTrainer(worker, tmp_path / "runs" / "train2", epochs=1)
    trainer.callback("on_pretrain_routine_start")
    trainer.save_epoch(os.urandom(100_000))
    trainer.callback("on_train_end")
    trainer.callback("teardown")
    for path in trainer.run.rglob("*"):
        if path.is_file():
            relative = path.relative_to(trainer.run.parent)
            assert (tmp_path / "bucket" / relative).read_bytes() == path.read_bytes()
    record = json.loads((tmp_path / "bucket" / "train2/_asyncsync/run.json").read_text())
    assert record["status"] == "finished" and record["epochs"] == 1


def test_attach_serves_metrics_while_the_training_runs(
    s3_server: S3Server, bucket: str, tmp_path: Path, aws_env: None
) -> None:
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = FakeModel()
    attach(model, f"s3://{bucket}/m", state_dir=tmp_path / "state",
           metrics_addr=f"127.0.0.1:{port}")
    trainer = FakeTrainer(model, tmp_path / "runs" / "exp", epochs=2)
    trainer.callback("on_pretrain_routine_start")
    trainer.save_epoch(os.urandom(100_000))

    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    run = frozenset({("run", "exp")})
    deadline = time.monotonic() + 20
    while scrape().get(("asyncsync_training_epoch", run)) != 1:
        assert time.monotonic() < deadline, "the epoch never reached /metrics"
        time.sleep(0.1)
    values = scrape()
    assert values[("asyncsync_run_status", run | {("status", "running")})] == 1
    assert values[("asyncsync_files_uploaded_total", frozenset({("outcome", "new")}))] >= 2
    trainer.save_epoch(os.urandom(100_000))
    trainer.callback("on_train_end")
    trainer.callback("teardown")
    assert_in_bucket(s3_server, bucket, "m/exp", trainer.run)
    # The run is over: its server is gone with it (the port is free for the next run).
    with pytest.raises(OSError):
        scrape()
