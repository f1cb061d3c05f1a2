"""What both peer drivers share: the command line, the corpus walk, the keys, the summary.

Standard library only: run.py's unit tests import it from the main virtualenv, which has
neither obstore nor awscrt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
PART_SIZE = 8 * MiB  # every multipart upload's part size, as asyncsync's default for these sizes


@dataclass(frozen=True)
class Upload:
    path: str  # the local file
    key: str  # prefix + its path relative to the corpus root, POSIX
    size: int


@dataclass(frozen=True)
class Args:
    src: Path
    bucket: str
    prefix: str  # without a trailing slash; "" for the bucket's root
    workers: int


def parse_args(argv: list[str] | None, description: str) -> Args:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("src", type=Path, help="the directory to upload")
    parser.add_argument("dest", help="s3://BUCKET/PREFIX")
    parser.add_argument("--workers", type=int, default=32,
                        help="requests in flight, all files' parts together (default 32)")
    args = parser.parse_args(argv)
    bucket, prefix = split_url(args.dest)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a directory")
    if args.workers < 1:
        parser.error("--workers must be positive")
    return Args(args.src, bucket, prefix, args.workers)


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix/ -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise SystemExit(f"not an s3:// URL: {url}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise SystemExit(f"no bucket in {url}")
    return bucket, prefix.strip("/")


def key_for(prefix: str, relative: str) -> str:
    """The object key every tool of the benchmark gives a file: prefix/relative/path."""
    relative = relative.replace(os.sep, "/")
    return f"{prefix}/{relative}" if prefix else relative


def walk(src: Path, prefix: str) -> Iterator[Upload]:
    """Every regular file under src (symlinks not followed), in a stable order."""
    root = os.fspath(src)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            yield Upload(path, key_for(prefix, os.path.relpath(path, root)), st.st_size)


def parts_in_flight(size: int, part_size: int, per_file: int) -> int:
    """How many of the request budget's slots one file's upload holds: one for a single
    PUT, else as many parts as it may send at once."""
    if size <= part_size:
        return 1
    return min(per_file, -(-size // part_size))


class RequestBudget:
    """At most ``limit`` requests in flight: a file takes as many slots as it may send parts
    at once (parts_in_flight), and waits until they are free. One larger than the whole budget
    takes all of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free = limit
        self._changed = asyncio.Condition()

    def _clamp(self, slots: int) -> int:
        return max(1, min(slots, self.limit))

    async def acquire(self, slots: int) -> None:
        slots = self._clamp(slots)
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= slots)
            self.free -= slots

    async def release(self, slots: int) -> None:
        async with self._changed:
            self.free += self._clamp(slots)
            self._changed.notify_all()


def summary(files: int, total: int) -> None:
    """The one line run.py checks: what the driver says it uploaded."""
    print(json.dumps({"type": "summary", "uploaded": files, "bytes": total}), flush=True)


def fail(tool: str, what: str, exc: BaseException) -> int:
    print(f"{tool}: {what}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return 1
