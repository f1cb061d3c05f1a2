"""The one retry layer: capped exponential backoff with full jitter.

botocore's own retries are switched off (s3.py) so that attempts never multiply; every store
call goes through `retry_transient`, which retries only `TransientStoreError`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import TransientStoreError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delay before retry number ``attempt`` (1-based): uniform in [0, min(cap, base * 2**n)).

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads the clients
    that failed together, so they do not come back together.
    """

    base: float = 0.1
    cap: float = 20.0

    def ceiling(self, attempt: int) -> float:
        return float(min(self.cap, self.base * (2 ** max(0, attempt - 1))))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, self.ceiling(attempt))


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    backoff: Backoff,
    on_retry: Callable[[TransientStoreError, int, float], None] | None = None,
) -> T:
    """Run ``call`` up to ``attempts`` times while it raises TransientStoreError."""
    attempt = 1
    while True:
        try:
            return await call()
        except TransientStoreError as exc:
            if attempt >= attempts:
                raise
            pause = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(exc, attempt, pause)
            await asyncio.sleep(pause)
            attempt += 1
