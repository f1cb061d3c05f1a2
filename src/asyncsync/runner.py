"""`run`: a training command with the watch daemon around it.

The command runs as a child in its own process group while a `watch.Watcher` keeps DIR
mirrored. SIGTERM/SIGINT are forwarded to the child once; whenever the child ends — success,
error, crash, SIGKILL — the watcher does its shutdown flush and `run` exits with the child's
exit code (128+N when it died of signal N), or 1 when the child succeeded but the flush could
not send everything. A run record, ``PREFIX/_asyncsync/run.json``, says running, finished or
crashed, with the host, the times, and the epochs and final metrics found in results.csv.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from .config import WatchConfig
from .errors import EXIT_SOME_FAILED, AsyncsyncError
from .keys import object_key
from .push import StoreSession, open_store
from .record import RECORD_PATH, RunRecord, now_iso, training_progress
from .watch import Watcher

log = logging.getLogger("asyncsync")


def exit_code_of(returncode: int) -> int:
    """A shell's convention: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class DirectoryRecord(RunRecord):
    """The record of the directory `run` watches, ``PREFIX/_asyncsync/run.json``."""

    def __init__(self, config: WatchConfig, command: list[str]) -> None:
        self._directory = config.push.source
        session = StoreSession(open_store(config.push, lambda *a: None),
                               config.push.store.max_attempts, sticky=False)
        # Only the program's name: arguments may carry tokens or paths nobody meant to publish.
        super().__init__(session, object_key(config.push.destination.prefix, RECORD_PATH),
                         program=os.path.basename(command[0]))

    async def write(self, **fields: Any) -> bool:
        if self._directory.is_dir():
            fields["runs"] = training_progress(self._directory)
        return await super().write(**fields)

    async def close(self) -> None:
        await self._session.close()


async def run_training(config: WatchConfig, command: list[str]) -> int:
    """Run ``command`` under the watch daemon; return the exit code for `asyncsync run`."""
    watcher = Watcher(config)
    record = DirectoryRecord(config, command)
    try:
        child = await asyncio.create_subprocess_exec(*command, start_new_session=True)
    except OSError as exc:
        await record.close()
        raise AsyncsyncError(f"cannot start {command[0]!r}: {exc.strerror or exc}") from exc
    loop = asyncio.get_running_loop()
    forwarded: list[int] = []

    def forward(signum: int) -> None:
        if forwarded:  # a second signal: do not wait for anything
            os._exit(128 + signum)
        forwarded.append(signum)
        log.warning("%s received: passing it to the training", signal.Signals(signum).name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, forward, signum)
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
            await record.close()
    log.info("training exited with %d", exit_code_of(returncode))
    if returncode == 0 and watcher.unsent:
        log.error("the training succeeded but %d file(s) could not be uploaded",
                  watcher.unsent)
        return EXIT_SOME_FAILED
    return exit_code_of(returncode)

