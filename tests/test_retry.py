"""Unit tests for asyncsync.stores.retry: capped exponential backoff with full jitter."""

from __future__ import annotations

import asyncio
import random

import pytest

from asyncsync.errors import (
    FatalStoreError,
    NoSuchUpload,
    NotFound,
    StoreError,
    TransientStoreError,
)
from asyncsync.stores.retry import Backoff, retry_transient

FAST = Backoff(base=0.001, cap=0.004)

# -- Backoff -------------------------------------------------------------------------------


def test_ceiling_doubles_from_base() -> None:
    backoff = Backoff(base=0.1, cap=1000.0)
    assert backoff.ceiling(1) == pytest.approx(0.1)
    assert backoff.ceiling(2) == pytest.approx(0.2)
    assert backoff.ceiling(3) == pytest.approx(0.4)
    assert backoff.ceiling(4) == pytest.approx(0.8)
    assert backoff.ceiling(11) == pytest.approx(102.4)


def test_ceiling_is_capped() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    assert backoff.ceiling(4) == pytest.approx(0.8)
    assert backoff.ceiling(5) == 1.0
    assert backoff.ceiling(6) == 1.0
    assert backoff.ceiling(1000) == 1.0  # no overflow for huge attempt numbers
    assert isinstance(backoff.ceiling(1000), float)


def test_ceiling_for_attempt_zero_or_negative_is_base() -> None:
    backoff = Backoff(base=0.5, cap=10.0)
    assert backoff.ceiling(0) == 0.5
    assert backoff.ceiling(-3) == 0.5


def test_default_backoff() -> None:
    backoff = Backoff()
    assert backoff.ceiling(1) == pytest.approx(0.1)
    assert backoff.ceiling(100) == 20.0


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 20])
def test_delay_within_zero_and_ceiling(attempt: int) -> None:
    backoff = Backoff(base=0.1, cap=2.0)
    rng = random.Random(1234)
    ceiling = backoff.ceiling(attempt)
    delays = [backoff.delay(attempt, rng) for _ in range(500)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # Full jitter: spread across the whole range, not constant.
    assert len(set(delays)) > 400
    assert min(delays) < ceiling * 0.1
    assert max(delays) > ceiling * 0.9


def test_delay_is_reproducible_with_a_seeded_rng() -> None:
    backoff = Backoff(base=0.1, cap=2.0)
    first = [backoff.delay(3, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    a = random.Random(99)
    b = random.Random(99)
    assert [backoff.delay(n, a) for n in range(1, 10)] == [
        backoff.delay(n, b) for n in range(1, 10)
    ]


def test_delay_without_rng_uses_global_random() -> None:
    backoff = Backoff(base=1.0, cap=1.0)
    delays = {backoff.delay(1) for _ in range(50)}
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert len(delays) > 1


# -- retry_transient -----------------------------------------------------------------------


class Flaky:
    """An async callable that raises the given errors in turn, then returns ``value``."""

    def __init__(self, errors: list[BaseException], value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    async def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def test_returns_value_on_first_success() -> None:
    call = Flaky([])
    retries: list[tuple[BaseException, int, float]] = []
    result = asyncio.run(
        retry_transient(
            call, attempts=5, backoff=FAST, on_retry=lambda e, n, p: retries.append((e, n, p))
        )
    )
    assert result == "ok"
    assert call.calls == 1
    assert retries == []


def test_retries_transient_errors_until_success() -> None:
    errors = [TransientStoreError(f"boom {i}", op="PutObject", key="k") for i in range(3)]
    call = Flaky(list(errors), value=42)
    retries: list[tuple[BaseException, int, float]] = []
    result = asyncio.run(
        retry_transient(
            call, attempts=5, backoff=FAST, on_retry=lambda e, n, p: retries.append((e, n, p))
        )
    )
    assert result == 42
    assert call.calls == 4
    assert [r[0] for r in retries] == errors
    assert [r[1] for r in retries] == [1, 2, 3]
    for _, attempt, pause in retries:
        assert 0.0 <= pause <= FAST.ceiling(attempt)


def test_gives_up_after_attempts_total_calls_and_reraises_last() -> None:
    errors = [TransientStoreError(f"boom {i}") for i in range(10)]
    call = Flaky(list(errors))
    retries: list[int] = []
    with pytest.raises(TransientStoreError) as info:
        asyncio.run(
            retry_transient(
                call, attempts=4, backoff=FAST, on_retry=lambda e, n, p: retries.append(n)
            )
        )
    assert call.calls == 4
    assert info.value is errors[3]
    assert str(info.value) == "boom 3"
    assert retries == [1, 2, 3]


def test_single_attempt_never_retries() -> None:
    call = Flaky([TransientStoreError("once")])
    retries: list[int] = []
    with pytest.raises(TransientStoreError, match="once"):
        asyncio.run(
            retry_transient(
                call, attempts=1, backoff=FAST, on_retry=lambda e, n, p: retries.append(n)
            )
        )
    assert call.calls == 1
    assert retries == []


def test_on_retry_is_optional() -> None:
    call = Flaky([TransientStoreError("a"), TransientStoreError("b")], value="done")
    assert asyncio.run(retry_transient(call, attempts=3, backoff=FAST)) == "done"
    assert call.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        StoreError("plain store error", op="GetObject"),
        FatalStoreError("access denied", code="AccessDenied"),
        NoSuchUpload("gone"),
        NotFound("missing"),
        ValueError("bad value"),
        RuntimeError("bug"),
    ],
)
def test_does_not_retry_other_errors(error: Exception) -> None:
    call = Flaky([error, error])
    retries: list[int] = []
    with pytest.raises(type(error)) as info:
        asyncio.run(
            retry_transient(
                call, attempts=5, backoff=FAST, on_retry=lambda e, n, p: retries.append(n)
            )
        )
    assert info.value is error
    assert call.calls == 1
    assert retries == []


def test_non_transient_after_transient_stops_retrying() -> None:
    fatal = FatalStoreError("denied")
    call = Flaky([TransientStoreError("slow down"), fatal, TransientStoreError("x")])
    with pytest.raises(FatalStoreError) as info:
        asyncio.run(retry_transient(call, attempts=10, backoff=FAST))
    assert info.value is fatal
    assert call.calls == 2


def test_sleeps_the_pause_reported_to_on_retry() -> None:
    backoff = Backoff(base=0.02, cap=0.02)
    call = Flaky([TransientStoreError("a"), TransientStoreError("b")])
    pauses: list[float] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await retry_transient(
            call, attempts=3, backoff=backoff, on_retry=lambda e, n, p: pauses.append(p)
        )
        return loop.time() - start

    elapsed = asyncio.run(main())
    assert len(pauses) == 2
    assert elapsed >= sum(pauses) * 0.9
    assert elapsed < 1.0
