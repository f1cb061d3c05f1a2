"""A byte budget: the bound on bytes buffered in flight, whatever the number of workers.

`workers x part size x parts per file` is the memory bill of a naive uploader; here every
buffer (a small file's body, one part) is paid for before it is read and refunded when it
has been sent, so the sum never exceeds ``capacity``. Waiters are served first come, first
served, so a large part is not starved by a stream of small files.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._available = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self._available

    async def acquire(self, nbytes: int) -> int:
        """Wait until ``nbytes`` (clamped to the capacity) are free; return the grant."""
        grant = max(0, min(nbytes, self.capacity))
        if not self._waiters and self._available >= grant:
            self._available -= grant
            return grant
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (grant, future)
        self._waiters.append(waiter)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(grant)  # granted just as we were cancelled: give it back
            else:
                # _wake() may already have dropped this (cancelled) waiter from the queue.
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._wake()
            raise
        return grant

    def release(self, grant: int) -> None:
        self._available += grant
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._available:
            grant, future = self._waiters.popleft()
            if future.done():
                continue
            self._available -= grant
            future.set_result(None)


def release_large_buffers_promptly() -> None:
    """Make glibc return freed part buffers to the system at once.

    Part buffers are megabytes each, allocated in worker threads. glibc raises its mmap
    threshold after the first such buffer is freed, so later ones come from per-thread
    arenas that keep the memory after it is freed: the process then holds several times
    the byte budget. A fixed threshold (which also turns off that adjustment) keeps every
    buffer of 1 MiB or more in its own mapping, unmapped when freed. No-op off glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        # The symbols the process already has: libc's own where it is glibc. (find_library
        # would run `ldconfig -p` in a subprocess: some milliseconds on every start.)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1024 * 1024)
