"""`push --shard I/N`: a partition of the tree that N processes agree on without talking.

Each unit of the tree belongs to shard ``xxh3_64(unit) % N`` (xxh3 is stable across versions
and machines). By default the unit is the run directory ``--run-depth`` levels below SRC, so
a shard walks only the run directories it owns: the N shards together stat each file once,
and only the levels above the runs are listed by every shard (the files there belong to
shard 0). ``--shard-by file`` hashes each file's relative path instead, for a tree that is
one huge directory (every shard then lists everything, and keeps its files).

``I`` may be ``auto``: Kubernetes' Indexed Job gives each pod ``$JOB_COMPLETION_INDEX``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import xxhash

from ..config import DEFAULT_RUN_DEPTH
from ..errors import ConfigError

BY_RUN = "run"
BY_FILE = "file"
INDEX_VARIABLE = "JOB_COMPLETION_INDEX"


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int
    by: str = BY_RUN
    run_depth: int = DEFAULT_RUN_DEPTH

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def owner(self, unit: str) -> int:
        return xxhash.xxh3_64_intdigest(unit.encode("utf-8", "surrogateescape")) % self.count

    def owns(self, unit: str) -> bool:
        return self.owner(unit) == self.index

    def owns_file(self, relative: str) -> bool:
        """Whether the file at ``relative`` (POSIX, below SRC) is this shard's."""
        if self.by == BY_FILE:
            return self.owns(relative)
        parts = relative.split("/", self.run_depth)
        if len(parts) <= self.run_depth:
            return self.index == 0  # above the run directories
        return self.owns("/".join(parts[: self.run_depth]))


def parse_shard(text: str, *, by: str = BY_RUN, run_depth: int = DEFAULT_RUN_DEPTH,
                environ: dict[str, str] | None = None) -> Shard:
    """``I/N`` or ``auto/N`` (I from $JOB_COMPLETION_INDEX); ConfigError naming the value."""
    index_text, slash, count_text = text.strip().partition("/")
    if not slash or not count_text.isdigit() or int(count_text) < 1:
        raise ConfigError(f"--shard {text!r}: expected I/N (e.g. 2/8) or auto/N, with N >= 1")
    count = int(count_text)
    if index_text == "auto":
        env = os.environ if environ is None else environ
        raw = env.get(INDEX_VARIABLE)
        if raw is None or not raw.strip().isdigit():
            raise ConfigError(f"--shard {text!r}: auto needs ${INDEX_VARIABLE} (an Indexed "
                              f"Job's pod index), which is {'unset' if raw is None else repr(raw)}")
        index = int(raw)
    elif index_text.isdigit():
        index = int(index_text)
    else:
        raise ConfigError(f"--shard {text!r}: the index must be a whole number or auto")
    if index >= count:
        raise ConfigError(f"--shard {text!r}: the index must be below N ({count}): "
                          f"0 to {count - 1}")
    return Shard(index, count, by, run_depth)
