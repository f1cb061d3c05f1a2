"""The one retry layer: capped exponential backoff with full jitter.

botocore's own retries are switched off (s3.py) so that attempts never multiply; every store
call goes through `retry_transient`, which retries only `TransientStoreError`. An object body
is read through `ResumableBody`, which goes on where a dropped connection stopped it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

from ..errors import ObjectChanged, StoreError, TransientStoreError
from .protocol import ObjectInfo

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


RetryObserver = Callable[[TransientStoreError, int, float], None]


class RangeReader(Protocol):
    """One request's worth of an object's body, as a store opens it for `ResumableBody`."""

    @property
    def info(self) -> ObjectInfo:
        """What this answer says of the whole object (its ETag above all)."""
        ...

    @property
    def start(self) -> int:
        """The first byte this answer carries."""
        ...

    @property
    def end(self) -> int:
        """One past the last byte this answer carries."""
        ...

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes more; b"" at the end (or where the body was cut short).
        Errors come translated (a dropped connection is a TransientStoreError)."""
        ...

    async def close(self) -> None: ...


# (start, end or None for the object's end, ETag it must have or None) -> an open answer.
# Raises NotFound, ObjectChanged (the store refused the ETag) or another StoreError.
OpenRange = Callable[[int, int | None, str | None], Awaitable[RangeReader]]


def _bare(etag: str) -> str:
    return etag.strip('"')


class ResumableBody:
    """An object's bytes ``[offset, end)``, read through a store's `OpenRange`, retried at any
    point: a request that fails before its answer, or a body cut off half-way (reset,
    timeout, short read), costs one attempt; the next opens a new range from the first byte
    not yet delivered, pinned to the ETag of the first answer, so bytes of another version
    are never spliced on (`ObjectChanged` instead). The attempts count per chunk: a long body
    that keeps moving is never given up on for drops spread over hours, while a store that
    delivers nothing fails after ``attempts``. One chunk at a time is held: memory stays
    ``chunk_size`` plus what the transport buffers, whatever the object's size."""

    def __init__(
        self, open_range: OpenRange, *, key: str, location: str, offset: int = 0,
        end: int | None = None, if_match: str | None = None, chunk_size: int,
        attempts: int, backoff: Backoff, on_retry: RetryObserver | None = None,
    ) -> None:
        if offset < 0 or (end is not None and end < offset):
            raise ValueError(f"invalid byte range [{offset}, {end})")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self._open_range = open_range
        self._key, self._location = key, location
        self._offset, self._wanted_end = offset, end
        self._etag = if_match
        self._chunk_size = chunk_size
        self._attempts, self._backoff, self._on_retry = max(1, attempts), backoff, on_retry
        self._info: ObjectInfo | None = None
        self._end = offset
        self._position = offset
        self._reader: RangeReader | None = None

    @property
    def info(self) -> ObjectInfo:
        return self._entered()

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def end(self) -> int:
        self._entered()  # only the first answer tells it
        return self._end

    async def __aenter__(self) -> ResumableBody:
        self._reader = await self._retried(lambda: self._open(self._offset))
        self._info = self._reader.info
        self._etag = self._info.etag
        # A store that sends more than asked (a Range it ignored) is cut off at the end asked.
        wanted = self._reader.end if self._wanted_end is None else self._wanted_end
        self._end = max(self._offset, min(self._reader.end, wanted))
        if self._position >= self._end:
            await self._drop()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._drop()

    def __aiter__(self) -> ResumableBody:
        return self

    async def __anext__(self) -> bytes:
        self._entered()
        if self._position >= self._end:
            raise StopAsyncIteration
        return await self._retried(self._next_chunk)

    def _entered(self) -> ObjectInfo:
        if self._info is None:
            raise RuntimeError("an object body is read inside 'async with'")
        return self._info

    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(
            call, attempts=self._attempts, backoff=self._backoff, on_retry=self._on_retry
        )

    async def _open(self, start: int) -> RangeReader:
        # Resumed ranges end where the first answer said: its end is the object's version's.
        end = self._wanted_end if self._info is None else self._end
        reader = await self._open_range(start, end, self._etag)
        try:
            found = reader.info
            # The store was asked for this ETag (If-Match); checked here too, so a store
            # that ignores the condition still cannot splice another version on.
            if self._etag is not None and _bare(found.etag) != _bare(self._etag):
                raise self._changed(found)
            if self._info is not None and found.size != self._info.size:
                raise self._changed(found)
            if reader.start != start:
                raise StoreError(
                    f"GetObject {self._where}: asked for bytes from {start}, the store sent"
                    f" them from {reader.start}", op="GetObject", key=self._key,
                    code="InvalidRange",
                )
        except BaseException:
            await reader.close()
            raise
        return reader

    async def _next_chunk(self) -> bytes:
        if self._reader is None:
            self._reader = await self._open(self._position)
        want = min(self._chunk_size, self._end - self._position)
        try:
            chunk = await self._reader.read(want)
        except StoreError:
            await self._drop()  # a reader that failed once is never read again
            raise
        if not chunk:
            await self._drop()
            raise TransientStoreError(
                f"GetObject {self._where}: the body ended at byte {self._position} of"
                f" {self._end}", op="GetObject", key=self._key, code="IncompleteBody",
            )
        if len(chunk) > want:
            chunk = chunk[:want]
        self._position += len(chunk)
        if self._position >= self._end:
            await self._drop()  # frees the connection (or descriptor) before the caller exits
        return chunk

    async def _drop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()

    @property
    def _where(self) -> str:
        return f"{self._location}/{self._key}"

    def _changed(self, found: ObjectInfo) -> ObjectChanged:
        return ObjectChanged(
            f"GetObject {self._where}: the object changed (ETag {self._etag} is now"
            f" {found.etag}); read it again from the start", op="GetObject", key=self._key,
            code="ObjectChanged",
        )
