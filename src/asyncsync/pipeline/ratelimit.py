"""Bandwidth politeness: one token bucket shared by every transfer of the process.

Uploads must not starve the training job's own I/O (`--max-bandwidth`). Every body that goes
to the store is paid for here before it is sent, whichever worker or part sends it, so the
process as a whole stays under the rate. Tokens are bytes; the bucket refills at the rate
and holds at most ``burst``. A request larger than the burst (one multipart part at a low
rate, say) is not refused: it waits for a full bucket and then drives it negative, and the
callers after it wait the debt off, so the long-run average still never exceeds the rate.
Waiters are served strictly in arrival order, and a waiter cancelled before it is served
takes nothing.
"""

from __future__ import annotations

import asyncio
import math
import re
import time

from ..errors import ConfigError

KiB = 1024
DEFAULT_MIN_BURST = 256 * KiB

# Decimal prefixes (kB, MB) because bandwidth is quoted that way; binary ones (KiB) on
# request. A lowercase 'b' is refused rather than guessed: "50Mb/s" means megabits to
# network people and megabytes to others, and either guess is wrong by a factor of 8.
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i)?)?(b)?\s*(?:/\s*s)?\s*$",
                      re.IGNORECASE)
_PREFIX = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_rate(text: str) -> float:
    """'50MB/s', '50MiB/s', '1.5GB', '800k', '1048576' -> bytes per second."""
    examples = "examples: 50MB/s, 50MiB/s, 1.5GB/s, 800k, 1048576"
    match = _RATE_RE.match(text)
    if not match:
        raise ConfigError(f"--max-bandwidth: {text!r} is not a rate ({examples})")
    number, prefix, binary, unit = match.groups()
    if unit == "b":
        raise ConfigError(
            f"--max-bandwidth: {text!r} is ambiguous (bits or bytes?); write B for bytes, "
            "e.g. 50MB/s"
        )
    base = 1024 if binary else 1000
    rate = float(number) * base ** _PREFIX[prefix.lower()] if prefix else float(number)
    if not rate > 0 or math.isinf(rate):
        raise ConfigError(f"--max-bandwidth: {text!r} must be a positive rate ({examples})")
    return rate


class RateLimiter:
    """A token bucket of bytes, fair (FIFO) and cancellation-safe; see the module docstring."""

    def __init__(self, bytes_per_second: float, burst: int | None = None) -> None:
        if not (bytes_per_second > 0 and math.isfinite(bytes_per_second)):
            raise ValueError("bytes_per_second must be a positive, finite number")
        if burst is None:
            # A quarter second of rate smooths scheduling jitter without letting a large
            # backlog go out in one lump; the floor keeps slow rates from crawling per chunk.
            burst = max(DEFAULT_MIN_BURST, int(bytes_per_second / 4))
        if burst <= 0:
            raise ValueError("burst must be positive")
        self._rate = float(bytes_per_second)
        self._burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()
        # Only the waiter at the head of the queue holds the lock and sleeps on the clock;
        # asyncio.Lock hands itself over in arrival order, which is what makes take() FIFO.
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent, then pay for them."""
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        if nbytes == 0:
            return
        # Uncontended, acquiring the lock does not suspend: the fast path costs no yield.
        async with self._lock:
            # More than a full bucket can never be available: such a request waits for a
            # full bucket and leaves the rest as debt for the callers after it.
            need = min(nbytes, self._burst)
            self._refill()
            while self._tokens < need:
                await asyncio.sleep((need - self._tokens) / self._rate)
                self._refill()
            # No await between the check and the payment, so a cancellation (which can only
            # land on an await) never leaves a half-paid request behind.
            self._tokens -= nbytes

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(float(self._burst), self._tokens + (now - self._updated) * self._rate)
        self._updated = now
