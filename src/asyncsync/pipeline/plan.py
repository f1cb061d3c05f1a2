"""Stage 3, plan: what to do with one scanned file (and whether its previous object must be
kept first), and how to cut it into parts.

Pure logic on values from the scanner and the manifest: no I/O, unit-tested in milliseconds.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, MiB, TransferConfig
from .keys import PathFilter, object_key
from .manifest import ObjectRecord
from .mime import guess_content_type
from .scan import ScannedFile

HISTORY_DIR = "_asyncsync/history"


class Action(enum.Enum):
    SKIP = "skip"  # size, mtime_ns and inode match the manifest: not even read
    VERIFY = "verify"  # known key, stat changed: hash, and send only if the digest differs
    UPLOAD = "upload"  # not in the manifest (or the bucket lost it): send
    ADOPT = "adopt"  # --reconcile: in the bucket, not in the manifest: verify by digest


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str  # "unchanged", "new", "changed", "missing in bucket", ...
    record: ObjectRecord | None = None


def plan_file(scanned: ScannedFile, record: ObjectRecord | None) -> Decision:
    if record is None:
        return Decision(Action.UPLOAD, "new")
    if record.same_stat(scanned.path, scanned.size, scanned.mtime_ns, scanned.inode):
        return Decision(Action.SKIP, "unchanged", record)
    return Decision(Action.VERIFY, "changed", record)


def history_key(
    scanned: ScannedFile, record: ObjectRecord | None, history: PathFilter, prefix: str,
    *, still_starts_with_object: Callable[[ObjectRecord], bool] | None = None,
) -> str | None:
    """Where the object of an append-only file must be copied before this upload overwrites
    it, or None when overwriting loses nothing.

    A file matching ``history`` (``--history-glob``, results.csv) only grows while its run
    goes on; one that shrank or was recreated since its upload is a restarted run, and its
    object holds epochs the new file lacks. The copy goes to
    ``PREFIX/_asyncsync/history/<path>/<upload time of the object>`` (its ETag is added by
    `history_version_key`). Raises `InvalidKey`
    when that key cannot exist (too long).

    A file that is the same inode and no shorter was appended to, unless it was truncated
    and written again in place (an exist_ok restart) and has grown past the object by the
    time it is looked at: ``still_starts_with_object`` (which reads the file) tells them
    apart; without it, the same inode no shorter counts as an append.
    """
    if record is None or not history.include or not history.accepts(scanned.relative):
        return None
    if record.source != scanned.path:
        return None  # another source's object: not this file's history
    if scanned.size >= record.size and scanned.inode == record.inode and (
            still_starts_with_object is None or still_starts_with_object(record)):
        return None  # appended to (or rewritten in place at no loss)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(record.uploaded_at))
    return object_key(prefix, f"{HISTORY_DIR}/{scanned.relative}/{stamp}")


def history_version_key(key: str, etag: str) -> str:
    """The history key of one version of the object: `history_key` followed by its ETag's
    first characters. Two versions kept within the same second (a run restarted twice), or
    under a manifest row that lags the bucket (its last write lost to a full state disk, so
    its upload time is an older version's), then never take each other's key; the same
    version kept twice takes the same one."""
    tag = "".join(c for c in etag if c.isalnum())[:12] or "noetag"
    return object_key("", f"{key}-{tag}")  # InvalidKey if that makes it too long


# Bigger files get bigger parts: fewer requests, and room under the 10,000-part cap.
_PART_SIZE_LADDER = (
    (1024 * MiB, 8 * MiB),
    (8 * 1024 * MiB, 16 * MiB),
    (64 * 1024 * MiB, 64 * MiB),
)


def part_size_for(size: int, configured: int | None = None) -> int:
    """Part size for a multipart upload of ``size`` bytes, within S3's limits.

    A configured size is honoured but raised if the file would need more than 10,000 parts.
    """
    if configured is not None:
        wanted = configured
    else:
        wanted = next((part for limit, part in _PART_SIZE_LADDER if size <= limit), 128 * MiB)
    floor = math.ceil(size / MAX_PARTS)
    part = max(wanted, floor, MIN_PART_SIZE)
    # Whole MiB parts keep ranges readable in logs and aligned on disk.
    part = math.ceil(part / MiB) * MiB
    return min(part, MAX_PART_SIZE)


def part_count(size: int, part_size: int) -> int:
    return max(1, math.ceil(size / part_size))


# CopyObject copies at most 5 GiB; a larger object is copied part by part (UploadPartCopy).
MAX_COPY_OBJECT_SIZE = 5 * 1024 * MiB
# Parts of a server-side copy: no byte crosses the wire, so fewer, larger requests; small
# enough that one part is copied well within a request's read timeout.
COPY_PART_SIZE = 512 * MiB


def uses_part_copy(size: int, max_copy: int = MAX_COPY_OBJECT_SIZE) -> bool:
    """Whether a server-side copy of ``size`` bytes needs UploadPartCopy."""
    return size > max_copy


def copy_ranges(size: int, part_size: int = COPY_PART_SIZE) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` of the parts of a server-side copy of ``size``
    bytes: contiguous, within S3's part limits (every part but the last at least 5 MiB, at
    most 5 GiB, at most 10,000 parts)."""
    part = min(max(part_size, math.ceil(size / MAX_PARTS), MIN_PART_SIZE), MAX_PART_SIZE)
    return [(start, min(start + part, size)) for start in range(0, max(size, 1), part)]


def part_window_for(size: int, part_size: int, config: TransferConfig) -> int:
    """How many parts of one file are in flight at once.

    Bounded by the file's part count, the configured per-file concurrency, and the memory
    budget (at least one part must fit; the budget itself bounds the sum over all files).
    """
    parts = part_count(size, part_size)
    by_memory = max(1, config.max_memory // part_size)
    return max(1, min(parts, config.part_concurrency, by_memory))


def uses_multipart(size: int, config: TransferConfig) -> bool:
    return size > config.multipart_threshold


# Smaller files are sent as they are with --gzip: gzip's 20-byte frame outweighs what it
# saves (a 6-byte file would grow to 26), and a request costs the same either way.
GZIP_MIN_SIZE = 1024


def wants_gzip(relative: str, size: int, config: TransferConfig) -> bool:
    """Whether to try gzip on this file; a body that does not shrink is still sent as is
    (`digest.read_small`, `digest.gzip_to_temp`)."""
    return (config.gzip and size >= GZIP_MIN_SIZE
            and relative.lower().endswith(config.gzip_suffixes))


def content_type_for(relative: str, config: TransferConfig) -> str:
    """--content-type where given, else the type of the file's name."""
    return config.content_type or guess_content_type(relative)
