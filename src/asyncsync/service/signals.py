"""SIGINT/SIGTERM for one command, written once: push, watch and run all stop this way.

A module of its own so that push, which needs only this from the daemon, does not load the
daemon (its dataclasses and the modules behind it cost every push's start some milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

log = logging.getLogger("asyncsync")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """SIGINT/SIGTERM for one command: the first drains, a second exits at once with 128+N.

    ``drain`` is what the first signal does (cancel push, stop watch). Once a child's process
    group is known (`started`: run's training), the first signal goes to that group instead,
    and the second SIGKILLs it before exiting: exiting alone would leave a training that
    ignores signals running with nobody to wait for it. While the child is being spawned
    (`spawning`) it may exist without its pid known here, so signals are only remembered
    until `started` learns the pid: the first is passed on then, and a second one exits then.
    """

    def __init__(self, drain: Callable[[int], None]) -> None:
        self.received: list[int] = []
        self.arrived = asyncio.Event()
        self._drain = drain
        self._group: int | None = None
        self._spawning = False

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        # Left in place until the loop closes (which removes them): a second signal must
        # still exit at once while asyncio tears down (waiting for reader threads, say).
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, self._handle, signum)

    @contextlib.contextmanager
    def spawning(self) -> Iterator[None]:
        """Around the spawn of the child whose process group `started` names."""
        self._spawning = True
        try:
            yield
        finally:
            self._spawning = False

    def started(self, pid: int) -> None:
        """The child runs, as the leader of process group ``pid``."""
        self._group = pid
        if self.received:  # came while spawning: the training has not seen it
            self._forward(self.received[0])
        if len(self.received) > 1:
            self._exit(self.received[1])

    def _handle(self, signum: int) -> None:
        if self.received and not (self._spawning and self._group is None):
            self._exit(signum)
        self.received.append(signum)
        self.arrived.set()
        if self._group is not None:
            self._forward(signum)
        elif not self._spawning:
            self._drain(signum)

    def _forward(self, signum: int) -> None:
        assert self._group is not None
        log.warning("%s received: passing it to the training (again to kill it)",
                    signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._group, signum)

    def _exit(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._group is not None:
            log.warning("%s received again: killing the training and exiting", name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._group, signal.SIGKILL)
        else:
            log.warning("%s received again: exiting now", name)
        # os._exit skips every finally and atexit hook (that is the point), stdio flushes too.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(128 + signum)
