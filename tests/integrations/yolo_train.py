"""A real YOLOv8n training, offline on CPU, for the integration tests (run as a script).

    python yolo_train.py DATASET_DIR PROJECT_DIR [--attach DEST --state-dir DIR]
        [--crash raise|exit|kill] [--hold DIR]

Builds the tiny dataset on first use (8 random 64x64 JPEGs per split, one box each),
trains 2 epochs (--epochs) at imgsz 64, and writes ultralytics' real run directory PROJECT_DIR/exp.
--crash ends the training during its second epoch: an exception from a callback at the
start of the epoch (raise), or, once the epoch's checkpoint is saved, os._exit(3) (exit)
or SIGKILL (kill). --hold makes the trainer wait, in a callback after the first epoch's
on_fit_epoch_end, until the test creates DIR/release (it first creates DIR/holding).
--exit-when-train-returns ends the process with os._exit(0) the moment train() returns.
--resume LAST_PT continues the training that LAST_PT was saved by, ultralytics' own way
(`YOLO(LAST_PT).train(resume=True)`), instead of starting one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def make_dataset(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    yaml = root / "ds.yaml"
    if yaml.exists():
        return yaml
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    return yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("project", type=Path)
    parser.add_argument("--attach")
    parser.add_argument("--state-dir")
    parser.add_argument("--crash", choices=("raise", "exit", "kill"))
    parser.add_argument("--hold", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--exit-when-train-returns", action="store_true")
    parser.add_argument("--resume", type=Path)
    args = parser.parse_args()

    from ultralytics import YOLO

    if args.resume:
        # Everything else (data, epochs, imgsz, the run directory) comes from the checkpoint.
        YOLO(str(args.resume)).train(resume=True, device="cpu")
        return

    data = make_dataset(args.dataset)
    model = YOLO("yolov8n.yaml")
    if args.attach:
        from asyncsync.integrations.ultralytics import attach

        attach(model, args.attach, state_dir=args.state_dir, flush_timeout=120)

    def crash_at_epoch_start(trainer: object) -> None:
        if args.crash == "raise" and getattr(trainer, "epoch", 0) == 1:
            raise RuntimeError("simulated failure in epoch 2")

    def crash_after_save(trainer: object) -> None:
        if getattr(trainer, "epoch", 0) == 1:
            sys.stdout.flush()
            if args.crash == "exit":
                os._exit(3)
            if args.crash == "kill":
                os.kill(os.getpid(), signal.SIGKILL)

    def hold(trainer: object) -> None:
        if getattr(trainer, "epoch", None) == 0 and args.hold:
            (args.hold / "holding").touch()
            deadline = time.monotonic() + 120
            while not (args.hold / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    model.add_callback("on_train_epoch_start", crash_at_epoch_start)
    if args.crash in ("exit", "kill"):
        model.add_callback("on_fit_epoch_end", crash_after_save)
    model.add_callback("on_fit_epoch_end", hold)
    model.train(data=str(data), epochs=args.epochs, imgsz=64, batch=4, device="cpu", workers=0,
                amp=False, plots=True, project=str(args.project), name="exp", exist_ok=True,
                verbose=False, seed=0)
    if args.exit_when_train_returns:
        os._exit(0)  # no atexit, no thread joins: the bucket must be complete already


if __name__ == "__main__":
    main()
