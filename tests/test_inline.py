"""Unit tests for asyncsync.inline: when blocking work may stay on the event loop."""

from __future__ import annotations

from asyncsync.inline import InlineGate


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
