"""Unit tests for asyncsync.pipeline.inline: when blocking work may stay on the event loop."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from asyncsync.pipeline.inline import InlineGate


def test_the_gate_closes_after_repeated_slow_calls_only() -> None:
    gate = InlineGate(slow_seconds=0.01, strikes=3)
    for _ in range(100):  # a preempted call now and then among fast ones
        gate.record(0.5)
        gate.record(0.001)
        gate.record(0.001)
    assert gate.open
    gate.record(0.02)
    gate.record(0.02)
    assert gate.open
    gate.record(0.02)
    assert not gate.open
    gate.record(0.0001)
    assert not gate.open  # for good: a slow disk stays slow


def test_small_reads_leave_the_event_loop_once_the_disk_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push reads small files on the loop's thread; when reads keep taking longer than
    10 ms (a network filesystem), the rest go to the worker threads, and all arrive."""
    from asyncsync.commands.push import run_push
    from asyncsync.config import PushConfig, parse_destination
    from asyncsync.pipeline import transfer
    from asyncsync.report import Reporter

    source = tmp_path / "runs"
    source.mkdir()
    (tmp_path / "bucket").mkdir()
    for i in range(20):
        (source / f"f{i:02d}.txt").write_text(f"file {i}\n")
    threads: list[str] = []
    real_read_small = transfer.read_small

    def slow_read_small(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        time.sleep(0.015)
        return real_read_small(*args)

    monkeypatch.setattr(transfer, "read_small", slow_read_small)
    config = PushConfig(
        source=source, destination=parse_destination(f"file://{tmp_path / 'bucket'}"),
        state_dir=tmp_path / "state",
    )
    reporter = Reporter(out=io.StringIO(), err=io.StringIO())
    asyncio.run(run_push(config, reporter))
    assert reporter.uploaded == 20 and reporter.failed == 0
    main = threading.main_thread().name
    assert threads[:8] == [main] * 8
    assert threads[8:] and all(name.startswith("asyncsync-io") for name in threads[8:])
    for path in source.iterdir():
        assert (tmp_path / "bucket" / path.name).read_bytes() == path.read_bytes()
