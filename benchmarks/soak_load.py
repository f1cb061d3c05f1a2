"""The soak's load: simulated trainings that write ultralytics-shaped runs, and the checks
that tell a complete version of each of their files from a torn one.

Each training is a thread writing one run directory the way ultralytics does: args.yaml at
the start; results.csv appended once per epoch (one write() per row); weights/last.pt
truncated and rewritten in place every epoch and weights/best.pt on improvement, each a zip
archive shaped like torch.save's whose `soak.json` member names its version and the xxh3
digest of its tensor storage; plot PNGs rewritten from a background thread; at the end a
smaller, "stripped" last.pt and best.pt. Some trainings restart with exist_ok (results.csv
recreated from its header), some have their directory deleted and recreated (a DDP
launcher's fresh start). Every file carries its own proof of completeness, so a reader of
the bucket needs nothing but the object to say whether it is whole.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

MiB = 1024 * 1024
_PIECE = MiB
# Tensor storages are slices of one shared random pool (generating 40 MB of random bytes per
# epoch per training would cost more CPU than the daemon under test); each version starts
# with its own header, at its own offset into the pool, so no two versions are alike.
_POOL = random.Random(0x50AC).randbytes(16 * MiB)
CSV_HEADER = "epoch,train/box_loss,metrics/mAP50(B),crc\n"
PLOT_NAMES = ("results.png", "confusion_matrix.png", "labels.jpg.png", "PR_curve.png")


@dataclass(frozen=True)
class LoadShape:
    """How big and how fast the simulated trainings are."""

    trainings: int  # run at once; a finished one is replaced by a new run
    checkpoint_min: int  # bytes
    checkpoint_max: int
    epoch_min_s: float
    epoch_max_s: float
    epochs_min: int
    epochs_max: int
    restart_chance: float  # per epoch: exist_ok restart (results.csv recreated)
    recreate_chance: float  # per epoch: the run directory deleted and recreated (DDP)
    plot_period_s: float


@dataclass
class Recreation:
    """A results.csv replaced by a fresh one: what it held just before."""

    relative: str
    previous: bytes
    at: float
    in_place: bool  # an exist_ok restart (same file, truncated); else a new directory


@dataclass
class LoadLog:
    """What the trainings did, shared by all of them (append under the lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    runs_started: int = 0
    runs_finished: int = 0
    epochs: int = 0
    checkpoint_versions: int = 0
    bytes_written: int = 0
    restarts: int = 0
    recreations: int = 0
    recreated: list[Recreation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"runs_started": self.runs_started, "runs_finished": self.runs_finished,
                    "epochs": self.epochs, "checkpoint_versions": self.checkpoint_versions,
                    "bytes_written": self.bytes_written, "restarts": self.restarts,
                    "recreations": self.recreations, "training_errors": len(self.errors)}

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


# -- the formats, and their completeness checks -----------------------------------------------


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def csv_row(epoch: int, rng: random.Random) -> str:
    fields = f"{epoch},{rng.uniform(0.1, 3.0):.5f},{rng.uniform(0.0, 1.0):.5f}"
    return f"{fields},{_crc(fields)}\n"


def args_yaml(name: str, epochs: int, generation: int) -> bytes:
    body = (f"task: detect\nmode: train\nmodel: yolov8n.yaml\nname: {name}\n"
            f"epochs: {epochs}\nexist_ok: true\ngeneration: {generation}\n")
    return f"{body}checksum: {_crc(body)}\n".encode()


def png(width: int, height: int, rng: random.Random) -> bytes:
    """A real (grey, 8-bit) PNG: every chunk carries its CRC, the last one is IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    row = bytes(width)
    rows = b"".join(b"\0" + (rng.randbytes(width // 4) + row)[:width] for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


def write_checkpoint(path: Path, size: int, version: int, run: str) -> int:
    """torch.save over ``path``: truncated and rewritten in place, streamed in pieces (no
    temp file, no rename), a zip whose last member proves the rest. Returns the bytes."""
    stem = path.stem
    offset = (version * 7919 * 4096) % (len(_POOL) - _PIECE)
    header = f"{run}/{path.name} version {version}\n".encode()
    digest = xxhash.xxh3_128()
    mode = "r+b" if path.exists() else "wb"
    with open(path, mode) as raw:
        raw.truncate(0)
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{stem}/data.pkl", header * 64)
            with archive.open(f"{stem}/data/0", "w", force_zip64=True) as storage:
                storage.write(header)
                digest.update(header)
                left = size - len(header)
                while left > 0:
                    start = offset % (len(_POOL) - _PIECE)
                    piece = _POOL[start:start + min(left, _PIECE)]
                    storage.write(piece)
                    digest.update(piece)
                    raw.flush()
                    left -= len(piece)
                    offset += len(piece) + 4099
            proof = {"run": run, "file": path.name, "version": version, "size": size,
                     "xxh3_128": digest.hexdigest()}
            archive.writestr(f"{stem}/soak.json", json.dumps(proof))
        return raw.tell()


def torn_reason(key: str, body: bytes) -> str | None:
    """None when ``body`` is a complete version of the file ``key`` names, else why not."""
    name = key.rsplit("/", 1)[-1]
    try:
        if name.endswith(".pt"):
            return _checkpoint_torn(body)
        if name.endswith(".csv"):
            return _csv_torn(body.decode())
        if name.endswith(".yaml"):
            text = body.decode()
            head, _, tail = text.rpartition("checksum: ")
            return None if tail == f"{_crc(head)}\n" else "args.yaml checksum line missing"
        if name.endswith(".png"):
            return _png_torn(body)
    except (UnicodeDecodeError, ValueError, KeyError, zipfile.BadZipFile, struct.error) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _checkpoint_torn(body: bytes) -> str | None:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = archive.namelist()
        proof_name = next((n for n in names if n.endswith("/soak.json")), None)
        if proof_name is None:
            return f"no soak.json member among {names}"
        proof = json.loads(archive.read(proof_name))
        data = archive.read(proof_name.replace("soak.json", "data/0"))
    if len(data) != proof["size"]:
        return f"tensor of {len(data)} bytes, version {proof['version']} says {proof['size']}"
    if xxhash.xxh3_128_hexdigest(data) != proof["xxh3_128"]:
        return f"tensor digest differs from version {proof['version']}'s"
    return None


def _csv_torn(text: str) -> str | None:
    if not text.startswith(CSV_HEADER):
        return "results.csv without its header"
    if not text.endswith("\n"):
        return "results.csv ends inside a row"
    for line in text[len(CSV_HEADER):].splitlines():
        fields, _, crc = line.rpartition(",")
        if crc != _crc(fields):
            return f"results.csv row {line!r} is torn"
    return None


def _png_torn(body: bytes) -> str | None:
    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "no PNG signature"
    at = 8
    while at < len(body):
        (length,) = struct.unpack(">I", body[at:at + 4])
        kind, data = body[at + 4:at + 8], body[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", body[at + 8 + length:at + 12 + length])
        if len(data) != length or zlib.crc32(kind + data) != crc:
            return f"PNG chunk {kind!r} torn"
        at += 12 + length
        if kind == b"IEND":
            return None if at == len(body) else "bytes after IEND"
    return "PNG without IEND"


# -- the trainings ---------------------------------------------------------------------------


class Training(threading.Thread):
    """One simulated ultralytics training of one run directory."""

    def __init__(self, root: Path, name: str, shape: LoadShape, seed: int, log: LoadLog,
                 stop: threading.Event) -> None:
        super().__init__(name=f"training-{name}", daemon=True)
        self.run_dir = root / name
        self.run_name = name
        self.shape = shape
        self.rng = random.Random(seed)
        self.log = log
        self.stop_requested = stop
        self.version = 0
        self.generation = 0
        self._plots_stop = threading.Event()
        # The plot thread writes into the run directory that a recreation deletes: rmtree
        # fails (ENOTEMPTY) when a plot lands in it meanwhile, which killed a training.
        self._directory = threading.Lock()

    def run(self) -> None:
        try:
            self._train()
        except Exception as exc:  # a training that dies must show in the figures, not hide
            self.log.errors.append(f"{self.run_name}: {type(exc).__name__}: {exc}")
        finally:
            self._plots_stop.set()
            self.log.add(runs_finished=1)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless told to stop; True when the training should go on."""
        return not self.stop_requested.wait(seconds)

    def _start_generation(self, epochs: int) -> None:
        (self.run_dir / "weights").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "args.yaml").write_bytes(args_yaml(self.run_name, epochs,
                                                           self.generation))
        (self.run_dir / "results.csv").write_text(CSV_HEADER)

    def _recreate(self, epochs: int, delete_directory: bool) -> None:
        csv_path = self.run_dir / "results.csv"
        previous = csv_path.read_bytes()
        relative = f"{self.run_name}/results.csv"
        self.generation += 1
        if delete_directory:
            with self._directory:
                shutil.rmtree(self.run_dir)
        with self.log.lock:
            self.log.recreated.append(Recreation(relative, previous, time.time(),
                                                  not delete_directory))
        self.log.add(recreations=int(delete_directory), restarts=int(not delete_directory))
        self._start_generation(epochs)

    def _checkpoint(self, name: str, size: int) -> None:
        self.version += 1
        written = write_checkpoint(self.run_dir / "weights" / name, size, self.version,
                                   self.run_name)
        self.log.add(checkpoint_versions=1, bytes_written=written)

    def _train(self) -> None:
        shape, rng = self.shape, self.rng
        epochs = rng.randint(shape.epochs_min, shape.epochs_max)
        size = rng.randint(shape.checkpoint_min, shape.checkpoint_max)
        self.log.add(runs_started=1)
        self._start_generation(epochs)
        plots = threading.Thread(target=self._plot, name=f"plots-{self.run_name}", daemon=True,
                                 args=(random.Random(rng.random()),))
        plots.start()
        best = float("inf")
        for epoch in range(1, epochs + 1):
            if not self._sleep(rng.uniform(shape.epoch_min_s, shape.epoch_max_s)):
                break
            with open(self.run_dir / "results.csv", "a") as csv:
                csv.write(csv_row(epoch, rng))
            self.log.add(epochs=1)
            self._checkpoint("last.pt", size)
            loss = rng.random()
            if loss < best:
                best = loss
                self._checkpoint("best.pt", size)
            chance = rng.random()
            if chance < shape.recreate_chance:
                self._recreate(epochs, delete_directory=True)
            elif chance < shape.recreate_chance + shape.restart_chance:
                self._recreate(epochs, delete_directory=False)
        self._plots_stop.set()
        plots.join()
        # strip_optimizer(): the final weights, smaller, written over both files.
        self._checkpoint("last.pt", max(64 * 1024, size // 3))
        self._checkpoint("best.pt", max(64 * 1024, size // 3))

    def _plot(self, rng: random.Random) -> None:
        while not self._plots_stop.wait(rng.uniform(0.5, 1.5) * self.shape.plot_period_s):
            name = rng.choice(PLOT_NAMES)
            image = png(rng.randint(64, 320), rng.randint(64, 320), rng)
            try:
                with self._directory:
                    (self.run_dir / name).write_bytes(image)
            except FileNotFoundError:
                continue  # the run directory is being recreated right now
            self.log.add(bytes_written=len(image))


class Fleet:
    """Keeps ``shape.trainings`` trainings running; a finished one makes way for a new run."""

    def __init__(self, root: Path, shape: LoadShape, seed: int) -> None:
        self.root = root
        self.shape = shape
        self.rng = random.Random(seed)
        self.log = LoadLog()
        self.stop_requested = threading.Event()
        self.trainings: list[Training] = []

    def _launch(self) -> None:
        name = f"train{len(self.trainings) + 1}"
        training = Training(self.root, name, self.shape, self.rng.getrandbits(64), self.log,
                            self.stop_requested)
        self.trainings.append(training)
        training.start()

    def tick(self) -> None:
        """Replace finished trainings (called about once a second)."""
        if self.stop_requested.is_set():
            return
        running = sum(t.is_alive() for t in self.trainings)
        for _ in range(self.shape.trainings - running):
            self._launch()

    def stop(self, timeout: float = 120.0) -> None:
        """Every training writes its final weights and ends."""
        self.stop_requested.set()
        deadline = time.monotonic() + timeout
        for training in self.trainings:
            training.join(max(0.1, deadline - time.monotonic()))
        alive = [t.run_name for t in self.trainings if t.is_alive()]
        if alive:
            raise RuntimeError(f"trainings did not end: {alive}")
