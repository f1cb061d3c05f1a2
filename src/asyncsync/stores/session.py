"""The store a run talks to, opened once on first use and shared by every stage.

`open_store` picks the implementation for the destination's scheme (S3 or a ``file://``
directory) with the run's retry and bandwidth settings; `StoreSession` defers opening it until
something needs it (a re-run that finds nothing to send never imports botocore) and remembers
a failure to open, so that a thousand waiting files do not each sit through the backoff
schedule again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..config import Destination, PushConfig, StoreConfig
from ..errors import EndpointUnreachable, FatalStoreError, TransientStoreError
from .capabilities import Capabilities
from .protocol import ObjectStore


class StoreSession:
    """Opens the store on first use, checks the bucket once (unless told not to), and
    shares it.

    Opening is deferred because a re-run that finds nothing to send never needs the store
    (nor botocore's import time). A failure to open is remembered: every later caller gets
    the same error at once instead of retrying the whole backoff schedule again.
    """

    def __init__(self, opener: Callable[[], object], attempts: int, *, sticky: bool = True,
                 check_bucket: bool = True) -> None:
        self._opener = opener
        self._attempts = attempts
        # push gives up on an unreachable store; the watch daemon tries again later.
        self._sticky = sticky
        # doctor checks the bucket itself, after it has read the store's clock.
        self._check_bucket = check_bucket
        self._store: ObjectStore | None = None
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self._opening: asyncio.Task[ObjectStore] | None = None

    def open_soon(self) -> None:
        """Start opening the store now, in the background, for an upload about to need it.

        Opening is mostly imports, on the event loop's thread; the first large file's hash
        runs in a worker thread meanwhile instead of after it. A failure is not raised
        here: the first `get` raises it.
        """
        if self._store is not None or self._opening is not None or self._error is not None:
            return
        self._opening = asyncio.get_running_loop().create_task(self._open())
        self._opening.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[ObjectStore]) -> None:
        if self._opening is task:
            self._opening = None  # a later get() opens again unless the failure is sticky
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not logged as lost

    async def get(self) -> ObjectStore:
        if self._store is not None:
            return self._store
        if self._opening is not None:
            # Share the attempt under way, and its failure: never a second one behind it.
            return await asyncio.shield(self._opening)
        return await self._open()

    async def _open(self) -> ObjectStore:
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._error is not None:
                raise self._error
            if self._store is None:
                try:
                    store: ObjectStore = await self._opener()  # type: ignore[misc]
                    if self._check_bucket:
                        try:
                            await store.check_bucket()
                        except BaseException:
                            await store.close()
                            raise
                except TransientStoreError as exc:
                    error = EndpointUnreachable(
                        f"store unreachable: {exc} (gave up after {self._attempts} attempts)"
                    )
                    if self._sticky:
                        self._error = error
                    raise error from exc
                except FatalStoreError as exc:
                    if self._sticky:
                        self._error = exc
                    raise
                self._store = store
        return self._store

    async def close(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            # Its cancellation is collected; a cancellation of close() itself still raises.
            await asyncio.gather(opening, return_exceptions=True)
        if self._store is not None:
            await self._store.close()
            self._store = None


def open_store(
    config: PushConfig, on_retry: Callable[..., None], capabilities: Capabilities | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> Callable[[], object]:
    """The store of a push-shaped config (push, watch, run, attach()): see `store_opener`."""
    return store_opener(config.destination, config.store, on_retry,
                        max_bandwidth=config.transfer.max_bandwidth,
                        capabilities=capabilities, on_sent=on_sent)


def store_opener(
    destination: Destination, store: StoreConfig, on_retry: Callable[..., None] | None = None,
    *, max_bandwidth: float | None = None, capabilities: Capabilities | None = None,
    on_sent: Callable[[int], None] | None = None,
) -> Callable[[], object]:
    """The store implementation for the destination's scheme, opened on first use (hand it
    to `StoreSession`), with --retries and --max-bandwidth (a directory on NFS shares the
    node's network too), and, for S3, what the store is already known to do
    (``capabilities``). Every command that talks to a store opens it here, through the
    composition root (`pipeline.session`)."""
    pace: Callable[[int], Awaitable[None]] | None = None
    if max_bandwidth:
        from ..pipeline.ratelimit import RateLimiter

        pace = RateLimiter(max_bandwidth).take

    async def open_s3() -> ObjectStore:
        from .s3 import open_s3_store

        return await open_s3_store(
            destination.bucket, store, on_retry=on_retry, pace=pace,
            capabilities=capabilities, on_sent=on_sent,
        )

    async def open_directory() -> ObjectStore:
        from .local import open_file_store

        # The same --retries as S3: a directory on NFS fails transiently too.
        return await open_file_store(
            destination.bucket, max_attempts=store.max_attempts,
            on_retry=on_retry, pace=pace, on_sent=on_sent,
        )

    return open_directory if destination.scheme == "file" else open_s3
