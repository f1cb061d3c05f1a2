"""`make demo`: the whole job end to end on an embedded SeaweedFS, in a temp directory.

Starts SeaweedFS on loopback, writes a run directory shaped like an ultralytics YOLOv8
training (args.yaml, results.csv, plots, best.pt and a multipart-sized last.pt), pushes it
with the real `asyncsync` command, pushes again to show that nothing is re-sent, changes
one file and pushes a third time, lists what landed in the bucket, and stops the server.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .embedded_s3 import SeaweedFS

BUCKET = "asyncsync-demo"
MiB = 1024 * 1024


def make_run_directory(root: Path, name: str, epochs: int, seed: int) -> None:
    """A run directory with the files and sizes an ultralytics detect training leaves."""
    rng = random.Random(seed)
    run = root / "detect" / name
    (run / "weights").mkdir(parents=True, exist_ok=True)
    (run / "args.yaml").write_text(
        "task: detect\nmode: train\nmodel: yolov8n.yaml\ndata: coco8.yaml\n"
        f"epochs: {epochs}\nbatch: 16\nimgsz: 640\nproject: runs/detect\nname: {name}\n"
    )
    lines = ["epoch,train/box_loss,train/cls_loss,metrics/mAP50(B),metrics/mAP50-95(B)"]
    for epoch in range(1, epochs + 1):
        lines.append(
            f"{epoch},{1.6 / epoch ** 0.3:.5f},{2.4 / epoch ** 0.4:.5f},"
            f"{min(0.9, 0.1 * epoch ** 0.5):.5f},{min(0.7, 0.06 * epoch ** 0.5):.5f}"
        )
    (run / "results.csv").write_text("\n".join(lines) + "\n")
    plots = ["labels.jpg", "train_batch0.jpg", "train_batch1.jpg", "train_batch2.jpg",
             "val_batch0_labels.jpg", "val_batch0_pred.jpg", "results.png",
             "confusion_matrix.png", "BoxPR_curve.png", "BoxF1_curve.png"]
    for plot in plots:
        (run / plot).write_bytes(rng.randbytes(rng.randint(60_000, 400_000)))
    (run / "weights" / "best.pt").write_bytes(rng.randbytes(6 * MiB))
    # Mid-training last.pt carries the optimizer state: larger, and a multipart upload.
    (run / "weights" / "last.pt").write_bytes(rng.randbytes(24 * MiB))


def asyncsync(*args: str, env: dict[str, str]) -> None:
    command = [str(Path(sys.executable).parent / "asyncsync"), *args]
    shown = " ".join(shlex.quote(a) for a in ["asyncsync", *args])
    print(f"\n$ {shown}", flush=True)
    subprocess.run(command, env=env, check=False)


def list_bucket(client: Any, prefix: str) -> None:
    print(f"\nObjects in s3://{BUCKET}/{prefix}:")
    total = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            total += obj["Size"]
            print(f"  {obj['Size']:>12,}  {obj['ETag']:<40} s3://{BUCKET}/{obj['Key']}")
    print(f"  {total:>12,}  bytes in all")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="asyncsync-demo-") as work:
        root = Path(work)
        runs = root / "runs"
        print(f"Demo directory: {root}")
        make_run_directory(runs, "train", epochs=30, seed=1)
        make_run_directory(runs, "train2", epochs=12, seed=2)
        with SeaweedFS(data_dir=root / "seaweedfs") as s3:
            print(f"SeaweedFS S3 gateway on {s3.endpoint}")
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(s3.env())
            env["ASYNCSYNC_STATE_DIR"] = str(root / "state")
            client = s3.client()
            client.create_bucket(Bucket=BUCKET)
            destination = f"s3://{BUCKET}/experiments"
            print("\n1. First push: everything goes up (last.pt as a multipart upload).")
            asyncsync("push", str(runs), destination, "--workers", "16", "-v", env=env)
            print("\n2. Push again: the manifest knows every file; nothing is read or sent.")
            asyncsync("push", str(runs), destination, env=env)
            print("\n3. A training epoch appends to results.csv: only that file is sent.")
            with open(runs / "detect" / "train2" / "results.csv", "a") as csv:
                csv.write("13,1.01000,1.20000,0.36000,0.21000\n")
            asyncsync("push", str(runs), destination, "-v", env=env)
            list_bucket(client, "experiments/")
            print(f"\nManifest: {root / 'state' / 'manifest.db'}")
            print("Stopping SeaweedFS and removing the demo directory.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
