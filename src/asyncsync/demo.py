"""`make demo`: the headline end to end on an embedded SeaweedFS, in a temp directory.

A training crashes; its run directory is safe in the bucket anyway, and comes back:

1. a simulated YOLOv8 training (writing its files the way ultralytics does: args.yaml
   first, results.csv appended and weights/last.pt rewritten in place every epoch) runs
   under `asyncsync run` and dies at epoch 3;
2. `asyncsync runs` says it crashed, and how far it got;
3. `asyncsync pull` brings the run back into a clean directory, byte for byte;
4. `asyncsync push` of the original directory sends nothing: the manifest knows every file.

No torch is needed and it takes seconds. Every step prints the command a user would type.
"""

from __future__ import annotations

import filecmp
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from .embedded_s3 import SeaweedFS

BUCKET = "asyncsync-demo"
DESTINATION = f"s3://{BUCKET}/experiments"

# Shaped like ultralytics' writes; what a real training does to the same files.
TRAINING = r'''
import os, sys, time
run = os.path.join(sys.argv[1], "detect", "train")
epochs, crash_at = 5, 3
os.makedirs(os.path.join(run, "weights"), exist_ok=True)
with open(os.path.join(run, "args.yaml"), "w") as f:
    f.write(f"task: detect\nmode: train\nmodel: yolov8n.pt\ndata: coco8.yaml\n"
            f"epochs: {epochs}\nimgsz: 640\nproject: runs/detect\nname: train\n")
with open(os.path.join(run, "results.csv"), "w") as f:
    f.write("                  epoch,         train/box_loss,      metrics/mAP50(B),"
            "   metrics/mAP50-95(B)\n")
for epoch in range(1, epochs + 1):
    time.sleep(0.6)
    with open(os.path.join(run, "weights", "last.pt"), "wb") as f:  # in place, every epoch
        f.write(os.urandom(6 * 1024 * 1024))
    if epoch == 1 or epoch % 2:
        with open(os.path.join(run, "weights", "best.pt"), "wb") as f:
            f.write(os.urandom(3 * 1024 * 1024))
    with open(os.path.join(run, "results.csv"), "a") as f:
        f.write(f"{epoch:>23},{1.6 / epoch ** 0.3:>23.5f},{0.1 * epoch ** 0.5:>22.5f},"
                f"{0.06 * epoch ** 0.5:>22.5f}\n")
    print(f"epoch {epoch}/{epochs} done", flush=True)
    if epoch == crash_at:
        print("RuntimeError: CUDA error: an illegal memory access was encountered",
              file=sys.stderr, flush=True)
        sys.exit(1)
'''


def asyncsync(*args: str, env: dict[str, str]) -> int:
    command = [str(Path(sys.executable).parent / "asyncsync"), *args]
    shown = " ".join(shlex.quote(a) for a in ["asyncsync", *args])
    print(f"\n$ {shown}", flush=True)
    return subprocess.run(command, env=env, check=False).returncode


def same_tree(left: Path, right: Path) -> bool:
    """Every file of ``left`` is in ``right`` with the same bytes."""
    for path in left.rglob("*"):
        if path.is_file():
            twin = right / path.relative_to(left)
            if not twin.is_file() or not filecmp.cmp(path, twin, shallow=False):
                return False
    return True


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="asyncsync-demo-") as work:
        root = Path(work)
        os.chdir(root)  # the commands below read as a user would type them
        Path("train.py").write_text(TRAINING)
        print(f"Demo directory: {root}")
        with SeaweedFS(data_dir=root / "seaweedfs") as s3:
            print(f"SeaweedFS S3 gateway on {s3.endpoint}")
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(s3.env())
            env["ASYNCSYNC_STATE_DIR"] = str(root / "state")
            s3.client().create_bucket(Bucket=BUCKET)

            print("\n1. A training runs under asyncsync, which mirrors runs/ while it writes,"
                  " and crashes at epoch 3.")
            code = asyncsync("run", "runs", DESTINATION, "--settle", "0.5",
                             "--checkpoint-interval", "0", "--", sys.executable, "train.py",
                             "runs", env=env)
            print(f"(the training exited with {code}; asyncsync run passes its exit code on)")

            print("\n2. What is in the bucket, and how did each run end?")
            asyncsync("runs", DESTINATION, env=env)

            print("\n3. A clean machine: pull the run back.")
            asyncsync("pull", DESTINATION, "restored", env=env)
            if not same_tree(root / "runs", root / "restored"):
                print("the restored run differs from the original", file=sys.stderr)
                return 1
            print("restored/ holds the run byte for byte: epoch 3's last.pt, results.csv"
                  " with 3 epochs, args.yaml")

            print("\n4. Push the original again: the manifest knows every file, nothing is"
                  " sent.")
            asyncsync("push", "runs", DESTINATION, env=env)
            print("\nStopping SeaweedFS and removing the demo directory.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
