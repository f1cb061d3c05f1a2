"""`run`: a training command with the watch daemon around it.

Before the command starts, the destination is checked the way push checks it: a missing
bucket or credentials the store refuses stop `run` with exit 2 and the training never runs
(hours of training whose output cannot be kept help nobody); a store that does not answer
is only warned about, since the daemon waits for it as `watch` does. The command then runs
as a child in its own process group while the watch daemon (`service.daemon.Daemon` ticking
`watch.WatchService`) keeps DIR mirrored. The daemon's signal policy, shared with watch and
push, passes the first SIGTERM/SIGINT to the child's group; a second SIGKILLs that group and
exits at once with 128+N. Whenever the child ends — success, error, crash, SIGKILL — the
daemon does its shutdown flush and `run` exits with the child's exit code (128+N when it died
of signal N), or 1 when the child succeeded but the flush could not send everything. A run
record, ``PREFIX/_asyncsync/run.json``, says running, finished or crashed, with the host, the
times, and the epochs and final metrics found in results.csv.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from ..config import WatchConfig
from ..errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    EXIT_SOME_FAILED,
    CommandNotStarted,
    ConfigError,
    EndpointUnreachable,
    FatalStoreError,
)
from ..pipeline.keys import object_key
from ..pipeline.session import Pipeline
from ..service.daemon import Daemon
from ..service.signals import Signals
from ..stores.session import StoreSession
from .record import RECORD_PATH, RunRecord, now_iso, training_progress
from .watch import open_pipeline, watch

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


async def check_destination(session: StoreSession, signals: Signals) -> bool:
    """Open the store and check the bucket; False if a signal came first.

    A store that says no (no such bucket, wrong keys) raises ConfigError; one that does not
    answer after every retry, or not within CHECK_SECONDS, is only logged, for the daemon
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


def _not_starting(signum: int) -> None:
    log.warning("%s received before the training started: not starting it",
                signal.Signals(signum).name)


async def run_training(config: WatchConfig, command: list[str]) -> int:
    """Run ``command`` under the watch daemon; return the exit code for `asyncsync run`."""
    # Until the training runs, a first signal only means "do not start it": the check of the
    # destination gives up, and nothing was started that would need a flush.
    daemon = Daemon(config, drain=_not_starting)
    async with daemon.running():
        # One pipeline: its store session checks the destination, carries the run record and
        # the daemon's uploads.
        async with open_pipeline(config, daemon) as pipeline:
            if pipeline is None:  # a signal came while waiting for room on the state disk
                return 128 + (daemon.signals.first or signal.SIGTERM)
            if not await check_destination(pipeline.session, daemon.signals):
                return 128 + daemon.signals.received[0]
            return await _supervise(config, command, pipeline, daemon)


async def _supervise(
    config: WatchConfig, command: list[str], pipeline: Pipeline, daemon: Daemon
) -> int:
    record = DirectoryRecord(config, command, pipeline.session)
    with daemon.signals.spawning():
        try:
            child = await asyncio.create_subprocess_exec(*command, start_new_session=True)
        except OSError as exc:
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
            raise CommandNotStarted(f"cannot start {command[0]!r}: {exc.strerror or exc}",
                                    code) from exc
        daemon.signals.started(child.pid)
    daemon.metrics.training_status = "running"
    watching = asyncio.create_task(watch(config, daemon, pipeline))
    await record.write(pid=child.pid)
    unsent = 0
    try:
        returncode = await child.wait()
    finally:
        # Ended (or, on an error here, killed with its group by the signal handling).
        daemon.request_stop(writers_gone=child.returncode is not None)
        try:
            unsent = await watching
        finally:
            code = exit_code_of(child.returncode if child.returncode is not None else -9)
            status = "finished" if code == 0 else "crashed"
            daemon.metrics.training_ended(status)
            await record.write(status=status, ended=now_iso(), exit_code=code, unsent=unsent)
    log.info("training exited with %d", exit_code_of(returncode))
    if returncode == 0 and unsent:
        log.error("the training succeeded but %d file(s) could not be uploaded", unsent)
        return EXIT_SOME_FAILED
    return exit_code_of(returncode)
