"""What syncing costs a GPU training: epoch times of the same YOLOv8 training with and without it.

    python benchmarks/gpu_training.py --out gpu-results.json

Each round trains the same model on the same generated dataset in each mode, in rotated
order, each in a fresh process: without sync (``none``), with ``attach()`` in the training
process (``attach``: checkpoints paced at the default 300 s, like watch), with attach()
uploading the weights of every epoch (``attach-every-epoch``), and wrapped by ``asyncsync
run`` as a separate process (``run``). The training
records when every epoch starts and ends through its own callbacks; an epoch's time runs from
its start to the next epoch's start, so it includes validation, the checkpoint writes and
whatever the sync callbacks do in the training's own thread. The first epoch (CUDA and
dataloader warm-up) is reported apart. After every synced training the bucket is compared,
byte for byte, with the run directory.

Needs a CUDA device, torch, ultralytics and `weed` (SeaweedFS) on PATH or beside the
interpreter. The results table for benchmarks/README.md is printed at the end; the JSON is
rewritten after every training, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MODES = ("none", "attach", "attach-every-epoch", "run")
BUCKET = "training"


def make_dataset(root: Path, images: int, val_images: int, size: int) -> Path:
    """Images of coloured boxes on a grey ground, labelled where the boxes are."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", val_images)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            picture = np.full((size, size, 3), 114, np.uint8)
            picture += rng.integers(0, 40, picture.shape, dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                w, h = rng.uniform(0.1, 0.4, 2)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                x0, y0 = int((cx - w / 2) * size), int((cy - h / 2) * size)
                x1, y1 = int((cx + w / 2) * size), int((cy + h / 2) * size)
                cls = int(rng.integers(0, 3))
                colour = [(40, 40, 220), (40, 200, 40), (220, 60, 40)][cls]
                cv2.rectangle(picture, (x0, y0), (x1, y1), colour, -1)
                lines.append(f"{cls} {cx:.5f} {cy:.5f} {w:.5f} {h:.5f}")
            cv2.imwrite(str(root / "images" / split / f"{index:05d}.jpg"), picture)
            (root / "labels" / split / f"{index:05d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                    "names: {0: red, 1: green, 2: blue}\n")
    return data


def train(args: argparse.Namespace) -> None:
    """One training in this process; its epoch marks go to --marks as JSON."""
    from ultralytics import YOLO

    model = YOLO(args.model)
    if args.mode.startswith("attach"):
        from asyncsync.integrations.ultralytics import attach

        pacing = {"checkpoint_interval": 0} if args.mode == "attach-every-epoch" else {}
        attach(model, args.destination, state_dir=str(Path(args.project).parent / "state"),
               **pacing)
    starts: list[float] = []
    ends: list[float] = []
    model.add_callback("on_train_epoch_start", lambda trainer: starts.append(time.perf_counter()))
    model.add_callback("on_fit_epoch_end", lambda trainer: ends.append(time.perf_counter()))
    began = time.perf_counter()
    model.train(data=args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                device=args.device, workers=args.workers, project=args.project, name=args.name,
                plots=True, seed=0, verbose=False, close_mosaic=0)
    returned = time.perf_counter()
    epochs = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    epochs.append(ends[-1] - starts[-1])
    Path(args.marks).write_text(json.dumps({
        "setup_s": starts[0] - began,
        "epochs_s": epochs,
        # From the last epoch's end to train() returning: the final validation, the plots,
        # and with attach() the final flush.
        "tail_s": returned - ends[-1],
        "total_s": returned - began,
    }))


def verify(client: Any, prefix: str, run: Path) -> int:
    """Every file of the run directory is in the bucket with the same bytes; returns the count."""
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    count = 0
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        key = f"{prefix}{run.name}/{path.relative_to(run).as_posix()}"
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if body != path.read_bytes():
            raise SystemExit(f"{key}: the bucket's copy differs from {path}")
        count += 1
    return count


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        done = [r for r in results if r["mode"] == mode]
        if not done:
            continue
        # The first epoch warms CUDA and the dataloader up; the last one also draws the
        # final plots. Those two are kept out of the steady epoch time.
        steady = [s for r in done for s in r["epochs_s"][1:-1]]
        summary[mode] = {
            "trainings": len(done),
            "first_epoch_s": statistics.median(r["epochs_s"][0] for r in done),
            "epoch_s": statistics.median(steady),
            "epoch_mean_s": statistics.fmean(steady),
            "tail_s": statistics.median(r["tail_s"] for r in done),
            "total_s": statistics.median(r["total_s"] for r in done),
        }
    base = summary.get("none")
    if base:
        for row in summary.values():
            row["overhead_pct"] = 100 * (row["epoch_s"] / base["epoch_s"] - 1)
    return summary


def table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| sync | trainings | epoch (median, s) | vs none | first epoch (s) "
             "| after the last epoch (s) | train() total (s) |",
             "|---|---|---|---|---|---|---|"]
    names = {"none": "none", "attach": "`attach()` in the training",
             "attach-every-epoch": "`attach(..., checkpoint_interval=0)`: weights every epoch",
             "run": "`asyncsync run` around it"}
    for mode, row in summary.items():
        lines.append(
            f"| {names[mode]} | {row['trainings']:.0f} | {row['epoch_s']:.3f} "
            f"| {row.get('overhead_pct', 0):+.1f}% | {row['first_epoch_s']:.2f} "
            f"| {row['tail_s']:.2f} | {row['total_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-results.json")
    parser.add_argument("--work", default="/tmp/asyncsync-gpu")
    parser.add_argument("--model", default="yolov8s.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="0", help="0: the first CUDA device; cpu for a dry run")
    parser.add_argument("--modes", default="none,attach,run",
                        help=f"comma-separated, of {', '.join(MODES)}")
    # The child side: one training.
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--project", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--destination", help=argparse.SUPPRESS)
    parser.add_argument("--marks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.marks:
        train(args)
        return

    import torch

    from asyncsync.embedded_s3 import SeaweedFS

    work = Path(args.work)
    data = make_dataset(work / "dataset", args.images, args.val_images, args.imgsz)
    modes = [m for m in args.modes.split(",") if m]
    out = Path(args.out)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "settings": {k: getattr(args, k) for k in
                     ("model", "imgsz", "images", "val_images", "epochs", "batch", "workers")},
        "trainings": [],
    }
    with SeaweedFS(data_dir=work / "seaweedfs") as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        env = {**os.environ, **server.env(), "YOLO_OFFLINE": "true",
               "YOLO_CONFIG_DIR": str(work / "yolo-config"), "MPLBACKEND": "Agg",
               "PYTHONUNBUFFERED": "1"}
        for round_ in range(args.rounds):
            for mode in modes[round_ % len(modes):] + modes[:round_ % len(modes)]:
                name = f"{mode}-{round_}"
                project = work / "runs" / name
                prefix = f"{name}/"
                marks = work / f"{name}.json"
                command = [sys.executable, str(HERE), "--mode", mode, "--data", str(data),
                           "--project", str(project), "--name", "exp", "--marks", str(marks),
                           "--destination", f"s3://{BUCKET}/{name}"]
                for option in ("model", "imgsz", "epochs", "batch", "workers", "device"):
                    command += [f"--{option}", str(getattr(args, option))]
                if mode == "run":
                    command = [sys.executable, "-m", "asyncsync", "run", str(project),
                               f"s3://{BUCKET}/{name}", "--state-dir", str(work / name),
                               "--", *command]
                log = work / f"{name}.log"
                began = time.perf_counter()
                with log.open("wb") as output:
                    done = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT)
                if done.returncode:
                    sys.stdout.write(log.read_text(errors="replace")[-4000:])
                    raise SystemExit(f"{name}: the training exited with {done.returncode}")
                result = {"mode": mode, "round": round_, "wall_s": time.perf_counter() - began,
                          **json.loads(marks.read_text())}
                if mode != "none":
                    result["objects_verified"] = verify(client, prefix, project / "exp")
                report["trainings"].append(result)
                report["summary"] = summarize(report["trainings"])
                out.write_text(json.dumps(report, indent=2))
                print(f"{name}: epochs {[round(e, 3) for e in result['epochs_s']]} "
                      f"tail {result['tail_s']:.2f} s", flush=True)
    print(table(report["summary"]))


if __name__ == "__main__":
    main()
