"""`run`: a training command with the watch daemon around it.

Before the command starts, the destination is checked the way push checks it: a missing
bucket or credentials the store refuses stop `run` with exit 2 and the training never runs
(hours of training whose output cannot be kept help nobody); a store that does not answer
is only warned about, since the watcher waits for it as `watch` does. The command then runs
as a child in its own process group while a `watch.Watcher` keeps DIR mirrored. The first
SIGTERM/SIGINT is forwarded to the child's group; a second SIGKILLs that group and exits at
once with 128+N. Whenever the child ends — success, error, crash, SIGKILL — the watcher does
its shutdown flush and `run` exits with the child's exit code (128+N when it died of signal
N), or 1 when the child succeeded but the flush could not send everything. A run record,
``PREFIX/_asyncsync/run.json``, says running, finished or crashed, with the host, the times,
and the epochs and final metrics found in results.csv.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from ..config import WatchConfig
from ..errors import EXIT_SOME_FAILED, AsyncsyncError, ConfigError, FatalStoreError
from ..pipeline.keys import object_key
from .push import EndpointUnreachable, StoreSession, open_store
from .record import RECORD_PATH, RunRecord, now_iso, training_progress
from .watch import Watcher

log = logging.getLogger("asyncsync")

# A store that accepts connections but never answers would otherwise hold the training back
# for every attempt's read timeout (minutes); a working store answers in well under this.
CHECK_SECONDS = 30.0


def exit_code_of(returncode: int) -> int:
    """A shell's convention: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class DirectoryRecord(RunRecord):
    """The record of the directory `run` watches, ``PREFIX/_asyncsync/run.json``."""

    def __init__(self, config: WatchConfig, command: list[str], session: StoreSession) -> None:
        self._directory = config.push.source
        # Only the program's name: arguments may carry tokens or paths nobody meant to publish.
        super().__init__(session, object_key(config.push.destination.prefix, RECORD_PATH),
                         program=os.path.basename(command[0]))

    async def write(self, **fields: Any) -> bool:
        if self._directory.is_dir():
            fields["runs"] = training_progress(self._directory)
        return await super().write(**fields)


class Signals:
    """SIGINT/SIGTERM while `run` is up.

    Before the child exists a signal is only remembered: `run` then starts nothing, or, when
    it came while the child was being spawned, passes it on at once. Once the child runs, the
    first signal goes to its process group; a second SIGKILLs that group and exits, because
    exiting alone would leave a training that ignores signals running with nobody to wait
    for it.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.arrived = asyncio.Event()
        self.child: int | None = None
        self._spawning = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._handle, signum)

    def spawning(self) -> None:
        self._spawning = True

    def started(self, pid: int) -> None:
        self.child = pid
        if self.received:  # came while spawning: the training has not seen it
            self._forward(self.received[0])

    def _handle(self, signum: int) -> None:
        # While spawning, the child may exist without its pid known here: exiting then
        # could leave it behind, so every signal waits for `started`.
        if self.received and (self.child is not None or not self._spawning):
            if self.child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.child, signal.SIGKILL)
            os._exit(128 + signum)
        self.received.append(signum)
        self.arrived.set()
        if self.child is not None:
            self._forward(signum)
        elif not self._spawning:
            log.warning("%s received before the training started: not starting it",
                        signal.Signals(signum).name)

    def _forward(self, signum: int) -> None:
        assert self.child is not None
        log.warning("%s received: passing it to the training (again to kill it)",
                    signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child, signum)


async def check_destination(session: StoreSession, signals: Signals) -> bool:
    """Open the store and check the bucket; False if a signal came first.

    A store that says no (no such bucket, wrong keys) raises ConfigError; one that does not
    answer after every retry, or not within CHECK_SECONDS, is only logged, for the watcher
    to wait for.
    """
    check = asyncio.create_task(session.get())
    interrupted = asyncio.create_task(signals.arrived.wait())
    try:
        await asyncio.wait({check, interrupted}, timeout=CHECK_SECONDS,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (check, interrupted):
            task.cancel()
        await asyncio.gather(check, interrupted, return_exceptions=True)
    if signals.received:
        return False
    if check.cancelled():
        log.warning("the store has not answered in %.0fs; starting the training anyway, "
                    "uploads will keep trying", CHECK_SECONDS)
        return True
    try:
        check.result()
    except FatalStoreError as exc:
        raise ConfigError(f"{exc}; the training was not started") from exc
    except EndpointUnreachable as exc:
        log.warning("%s; starting the training anyway, uploads will keep trying", exc)
    return True


async def run_training(config: WatchConfig, command: list[str]) -> int:
    """Run ``command`` under the watch daemon; return the exit code for `asyncsync run`."""
    signals = Signals()
    signals.install(asyncio.get_running_loop())
    # One session checks the destination and then carries the run record.
    session = StoreSession(open_store(config.push, lambda *a: None),
                           config.push.store.max_attempts, sticky=False)
    try:
        if not await check_destination(session, signals):
            return 128 + signals.received[0]
        return await _supervise(config, command, session, signals)
    finally:
        await session.close()


async def _supervise(
    config: WatchConfig, command: list[str], session: StoreSession, signals: Signals
) -> int:
    watcher = Watcher(config)
    record = DirectoryRecord(config, command, session)
    signals.spawning()
    try:
        child = await asyncio.create_subprocess_exec(*command, start_new_session=True)
    except OSError as exc:
        raise AsyncsyncError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from exc
    signals.started(child.pid)
    watching = asyncio.create_task(watcher.run())
    await record.write(pid=child.pid)
    try:
        returncode = await child.wait()
    finally:
        watcher.request_stop()
        try:
            await watching
        finally:
            code = exit_code_of(child.returncode if child.returncode is not None else -9)
            await record.write(status="finished" if code == 0 else "crashed", ended=now_iso(),
                               exit_code=code, unsent=watcher.unsent)
    log.info("training exited with %d", exit_code_of(returncode))
    if returncode == 0 and watcher.unsent:
        log.error("the training succeeded but %d file(s) could not be uploaded",
                  watcher.unsent)
        return EXIT_SOME_FAILED
    return exit_code_of(returncode)
