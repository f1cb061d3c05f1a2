"""Settle detection, checkpoint pacing and backoff: pure logic on a clock passed in."""

from __future__ import annotations

from asyncsync.pipeline.keys import PathFilter
from asyncsync.pipeline.scan import ScannedFile
from asyncsync.pipeline.settle import MAX_FAILURE_BACKOFF, SettleTracker
from asyncsync.pipeline.source import SourceRoot

RUNS = SourceRoot("/runs")


def scanned(relative: str, size: int = 10, mtime_ns: int = 1, inode: int = 7) -> ScannedFile:
    return ScannedFile(f"/runs/{relative}", relative, size, mtime_ns, inode, 1, RUNS)


def tracker(settle: float = 5.0, interval: float = 300.0) -> SettleTracker:
    return SettleTracker(settle=settle, checkpoint_interval=interval,
                         checkpoints=PathFilter(include=("*.pt",)))


def keys(pairs: list[tuple[str, object]]) -> list[str]:
    return [key for key, _ in pairs]


def test_a_file_is_due_once_it_held_still_for_the_settle_time() -> None:
    t = tracker(settle=5)
    t.observe("k/results.csv", scanned("results.csv"), now=100)
    assert t.due(104.9) == []
    assert keys(t.due(105)) == ["k/results.csv"]
    assert t.next_ready() == 105


def test_any_change_restarts_the_settle_clock() -> None:
    t = tracker(settle=5)
    t.observe("k", scanned("a.csv", size=10), now=100)
    t.observe("k", scanned("a.csv", size=20), now=103)  # appended
    assert t.due(106) == []
    assert keys(t.due(108)) == ["k"]
    t.observe("k", scanned("a.csv", size=20, inode=8), now=108)  # recreated, same size
    assert t.due(112) == [] and keys(t.due(113)) == ["k"]


def test_the_same_identity_seen_again_keeps_its_clock() -> None:
    t = tracker(settle=5)
    t.observe("k", scanned("a.csv"), now=100)
    t.observe("k", scanned("a.csv"), now=104)
    assert keys(t.due(105)) == ["k"]


def test_checkpoints_are_paced_and_the_newest_goes_when_the_interval_ends() -> None:
    t = tracker(settle=1, interval=300)
    t.observe("k/last.pt", scanned("last.pt", size=1), now=0)
    assert keys(t.due(1)) == ["k/last.pt"]
    t.sent("k/last.pt", (1, 1, 7), at=1)
    assert len(t) == 0
    t.observe("k/last.pt", scanned("last.pt", size=2), now=60)  # next epoch
    assert t.due(100) == []
    assert t.next_ready() == 301
    t.observe("k/last.pt", scanned("last.pt", size=3), now=200)  # and the next
    assert keys(t.due(301)) == ["k/last.pt"]
    # Other files are not paced.
    t.observe("k/results.csv", scanned("results.csv"), now=60)
    assert "k/results.csv" in keys(t.due(61))


def test_pacing_off_and_pacing_seeded_after_a_restart() -> None:
    off = tracker(settle=1, interval=0)
    off.observe("k/last.pt", scanned("last.pt"), now=0)
    off.sent("k/last.pt", (9, 9, 9), at=0)  # an older identity: the candidate stays
    assert keys(off.due(1)) == ["k/last.pt"]
    restarted = tracker(settle=1, interval=300)
    restarted.remember_sent("k/last.pt", at=1000)  # from the manifest's upload time
    restarted.observe("k/last.pt", scanned("last.pt"), now=1100)
    assert restarted.due(1200) == [] and keys(restarted.due(1300)) == ["k/last.pt"]


def test_final_drops_pacing_and_backoff_but_a_file_must_hold_still_a_second() -> None:
    """The shutdown flush: a checkpoint truncated just now by torch.save (or a plot being
    saved) would pass every torn-read check, since it holds still while it is read; a
    second of stillness tells it, by the daemon's clock or the file's mtime."""
    t = tracker(settle=60, interval=300)
    t.sent("k/last.pt", (0, 0, 0), at=0)
    t.observe("k/last.pt", scanned("last.pt", mtime_ns=10 * 10**9), now=10)
    t.observe("k/results.csv", scanned("results.csv", mtime_ns=1), now=10)  # written long ago
    t.observe("k/args.yaml", scanned("args.yaml", mtime_ns=10 * 10**9), now=10)
    t.failed("k/args.yaml", now=10)  # backing off: no longer, at shutdown
    assert t.due(10.5) == []
    assert keys(t.due(10.5, final=True)) == ["k/results.csv"]
    assert sorted(keys(t.due(11, final=True))) == ["k/args.yaml", "k/last.pt", "k/results.csv"]
    assert len(t.due(10, final=True, writers_gone=True)) == 3  # `run`: the training exited
    # A mtime in the future (clock skew) is no shortcut, nor a delay past the daemon's own.
    t.observe("k/best.pt", scanned("best.pt", mtime_ns=10**12), now=10)
    assert "k/best.pt" in keys(t.due(11, final=True))
    # A --settle shorter than a second is kept.
    quick = tracker(settle=0.2)
    quick.observe("k/last.pt", scanned("last.pt", mtime_ns=10 * 10**9), now=10)
    assert keys(quick.due(10.2, final=True)) == ["k/last.pt"]


def test_failures_back_off_exponentially_up_to_a_cap() -> None:
    t = tracker(settle=0)
    t.observe("k", scanned("a.csv"), now=0)
    waits = []
    for _ in range(10):
        t.failed("k", now=0)
        waits.append(t.next_ready())
    assert waits[:3] == [2.0, 4.0, 8.0]
    assert max(w for w in waits if w is not None) == MAX_FAILURE_BACKOFF
    # A new version is a new story: no inherited backoff.
    t.observe("k", scanned("a.csv", size=99), now=1)
    assert keys(t.due(1)) == ["k"]


def test_unsettle_and_forget_and_busy_keys() -> None:
    t = tracker(settle=5)
    t.observe("k", scanned("a.csv"), now=0)
    t.unsettle("k", now=10)  # changed while it was read
    assert t.due(14) == [] and keys(t.due(15)) == ["k"]
    assert t.next_ready(busy={"k"}) is None
    t.forget("k")
    assert len(t) == 0 and t.next_ready() is None
