"""`status`: what the local manifest knows, per destination and source and per run directory,
compared with the disk; no network at all.

The manifest is opened read-only (a WAL reader: a watch daemon may hold it open for writing),
and read with a second read-only connection of its own for the queries `Manifest` has no
method for. A manifest row says that a key of a bucket of a store holds the content of a local
file, which had a size, mtime and inode when it was sent. Neither the source root nor the
prefix is recorded: a row's path and its key share their last path segments (the path
relative to the source), so the rest of each names the pair, and the pair's root is then the
deepest directory that holds every file recorded for it (never one below a run directory).
Each row's file is stat()ed: still as recorded (in sync), changed since (modified), or gone
(local cleanup deleted it, or it was removed); the pair's root is walked for files with no
row (new). A run directory is a directory holding results.csv, args.yaml or weights/. A
file whose last upload failed has a row of its own (failures) until an upload succeeds: it
is counted failed, and pending as every file the next push or watch would send.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..config import default_state_dir
from ..errors import EXIT_OK, ManifestError
from ..names import printable
from ..options import Settings
from ..pipeline.session import open_manifest
from ..report import human_bytes

MARKERS = frozenset({"results.csv", "args.yaml"})
WEIGHTS = "weights"
# Keys per query of the walk (SQLite allows at least 999 parameters).
KEYS_PER_QUERY = 500


@dataclass(frozen=True)
class StatusConfig:
    state_dir: Path
    json: bool = False


def status_config_from(settings: Settings) -> StatusConfig:
    state_dir = settings["state_dir"] or default_state_dir()
    return StatusConfig(state_dir.absolute(), json=settings["json"])


@dataclass
class Counts:
    """Files of a directory, a run or a pair, as the manifest and the disk show them."""

    uploaded: int = 0  # rows: in the bucket, as far as the manifest knows
    in_sync: int = 0  # rows whose file still has the recorded stat
    modified: int = 0  # rows whose file changed since its upload
    gone: int = 0  # rows whose file is no longer there
    new: int = 0  # files with no row
    resumable: int = 0  # multipart uploads begun and not completed (they resume)
    failed: int = 0  # files whose last upload failed
    bytes: int = 0  # the recorded (original) sizes of the rows
    pending_bytes: int = 0  # the local sizes of the modified and new files
    last_sync: float | None = None  # the newest upload

    def add(self, other: Counts) -> None:
        for name in ("uploaded", "in_sync", "modified", "gone", "new", "resumable", "failed",
                     "bytes", "pending_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.last_sync is not None:
            self.last_sync = max(self.last_sync or 0.0, other.last_sync)

    @property
    def pending(self) -> int:
        return self.modified + self.new

    def as_json(self) -> dict[str, Any]:
        return {
            "files": self.uploaded + self.new, "uploaded": self.uploaded,
            "in_sync": self.in_sync, "modified": self.modified, "new": self.new,
            "pending": self.pending, "gone": self.gone, "resumable": self.resumable,
            "failed": self.failed, "bytes": self.bytes, "pending_bytes": self.pending_bytes,
            "last_sync": _iso(self.last_sync),
        }


@dataclass
class Pair:
    """One (store, bucket, source root) the manifest holds rows of, and what they show."""

    store: str
    bucket: str
    root: str | None  # None: rows whose path and key share no file name
    prefix: str
    directories: dict[str, Counts] = field(default_factory=dict)  # relative to root
    runs: set[str] = field(default_factory=set)  # run directories, relative to root

    def counts(self, directory: str) -> Counts:
        found = self.directories.get(directory)
        if found is None:
            found = self.directories[directory] = Counts()
        return found

    def note(self, directory: str, names: set[str] | frozenset[str]) -> None:
        """The directory holds these files: is it (or its parent) a run directory?"""
        if names & MARKERS:
            self.runs.add(directory)
        parent, _, name = directory.rpartition("/")
        if name == WEIGHTS:
            self.runs.add(parent)

    @property
    def destination(self) -> str:
        scheme = "file://" if self.store == "file" else "s3://"
        return scheme + self.bucket + (f"/{self.prefix}" if self.prefix else "")

    def local(self, relative: str) -> str | None:
        return os.path.join(self.root, relative) if self.root is not None else None

    def rebase(self) -> None:
        """Root and prefix down to the deepest directory holding every row, never below a
        run directory. The rows cannot tell ``runs`` pushed to ``s3://b/runs`` from its
        parent pushed to the bucket's root (their mappings are the same): the deepest
        directory is the one that is surely the tree's, and the one walked for new files."""
        if self.root is None:
            return
        parts = [directory.split("/") if directory else []
                 for directory in (*self.directories, *self.runs)]
        common: list[str] = []
        for segments in zip(*parts, strict=False):
            if len(set(segments)) != 1:
                break
            common.append(segments[0])
        if not common:
            return
        shared = "/".join(common)
        self.root = os.path.join(self.root, shared)
        self.prefix = f"{self.prefix}/{shared}" if self.prefix else shared
        cut = len(shared) + 1
        self.directories = {directory[cut:]: counts
                            for directory, counts in self.directories.items()}
        self.runs = {run[cut:] for run in self.runs}


def split_row(source: str, key: str) -> tuple[str, str, str] | None:
    """(source root, prefix, relative path) of a row: its path and key cut where their
    common trailing segments begin; None when even the file names differ."""
    path, keys = source.split("/"), key.split("/")
    shared = 0
    while (shared < len(keys) and shared < len(path) - 1
           and path[-1 - shared] == keys[-1 - shared]):
        shared += 1
    if not shared or not source.startswith("/"):
        return None
    root = "/".join(path[:-shared]) or "/"
    return root, "/".join(keys[:-shared]), "/".join(keys[-shared:])


def _stat_of(path: str | None) -> os.stat_result | None:
    if path is None:
        return None
    try:
        return os.lstat(path)
    except OSError:
        return None


def _compare(counts: Counts, path: str | None, size: int, mtime_ns: int, inode: int,
             source: str) -> None:
    st = _stat_of(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        counts.gone += 1
    elif (path == source and st.st_size == size and st.st_mtime_ns == mtime_ns
          and st.st_ino == inode):
        counts.in_sync += 1
    else:
        counts.modified += 1
        counts.pending_bytes += st.st_size


def _record(pair: Pair, relative: str, row: tuple[Any, ...]) -> None:
    """One object row (source, size, mtime_ns, inode, uploaded_at) of the pair."""
    source, size, mtime_ns, inode, uploaded_at = row
    directory, _, name = relative.rpartition("/")
    counts = pair.counts(directory)
    counts.uploaded += 1
    counts.bytes += size
    if uploaded_at:
        counts.last_sync = max(counts.last_sync or 0.0, uploaded_at)
    pair.note(directory, {name})
    _compare(counts, pair.local(relative), size, mtime_ns, inode, source)


def _owner(pairs: dict[tuple[str, str, str | None, str], Pair], store: str, bucket: str,
           key: str) -> tuple[Pair, str]:
    """The pair a key lies under (the longest prefix), and its path below that prefix."""
    best: Pair | None = None
    for pair in pairs.values():
        if pair.store == store and pair.bucket == bucket and pair.root is not None and (
            not pair.prefix or key.startswith(pair.prefix + "/")
        ) and (best is None or len(pair.prefix) > len(best.prefix)):
            best = pair
    if best is None:
        best = pairs.setdefault((store, bucket, None, ""), Pair(store, bucket, None, ""))
    return best, key[len(best.prefix) + 1:] if best.prefix else key


def read_pairs(db: sqlite3.Connection) -> list[Pair]:
    """Every pair of the manifest, its rows compared with the disk."""
    pairs: dict[tuple[str, str, str | None, str], Pair] = {}
    strays: list[tuple[str, str, str, tuple[Any, ...]]] = []
    rows = db.execute("SELECT store, bucket, key, source, size, mtime_ns, inode, uploaded_at"
                      " FROM objects")
    for store, bucket, key, *row in rows:
        split = split_row(row[0], key)
        if split is None:
            # attach()'s checkpoint snapshots are sent from a staged copy until the final
            # flush: their rows belong with the run's other files.
            strays.append((store, bucket, key, tuple(row)))
            continue
        root, prefix, relative = split
        pair = pairs.get((store, bucket, root, prefix))
        if pair is None:
            pair = pairs[(store, bucket, root, prefix)] = Pair(store, bucket, root, prefix)
        _record(pair, relative, tuple(row))
    for store, bucket, key, row in strays:
        pair, relative = _owner(pairs, store, bucket, key)
        _record(pair, relative, row)
    for pair in pairs.values():
        pair.rebase()
    for store, bucket, key in db.execute("SELECT store, bucket, key FROM uploads"):
        pair, relative = _owner(pairs, store, bucket, key)
        pair.counts(relative.rpartition("/")[0]).resumable += 1
    for store, bucket, key in db.execute("SELECT store, bucket, key FROM failures"):
        pair, relative = _owner(pairs, store, bucket, key)
        pair.counts(relative.rpartition("/")[0]).failed += 1
    return sorted(pairs.values(), key=lambda p: (p.destination, p.store, p.root or ""))


def _files(directory: str) -> Iterator[tuple[str, int]]:
    """The regular files directly in a directory (name, size); links are not followed."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        yield entry.name, entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return


def _encodes(key: str) -> bool:
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def _same(path: str, other: Path) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def find_new(db: sqlite3.Connection, pair: Pair, state_dir: Path) -> None:
    """Walk the pair's root for files the manifest has no row of; the state directory is
    left out (push never sends it) and links are not followed."""
    if pair.root is None or not os.path.isdir(pair.root):
        return
    for directory, subdirectories, _ in os.walk(pair.root):
        subdirectories[:] = [name for name in subdirectories if not (
            name == state_dir.name and _same(os.path.join(directory, name), state_dir))]
        relative = os.path.relpath(directory, pair.root)
        relative = "" if relative == "." else relative.replace(os.sep, "/")
        files = dict(_files(directory))
        if not files:
            continue
        base = "/".join(part for part in (pair.prefix, relative) if part)
        keys = {(f"{base}/{name}" if base else name): name for name in files}
        known: set[str] = set()
        # A name that is not UTF-8 cannot have been recorded: its file is new.
        batch = [key for key in keys if _encodes(key)]
        for start in range(0, len(batch), KEYS_PER_QUERY):
            chunk = batch[start:start + KEYS_PER_QUERY]
            known.update(key for (key,) in db.execute(
                "SELECT key FROM objects WHERE store=? AND bucket=? AND key IN"
                f" ({','.join('?' * len(chunk))})", (pair.store, pair.bucket, *chunk)))
        new = [name for key, name in keys.items() if key not in known]
        pair.note(relative, set(files))
        if new:
            counts = pair.counts(relative)
            counts.new += len(new)
            counts.pending_bytes += sum(files[name] for name in new)


def run_of_directory(directory: str, runs: set[str]) -> str | None:
    """The deepest run directory that is ``directory`` or holds it."""
    candidate = directory
    while True:
        if candidate in runs:
            return candidate
        if not candidate:
            return None
        candidate = candidate.rpartition("/")[0]


def describe(pair: Pair) -> dict[str, Any]:
    """The pair as `status --json` prints it (the fields README documents)."""
    total, outside = Counts(), Counts()
    runs: dict[str, Counts] = {}
    for directory, counts in pair.directories.items():
        total.add(counts)
        run = run_of_directory(directory, pair.runs)
        if run is None:
            outside.add(counts)
        else:
            runs.setdefault(run, Counts()).add(counts)
    return {
        "destination": pair.destination, "store": pair.store, "bucket": pair.bucket,
        "prefix": pair.prefix, "source": pair.root, **total.as_json(),
        "runs": [{"run": run, "path": pair.local(run) if run else pair.root,
                  **runs[run].as_json()} for run in sorted(runs)],
        "outside_runs": outside.as_json() if outside.uploaded or outside.new else None,
    }


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _when(text: str | None) -> str:
    return text.replace("T", " ").removesuffix("Z")[:16] if text else "-"


def text_lines(described: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for pair in described:
        source = printable(pair["source"] or "(files sent from elsewhere)")
        where = "" if pair["store"] == "file" else f" (store {printable(pair['store'])})"
        lines.append(f"{source} -> {printable(pair['destination'])}{where}")
        pending = f"{pair['pending']} pending"
        if pair["pending"]:
            pending += (f" ({pair['modified']} modified, {pair['new']} new,"
                        f" {human_bytes(pair['pending_bytes'])})")
        resumable = f", {pair['resumable']} resumable" if pair["resumable"] else ""
        lines.append(f"  {pair['files']} files: {pair['uploaded']} uploaded"
                     f" ({human_bytes(pair['bytes'])}), {pending}, {pair['failed']} failed,"
                     f" {pair['gone']} gone{resumable}; last sync {_when(pair['last_sync'])}"
                     " UTC")
        rows = [["RUN", "FILES", "UPLOADED", "PENDING", "FAILED", "GONE", "BYTES",
                 "LAST SYNC"]]
        entries = list(pair["runs"])
        if pair["outside_runs"] is not None and entries:
            entries.append({"run": "(outside runs)", **pair["outside_runs"]})
        for run in entries:
            rows.append([printable(run["run"] or "."), str(run["files"]), str(run["uploaded"]),
                         str(run["pending"]), str(run["failed"]), str(run["gone"]),
                         human_bytes(run["bytes"]),
                         _when(run["last_sync"])])
        if entries:
            widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
            lines.extend("  " + "  ".join(cell.ljust(width) for cell, width
                                          in zip(row, widths, strict=True)).rstrip()
                         for row in rows)
    return lines


def _connect(path: Path) -> sqlite3.Connection:
    """A second read-only connection, as `Manifest` opens its own (a WAL reader)."""
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                             isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
    except sqlite3.Error as exc:
        raise ManifestError(f"manifest {str(path)!r} cannot be opened: {exc}") from exc
    return db


def collect(config: StatusConfig) -> dict[str, Any]:
    """The state as `status --json` prints it. A missing or unreadable manifest raises
    ManifestError (exit 2)."""
    with open_manifest(config.state_dir, read_only=True) as manifest:  # checks file, schema
        db = _connect(manifest.path)
        try:
            pairs = read_pairs(db)
            for pair in pairs:
                find_new(db, pair, config.state_dir)
        except sqlite3.Error as exc:
            raise ManifestError(f"manifest {str(manifest.path)!r}: {exc}") from exc
        finally:
            db.close()
    return {"state_dir": str(config.state_dir), "manifest": str(manifest.path),
            "destinations": [describe(pair) for pair in pairs]}


def run_status(config: StatusConfig, out: TextIO | None = None) -> int:
    """Print the state; 0. A missing manifest raises ManifestError (exit 2)."""
    stream = out or sys.stdout
    state = collect(config)
    if config.json:
        stream.write(json.dumps(state, ensure_ascii=False) + "\n")
    elif state["destinations"]:
        stream.write("\n".join(text_lines(state["destinations"])) + "\n")
    else:
        stream.write(f"{printable(state['manifest'])}: no uploads recorded\n")
    return EXIT_OK
