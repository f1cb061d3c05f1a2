"""Unit tests for asyncsync.pipeline.budget.ByteBudget: the bound on bytes in flight."""

from __future__ import annotations

import asyncio
import random

import pytest

from asyncsync.pipeline.budget import ByteBudget


def test_capacity_must_be_positive() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="capacity must be positive"):
            ByteBudget(bad)


def test_acquire_and_release_account_in_use() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        assert budget.in_use == 0
        assert await budget.acquire(30) == 30
        assert budget.in_use == 30
        assert await budget.acquire(70) == 70
        assert budget.in_use == 100
        budget.release(30)
        assert budget.in_use == 70
        budget.release(70)
        assert budget.in_use == 0

    asyncio.run(main())


def test_request_larger_than_capacity_is_clamped_and_granted() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        grant = await asyncio.wait_for(budget.acquire(10_000), timeout=1)
        assert grant == 100
        assert budget.in_use == 100
        budget.release(grant)
        assert budget.in_use == 0

    asyncio.run(main())


def test_oversized_request_waits_for_everything_then_is_granted() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        small = await budget.acquire(10)
        big = asyncio.create_task(budget.acquire(1_000))
        await asyncio.sleep(0.01)
        assert not big.done()
        budget.release(small)
        assert await asyncio.wait_for(big, timeout=1) == 100
        assert budget.in_use == 100

    asyncio.run(main())


def test_negative_and_zero_requests_grant_nothing() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        assert await budget.acquire(0) == 0
        assert await budget.acquire(-5) == 0
        assert budget.in_use == 0

    asyncio.run(main())


def test_never_exceeds_capacity_under_concurrency() -> None:
    capacity = 1000
    rng = random.Random(20240601)

    async def main() -> tuple[int, int]:
        budget = ByteBudget(capacity)
        max_seen = 0
        granted_total = 0

        async def worker(n: int) -> None:
            nonlocal max_seen, granted_total
            for _ in range(20):
                want = rng.randint(1, capacity + 200)  # some oversized requests too
                grant = await budget.acquire(want)
                assert grant == min(want, capacity)
                granted_total += grant
                max_seen = max(max_seen, budget.in_use)
                assert budget.in_use <= capacity
                for _ in range(rng.randint(0, 3)):  # hold it across a few loop steps
                    await asyncio.sleep(0)
                max_seen = max(max_seen, budget.in_use)
                budget.release(grant)

        await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(50))), timeout=20)
        assert budget.in_use == 0
        return max_seen, granted_total

    max_seen, granted_total = asyncio.run(main())
    assert max_seen <= capacity
    # The budget was actually contended, not trivially under-used.
    assert max_seen > capacity // 2
    assert granted_total > capacity * 50


def test_fifo_big_waiter_not_starved_by_later_small_ones() -> None:
    async def main() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []
        held = await budget.acquire(60)  # 40 free

        async def take(name: str, nbytes: int) -> None:
            grant = await budget.acquire(nbytes)
            order.append(name)
            await asyncio.sleep(0)
            budget.release(grant)

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)  # big is queued first
        smalls = [asyncio.create_task(take(f"small{i}", 10)) for i in range(5)]
        await asyncio.sleep(0.01)
        # 40 bytes are free, enough for every small one, but they queue behind the big one.
        assert order == []
        assert budget.in_use == 60
        budget.release(held)
        await asyncio.wait_for(asyncio.gather(big, *smalls), timeout=1)
        assert budget.in_use == 0
        return order

    order = asyncio.run(main())
    assert order[0] == "big"
    assert sorted(order[1:]) == [f"small{i}" for i in range(5)]


def test_waiters_are_served_in_arrival_order() -> None:
    async def main() -> list[int]:
        budget = ByteBudget(10)
        held = await budget.acquire(10)
        order: list[int] = []

        async def take(n: int) -> None:
            await budget.acquire(10)
            order.append(n)
            budget.release(10)

        tasks = []
        for n in range(6):
            tasks.append(asyncio.create_task(take(n)))
            await asyncio.sleep(0)
        budget.release(held)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=1)
        return order

    assert asyncio.run(main()) == list(range(6))


def test_cancelled_waiter_does_not_leak_capacity() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        held = await budget.acquire(100)
        waiter = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        budget.release(held)
        assert budget.in_use == 0
        # All capacity can be acquired again, at once.
        assert await asyncio.wait_for(budget.acquire(100), timeout=1) == 100
        assert budget.in_use == 100

    asyncio.run(main())


def test_cancelled_head_waiter_unblocks_the_ones_behind() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        held = await budget.acquire(50)  # 50 free
        big = asyncio.create_task(budget.acquire(100))
        await asyncio.sleep(0)
        small = asyncio.create_task(budget.acquire(30))
        await asyncio.sleep(0.01)
        assert not small.done()  # queued behind the big one
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert await asyncio.wait_for(small, timeout=1) == 30
        assert budget.in_use == 80
        budget.release(30)
        budget.release(held)
        assert budget.in_use == 0

    asyncio.run(main())


def test_waiter_cancelled_after_being_granted_gives_the_grant_back() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        held = await budget.acquire(100)
        waiter = asyncio.create_task(budget.acquire(60))
        await asyncio.sleep(0)
        budget.release(held)  # grants the waiter (its future resolves)...
        waiter.cancel()  # ...but it is cancelled before it gets to run
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.in_use == 0
        assert await asyncio.wait_for(budget.acquire(100), timeout=1) == 100

    asyncio.run(main())


def test_many_cancellations_do_not_leak() -> None:
    async def main() -> None:
        budget = ByteBudget(64)
        held = await budget.acquire(64)
        waiters = [asyncio.create_task(budget.acquire(n)) for n in (1, 8, 16, 32, 64)]
        await asyncio.sleep(0)
        for task in waiters[::2]:
            task.cancel()
        await asyncio.sleep(0)
        budget.release(held)
        results = await asyncio.gather(*waiters, return_exceptions=True)
        granted = 0
        for task, result in zip(waiters, results, strict=True):
            if task.cancelled():
                assert isinstance(result, asyncio.CancelledError)
            else:
                granted += result  # type: ignore[operator]
                budget.release(result)  # type: ignore[arg-type]
        assert granted == 8 + 32
        assert budget.in_use == 0
        assert await asyncio.wait_for(budget.acquire(64), timeout=1) == 64

    asyncio.run(main())


def test_cancel_then_release_before_waiter_runs_raises_cancelled_error() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        held = await budget.acquire(10)
        waiter = asyncio.create_task(budget.acquire(5))
        await asyncio.sleep(0)  # waiter is queued
        waiter.cancel()  # cancels the waiter's future at once
        budget.release(held)  # _wake() pops the cancelled waiter before its task runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.in_use == 0

    asyncio.run(main())


def test_cancelling_holder_and_waiter_together() -> None:
    async def main() -> list[object]:
        budget = ByteBudget(10)
        acquired = asyncio.Event()

        async def holder() -> None:
            grant = await budget.acquire(10)
            acquired.set()
            try:
                await asyncio.sleep(10)
            finally:
                budget.release(grant)  # runs when the task is cancelled

        async def waiter() -> None:
            grant = await budget.acquire(5)
            budget.release(grant)

        tasks = [asyncio.create_task(holder())]
        await acquired.wait()
        tasks.append(asyncio.create_task(waiter()))
        await asyncio.sleep(0)  # the waiter is queued
        for task in tasks:  # a TaskGroup's abort cancels its tasks the same way
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert budget.in_use == 0
        return results

    results = asyncio.run(main())
    assert [type(r) for r in results] == [asyncio.CancelledError, asyncio.CancelledError]
