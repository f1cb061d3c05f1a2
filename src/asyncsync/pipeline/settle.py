"""When a changed file may go up: settle detection, checkpoint pacing, retry backoff.

Training writes nothing atomically (ultralytics truncates and rewrites last.pt in place), so
the watch daemon uploads a file only after its identity (size, mtime_ns, inode) has held
still for ``settle`` seconds. Large checkpoints rewritten every epoch are paced: at most one
upload per ``checkpoint_interval``, the newest settled version going up as soon as the
interval has passed. Failed uploads wait with capped exponential backoff. Pure logic over
a clock passed in by the caller: unit-tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from dataclasses import dataclass

from .keys import PathFilter
from .scan import ScannedFile

MAX_FAILURE_BACKOFF = 60.0
# How long a file must hold still for the shutdown flush (or --settle, if shorter): long
# enough to see a writer between its truncate and its first write, short enough for --grace.
FINAL_SETTLE = 1.0


@dataclass
class Candidate:
    """A file whose current version is not in the bucket yet."""

    scanned: ScannedFile
    stable_since: float  # when its current identity was first seen
    not_before: float = 0.0  # backoff after a failure
    failures: int = 0

    @property
    def identity(self) -> tuple[int, int, int]:
        return (self.scanned.size, self.scanned.mtime_ns, self.scanned.inode)


class SettleTracker:
    """The daemon's queue: out-of-sync files by key, and when each may be sent."""

    def __init__(
        self, *, settle: float, checkpoint_interval: float, checkpoints: PathFilter
    ) -> None:
        self.settle = settle
        self.checkpoint_interval = checkpoint_interval
        self.checkpoints = checkpoints
        self._candidates: dict[str, Candidate] = {}
        self._last_sent: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, key: str) -> bool:
        return key in self._candidates

    def keys(self) -> Iterator[str]:
        return iter(list(self._candidates))

    def observe(self, key: str, scanned: ScannedFile, now: float) -> None:
        """A scan (or an event) saw this file out of sync with the manifest."""
        current = self._candidates.get(key)
        identity = (scanned.size, scanned.mtime_ns, scanned.inode)
        if current is None:
            self._candidates[key] = Candidate(scanned, now)
        elif current.identity != identity:
            # It moved: the settle clock starts again, and an earlier failure no longer
            # says anything about this version.
            self._candidates[key] = Candidate(scanned, now)
        else:
            current.scanned = scanned

    def get(self, key: str) -> Candidate | None:
        return self._candidates.get(key)

    def forget(self, key: str) -> None:
        self._candidates.pop(key, None)

    def sent(self, key: str, identity: tuple[int, int, int], at: float) -> None:
        """An upload of this identity finished (or proved it unchanged)."""
        self._last_sent[key] = at
        current = self._candidates.get(key)
        if current is not None and current.identity == identity:
            del self._candidates[key]

    def remember_sent(self, key: str, at: float) -> None:
        """Seed pacing from the manifest after a restart (only if nothing newer is known)."""
        self._last_sent.setdefault(key, at)

    def failed(self, key: str, now: float) -> None:
        current = self._candidates.get(key)
        if current is not None:
            current.failures += 1
            current.not_before = now + min(MAX_FAILURE_BACKOFF, 2.0 ** current.failures)

    def unsettle(self, key: str, now: float) -> None:
        """The file changed while it was read: it must hold still again first."""
        current = self._candidates.get(key)
        if current is not None:
            current.stable_since = now

    def is_checkpoint(self, candidate: Candidate) -> bool:
        return bool(self.checkpoints.include) and self.checkpoints.accepts(
            candidate.scanned.relative
        )

    def ready_at(self, key: str, candidate: Candidate) -> float:
        """The earliest time this candidate may be sent (settle, backoff, pacing)."""
        ready = max(candidate.stable_since + self.settle, candidate.not_before)
        if self.checkpoint_interval > 0 and self.is_checkpoint(candidate):
            last = self._last_sent.get(key)
            if last is not None:
                ready = max(ready, last + self.checkpoint_interval)
        return ready

    def due(
        self, now: float, *, final: bool = False, writers_gone: bool = False
    ) -> list[tuple[str, Candidate]]:
        """Candidates that may be sent now. ``final`` (shutdown): pacing and backoff no longer
        apply, and settle shrinks to FINAL_SETTLE, since a file caught between a truncate
        and its first write (ultralytics' torch.save, matplotlib's savefig) passes every
        torn-read check: it holds still while it is read. ``writers_gone`` (`run`, once the
        training exited): nothing writes any more, everything is due."""
        if not final:
            return [(k, c) for k, c in self._candidates.items() if self.ready_at(k, c) <= now]
        if writers_gone:
            return list(self._candidates.items())
        return [(k, c) for k, c in self._candidates.items() if self.settled_at(c) <= now]

    def settled_at(self, candidate: Candidate) -> float:
        """When the candidate's version will have held still long enough for the shutdown
        flush: counted from when it was first seen, or from its mtime when that is earlier
        (a file untouched for that long needs no wait)."""
        written = candidate.scanned.mtime_ns / 1e9
        return min(candidate.stable_since, written) + min(self.settle, FINAL_SETTLE)

    def next_ready(self, busy: Container[str] = ()) -> float | None:
        """When the next candidate becomes due, ignoring keys in ``busy`` (uploading now:
        their end wakes the daemon anyway)."""
        return min(
            (self.ready_at(k, c) for k, c in self._candidates.items() if k not in busy),
            default=None,
        )
