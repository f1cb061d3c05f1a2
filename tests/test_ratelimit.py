"""Unit tests for asyncsync.pipeline.ratelimit: the token bucket and --max-bandwidth."""

from __future__ import annotations

import asyncio
import time

import pytest

from asyncsync.errors import ConfigError
from asyncsync.pipeline.ratelimit import RateLimiter, parse_rate

RATE = 1_000_000  # 1 MB/s: half a second of traffic is enough to measure


async def drain(limiter: RateLimiter) -> None:
    """Empty the initial (full) bucket so that what follows is paced from the first byte."""
    await limiter.take(limiter.burst)


def test_concurrent_takers_stay_within_the_rate() -> None:
    async def main() -> float:
        limiter = RateLimiter(RATE, burst=32 * 1024)
        await drain(limiter)
        sizes = [8 * 1024, 13 * 1024, 32 * 1024, 1500]
        taken = 0

        async def taker(size: int) -> None:
            nonlocal taken
            while taken < 500_000:
                await limiter.take(size)
                taken += size

        start = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for size in sizes:
                group.create_task(taker(size))
        elapsed = time.monotonic() - start
        return taken / elapsed

    measured = asyncio.run(main())
    # Every byte was paid for after the bucket was drained (and no request exceeds the burst,
    # so none ran into debt), so the average can only fall short of the rate by scheduling
    # overshoot, never exceed it.
    assert RATE * 0.95 <= measured <= RATE * 1.01, measured


def test_default_burst_is_a_quarter_second_with_a_floor() -> None:
    assert RateLimiter(100_000_000).burst == 25_000_000
    assert RateLimiter(1_000).burst == 256 * 1024
    assert RateLimiter(1_000, burst=10).burst == 10


def test_bad_construction_is_refused() -> None:
    for rate in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            RateLimiter(rate)
    with pytest.raises(ValueError):
        RateLimiter(RATE, burst=0)


def test_full_bucket_is_free_then_requests_are_paced() -> None:
    async def main() -> None:
        limiter = RateLimiter(RATE, burst=50_000)
        start = time.monotonic()
        await limiter.take(50_000)
        await limiter.take(0)
        assert time.monotonic() - start < 0.02
        await limiter.take(100_000)  # bucket empty: waits for a full bucket (50 ms)
        waited = time.monotonic() - start
        assert 0.045 <= waited < 0.1, waited

    asyncio.run(main())


def test_request_larger_than_burst_is_allowed_and_its_debt_is_paid_by_the_next() -> None:
    async def main() -> None:
        limiter = RateLimiter(RATE, burst=20_000)
        start = time.monotonic()
        await limiter.take(200_000)  # a full bucket lets it through at once...
        assert time.monotonic() - start < 0.02
        await limiter.take(1_000)  # ...but the 180 kB of debt is waited off here
        waited = time.monotonic() - start
        assert 0.18 <= waited < 0.25, waited

    asyncio.run(main())


def test_waiters_are_served_in_arrival_order() -> None:
    async def main() -> list[str]:
        limiter = RateLimiter(RATE, burst=100_000)
        await drain(limiter)
        order: list[str] = []

        async def take(name: str, size: int) -> None:
            await limiter.take(size)
            order.append(name)

        # A small request arriving after a large one would fit sooner, but must not pass it.
        tasks = []
        for name, size in [("big", 60_000), ("small-1", 1_000), ("small-2", 1_000),
                           ("medium", 20_000), ("small-3", 10)]:
            tasks.append(asyncio.create_task(take(name, size)))
            await asyncio.sleep(0)  # fix the arrival order
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == ["big", "small-1", "small-2", "medium", "small-3"]


def test_cancelled_head_waiter_takes_nothing() -> None:
    async def main() -> None:
        limiter = RateLimiter(RATE, burst=200_000)
        await drain(limiter)
        head = asyncio.create_task(limiter.take(150_000))  # would need 150 ms
        await asyncio.sleep(0.03)
        head.cancel()
        with pytest.raises(asyncio.CancelledError):
            await head
        # The 30 kB refilled meanwhile are still there: had the cancelled request paid,
        # this would wait ~120 ms more.
        start = time.monotonic()
        await limiter.take(20_000)
        assert time.monotonic() - start < 0.02

    asyncio.run(main())


def test_cancelled_queued_waiter_takes_nothing_and_keeps_the_order() -> None:
    async def main() -> None:
        limiter = RateLimiter(RATE, burst=200_000)
        await drain(limiter)
        order: list[str] = []

        async def take(name: str, size: int) -> None:
            await limiter.take(size)
            order.append(name)

        first = asyncio.create_task(take("first", 50_000))
        await asyncio.sleep(0)
        queued = asyncio.create_task(take("queued", 150_000))
        await asyncio.sleep(0)
        last = asyncio.create_task(take("last", 50_000))
        await asyncio.sleep(0.01)
        queued.cancel()
        start = time.monotonic()
        await asyncio.gather(first, last, return_exceptions=False)
        with pytest.raises(asyncio.CancelledError):
            await queued
        # first (50 kB) + last (50 kB) at 1 MB/s from an empty bucket: ~100 ms in all; the
        # cancelled 150 kB would have made it ~250 ms.
        assert time.monotonic() - start < 0.15
        assert order == ["first", "last"]

    asyncio.run(main())


def test_negative_request_is_refused() -> None:
    with pytest.raises(ValueError):
        asyncio.run(RateLimiter(RATE).take(-1))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50MB", 50e6),
        ("50MB/s", 50e6),
        ("50 MB/s", 50e6),
        ("50MiB/s", 50 * 1024**2),
        ("1.5GB/s", 1.5e9),
        ("1.5GiB", 1.5 * 1024**3),
        ("800k", 800e3),
        ("800kB/s", 800e3),
        ("800KiB", 800 * 1024),
        ("1048576", 1048576),
        ("1048576/s", 1048576),
        ("100B/s", 100),
        ("2T", 2e12),
    ],
)
def test_parse_rate(text: str, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "fast", "-5MB", "0", "0MB/s", "50XB", "50MB/h", "MB", "50Mb/s", "50mb", "1e6"]
)
def test_parse_rate_rejects_bad_input_in_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rate(text)
    message = str(caught.value)
    assert "--max-bandwidth" in message
    assert repr(text) in message
    assert "\n" not in message
