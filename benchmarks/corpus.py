"""Deterministic benchmark corpora: the trees that `run.py` uploads.

Five shapes, each generated from a fixed seed so every machine and every run measures the
same bytes:

* ``runs``  - 12 YOLOv8-shaped run directories (``train``, ``train2``, ...), ~1 GB in all:
  args.yaml, results.csv, ~11 plots and batch images, weights/best.pt and weights/last.pt.
* ``small`` - 10,000 files of 4 KiB in 100 directories: per-request overhead dominates.
* ``large`` - one 1 GiB file: multipart throughput dominates.
* ``noop``  - 100,000 files of a few dozen bytes in 100 directories: the tree whose *no-op
  re-sync* is measured (what a sync after each epoch costs when nothing changed); its upload is
  only the setup.
* ``noop1m`` - the same at a million: 1,000,000 such files in 1,000 directories. Opt-in (not in
  DEFAULT_CORPORA): generating it takes minutes and ~4 GB of disk blocks, uploading it as setup
  20-30 minutes.

Binary content (images, weights, the large file) is random, hence incompressible, as real JPEG,
PNG and float32 checkpoints nearly are; text files are text. ``scale`` shrinks every corpus for
a quick smoke run. A corpus is generated once under the work dir and reused while its marker
file (written last, *beside* the tree so that it is never uploaded) matches the requested spec.

Usable as a script: ``python benchmarks/corpus.py [--scale 0.05] [--work-dir DIR] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORK_DIR = Path(__file__).resolve().parent / "work"
CORPORA = ("runs", "small", "large", "noop", "noop1m")
# What runs when no corpus is named: noop1m only when asked for.
DEFAULT_CORPORA = ("runs", "small", "large", "noop")
# Bumped whenever a generator changes, so stale trees are regenerated rather than reused.
GENERATOR_VERSION = 2  # checkpoints are real zip archives

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# random.randbytes in chunks: bounded memory for the 1 GiB file, still ~200 MB/s.
_CHUNK = 8 * MiB


@dataclass(frozen=True)
class Corpus:
    """A generated tree: where it is, and what it holds (for checking uploads)."""

    name: str
    path: Path
    files: int
    bytes: int


def _write_random(path: Path, size: int, rng: random.Random, magic: bytes = b"") -> None:
    """`size` incompressible bytes, starting with a file-type signature where one is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        head = magic[:size]
        out.write(head)
        left = size - len(head)
        while left > 0:
            n = min(left, _CHUNK)
            out.write(rng.randbytes(n))
            left -= n


_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
_PNG = b"\x89PNG\r\n\x1a\n"

# (name, signature, size in KiB at scale 1): the plots and mosaics of a YOLOv8 detect run.
_RUN_IMAGES: tuple[tuple[str, bytes, int], ...] = (
    ("labels.jpg", _JPEG, 180),
    ("train_batch0.jpg", _JPEG, 420),
    ("train_batch1.jpg", _JPEG, 460),
    ("train_batch2.jpg", _JPEG, 440),
    ("val_batch0_labels.jpg", _JPEG, 380),
    ("val_batch0_pred.jpg", _JPEG, 390),
    ("val_batch1_labels.jpg", _JPEG, 360),
    ("val_batch1_pred.jpg", _JPEG, 370),
    ("results.png", _PNG, 250),
    ("confusion_matrix.png", _PNG, 110),
    ("BoxPR_curve.png", _PNG, 80),
)
_RUN_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("weights/best.pt", 22 * MiB),
    ("weights/last.pt", 65 * MiB),
)
RUN_COUNT = 12

_ARGS_KEYS = (
    "task: detect\nmode: train\nmodel: yolov8n.yaml\ndata: coco8.yaml\n"
    "epochs: {epochs}\ntime: null\npatience: 100\nbatch: 16\nimgsz: 640\nsave: true\n"
    "save_period: -1\ncache: false\ndevice: '0'\nworkers: 8\nproject: null\nname: {name}\n"
    "exist_ok: false\npretrained: true\noptimizer: auto\nverbose: true\nseed: {seed}\n"
    "deterministic: true\nsingle_cls: false\nrect: false\ncos_lr: false\nclose_mosaic: 10\n"
    "resume: false\namp: true\nfraction: 1.0\nprofile: false\nfreeze: null\n"
    "multi_scale: false\noverlap_mask: true\nmask_ratio: 4\ndropout: 0.0\nval: true\n"
    "split: val\nsave_json: false\nconf: null\niou: 0.7\nmax_det: 300\nhalf: false\n"
    "dnn: false\nplots: true\nsource: null\nvid_stride: 1\nstream_buffer: false\n"
    "visualize: false\naugment: false\nagnostic_nms: false\nclasses: null\n"
    "retina_masks: false\nembed: null\nshow: false\nsave_frames: false\nsave_txt: false\n"
    "save_conf: false\nsave_crop: false\nshow_labels: true\nshow_conf: true\n"
    "show_boxes: true\nline_width: null\nformat: torchscript\nkeras: false\n"
    "optimize: false\nint8: false\ndynamic: false\nsimplify: true\nopset: null\n"
    "workspace: null\nnms: false\nlr0: {lr0}\nlrf: 0.01\nmomentum: 0.937\n"
    "weight_decay: 0.0005\nwarmup_epochs: 3.0\nwarmup_momentum: 0.8\nwarmup_bias_lr: 0.1\n"
    "box: 7.5\ncls: 0.5\ndfl: 1.5\npose: 12.0\nkobj: 1.0\nnbs: 64\nhsv_h: 0.015\n"
    "hsv_s: 0.7\nhsv_v: 0.4\ndegrees: 0.0\ntranslate: 0.1\nscale: 0.5\nshear: 0.0\n"
    "perspective: 0.0\nflipud: 0.0\nfliplr: 0.5\nbgr: 0.0\nmosaic: 1.0\nmixup: 0.0\n"
    "copy_paste: 0.0\nauto_augment: randaugment\nerasing: 0.4\ncfg: null\ntracker: botsort.yaml\n"
    "save_dir: runs/detect/{name}\n"
)

_RESULTS_HEADER = (
    "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),"
    "metrics/recall(B),metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,"
    "val/dfl_loss,lr/pg0,lr/pg1,lr/pg2\n"
)


def _results_csv(rng: random.Random, epochs: int) -> str:
    """results.csv as ultralytics writes it: one line per epoch, losses falling, mAP rising."""
    lines = [_RESULTS_HEADER]
    for epoch in range(1, epochs + 1):
        progress = epoch / epochs
        loss = [round(v * (1.2 - 0.6 * progress) + rng.uniform(-0.02, 0.02), 5)
                for v in (1.4, 1.9, 1.2)]
        metrics = [round(min(1.0, v * (0.2 + 0.8 * progress) + rng.uniform(-0.01, 0.01)), 5)
                   for v in (0.8, 0.7, 0.75, 0.55)]
        val = [round(v * (1.1 - 0.5 * progress) + rng.uniform(-0.02, 0.02), 5)
               for v in (1.3, 1.5, 1.1)]
        lr = round(0.01 * (1 - 0.99 * progress), 6)
        row = [epoch, round(42.0 * epoch + rng.uniform(0, 3), 3), *loss, *metrics, *val,
               lr, lr, lr]
        lines.append(",".join(str(v) for v in row) + "\n")
    return "".join(lines)


def _scaled(size: int, scale: float, floor: int = 1 * KiB) -> int:
    return max(floor, int(size * scale))


def _gen_runs(root: Path, scale: float) -> None:
    for index in range(RUN_COUNT):
        name = "train" if index == 0 else f"train{index + 1}"
        run = root / name
        # One RNG per run: a run's bytes do not depend on how many runs came before it.
        rng = random.Random(f"runs/{name}")
        run.mkdir(parents=True, exist_ok=True)
        epochs = 30
        (run / "args.yaml").write_text(
            _ARGS_KEYS.format(name=name, epochs=epochs, seed=index,
                              lr0=round(0.01 * (1 + index / 10), 4))
        )
        (run / "results.csv").write_text(_results_csv(rng, epochs))
        for filename, magic, kib in _RUN_IMAGES:
            # +-10% so that no two runs have identical sizes (real plots vary too).
            size = int(kib * KiB * rng.uniform(0.9, 1.1))
            _write_random(run / filename, _scaled(size, scale), rng, magic)
        for filename, size in _RUN_WEIGHTS:
            _write_checkpoint(run / filename, _scaled(size, scale), rng)


def _write_checkpoint(path: Path, size: int, rng: random.Random) -> None:
    """A zip archive shaped like torch.save's (a small pickle, one large tensor storage,
    stored uncompressed), about `size` bytes: the uploader checks its central directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}/data.pkl", rng.randbytes(4 * KiB))
        archive.writestr(f"{stem}/version", b"3\n")
        with archive.open(f"{stem}/data/0", "w", force_zip64=True) as storage:
            left = max(0, size - 8 * KiB)
            while left > 0:
                n = min(left, _CHUNK)
                storage.write(rng.randbytes(n))
                left -= n


SMALL_FILES = 10_000
SMALL_DIRS = 100
SMALL_SIZE = 4 * KiB


def _gen_small(root: Path, scale: float) -> None:
    rng = random.Random("small")
    count = max(SMALL_DIRS, int(SMALL_FILES * scale))
    per_dir = count // SMALL_DIRS
    for d in range(SMALL_DIRS):
        directory = root / f"d{d:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        for f in range(per_dir):
            (directory / f"f{f:04d}.bin").write_bytes(rng.randbytes(SMALL_SIZE))


LARGE_SIZE = 1 * GiB


def _gen_large(root: Path, scale: float) -> None:
    _write_random(root / "large.bin", _scaled(LARGE_SIZE, scale, 1 * MiB), random.Random("large"))


NOOP_FILES = 100_000
NOOP_DIRS = 100


def _gen_noop(root: Path, scale: float) -> None:
    """Tiny text files (a few dozen bytes each): the tree's size is all in its file count."""
    _gen_tiny(root, "noop", max(NOOP_DIRS, int(NOOP_FILES * scale)), NOOP_DIRS)


NOOP1M_FILES = 1_000_000
NOOP1M_DIRS = 1_000


def _gen_noop1m(root: Path, scale: float) -> None:
    """noop's files, a million of them: 1,000 directories of 1,000."""
    _gen_tiny(root, "noop1m", max(NOOP1M_DIRS, int(NOOP1M_FILES * scale)), NOOP1M_DIRS)


def _gen_tiny(root: Path, seed: str, count: int, dirs: int) -> None:
    """`count` one-line text files spread evenly over `dirs` directories (os-level calls,
    fewer Python objects per file: a million of them for noop1m)."""
    rng = random.Random(seed)
    per_dir = count // dirs
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for d in range(dirs):
        directory = root / f"d{d:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        base = os.fspath(directory)
        for f in range(per_dir):
            line = f"d{d:03d}/f{f:04d} step={rng.randrange(10**6)} loss={rng.random():.6f}\n"
            fd = os.open(os.path.join(base, f"f{f:04d}.txt"), flags, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


_GENERATORS: dict[str, Callable[[Path, float], None]] = {
    "runs": _gen_runs,
    "small": _gen_small,
    "large": _gen_large,
    "noop": _gen_noop,
    "noop1m": _gen_noop1m,
}


def _tree_stats(root: Path) -> tuple[int, int]:
    files = 0
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                total += st.st_size
    return files, total


def corpus_dir(name: str, scale: float, work_dir: Path = DEFAULT_WORK_DIR) -> Path:
    suffix = "" if scale == 1.0 else f"-x{scale:g}"
    return work_dir / "corpora" / f"{name}{suffix}"


def ensure(name: str, scale: float = 1.0, work_dir: Path = DEFAULT_WORK_DIR) -> Corpus:
    """The corpus `name` at `scale`, generated now unless a complete copy is already there."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    root = corpus_dir(name, scale, work_dir)
    marker = root.with_name(root.name + ".json")
    spec = {"name": name, "scale": scale, "version": GENERATOR_VERSION}
    if marker.exists() and root.is_dir():
        saved = json.loads(marker.read_text())
        if saved.get("spec") == spec:
            return Corpus(name, root, int(saved["files"]), int(saved["bytes"]))
    # Anything left without a matching marker is partial or stale: start over.
    marker.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _GENERATORS[name](root, scale)
    files, total = _tree_stats(root)
    marker.write_text(json.dumps({"spec": spec, "files": files, "bytes": total}) + "\n")
    return Corpus(name, root, files, total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    # No `choices=`: argparse checks a list default against it as one value, and fails.
    parser.add_argument("names", nargs="*", default=list(DEFAULT_CORPORA), metavar="NAME",
                        help=f"corpora to generate (default: {' '.join(DEFAULT_CORPORA)}; "
                             f"also: {' '.join(c for c in CORPORA if c not in DEFAULT_CORPORA)})")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink factor (default 1)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
    for name in args.names:
        corpus = ensure(name, args.scale, args.work_dir)
        print(f"{corpus.name}: {corpus.files} files, {corpus.bytes / 1e6:.1f} MB in {corpus.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
