"""When quick blocking work may run on the event loop's own thread.

Reading a small file or stat()ing a directory's entries takes microseconds from the page
cache, while a hop to a worker thread and back costs far more (futex wake-ups, GIL
handoffs: measured at ~0.1 ms of CPU per small-file upload, and 15% of a no-op re-run). So
such work runs inline while it stays quick. On a slow filesystem it would stall every
upload on the loop, so after repeated slow calls the gate closes for good and the work
goes to worker threads. One slow call is not enough: on a busy machine the loop's thread
is sometimes preempted in the middle of a fast read.
"""

from __future__ import annotations


class InlineGate:
    def __init__(self, slow_seconds: float, strikes: int) -> None:
        self.slow_seconds = slow_seconds
        self.strikes = strikes
        self.open = True
        self._slow = 0

    def record(self, seconds: float) -> None:
        """How long one inline call took."""
        if seconds > self.slow_seconds:
            self._slow += 1
            if self._slow >= self.strikes:
                self.open = False
        elif self._slow:
            self._slow -= 1
