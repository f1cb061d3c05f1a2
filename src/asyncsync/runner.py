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
import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import WatchConfig
from .errors import EXIT_SOME_FAILED, AsyncsyncError, StoreError
from .keys import object_key
from .push import EndpointUnreachable, StoreSession, open_store
from .store import ObjectAttributes
from .watch import Watcher

log = logging.getLogger("asyncsync")

RECORD_PATH = "_asyncsync/run.json"


def exit_code_of(returncode: int) -> int:
    """A shell's convention: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def training_progress(directory: Path) -> list[dict[str, Any]]:
    """Epochs done and the last row of metrics of every results.csv under ``directory``."""
    runs = []
    for results in sorted(directory.rglob("results.csv")):
        try:
            rows = list(csv.DictReader(io.StringIO(results.read_text(errors="replace"))))
        except OSError:
            continue
        last = {k.strip(): v.strip() for k, v in rows[-1].items() if k} if rows else {}
        runs.append({
            "path": results.parent.relative_to(directory).as_posix(),
            "epochs": len(rows),
            "metrics": last,
        })
    return runs


class RunRecord:
    """The run's record object in the bucket; failures to write it are logged, not fatal."""

    def __init__(self, config: WatchConfig, command: list[str]) -> None:
        self._config = config
        self._key = object_key(config.push.destination.prefix, RECORD_PATH)
        self._session = StoreSession(open_store(config.push, lambda *a: None),
                                     config.push.store.max_attempts, sticky=False)
        # Only the program's name: arguments may carry tokens or paths nobody meant to publish.
        self._fields: dict[str, Any] = {
            "status": "running", "host": socket.gethostname(),
            "program": os.path.basename(command[0]), "started": _now_iso(),
            "asyncsync": __version__,
        }

    async def write(self, **fields: Any) -> None:
        self._fields.update(fields)
        directory = self._config.push.source
        if directory.is_dir():
            self._fields["runs"] = training_progress(directory)
        body = json.dumps(self._fields, indent=2, sort_keys=True).encode()
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        try:
            store = await self._session.get()
            await store.put_object(self._key, body, md5_b64=md5, attributes=ObjectAttributes(
                metadata={}, content_type="application/json"))
        except (StoreError, EndpointUnreachable) as exc:
            log.warning("run record %s not written: %s", self._key, exc)

    async def close(self) -> None:
        await self._session.close()


async def run_training(config: WatchConfig, command: list[str]) -> int:
    """Run ``command`` under the watch daemon; return the exit code for `asyncsync run`."""
    watcher = Watcher(config)
    record = RunRecord(config, command)
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
            await record.write(status="finished" if code == 0 else "crashed", ended=_now_iso(),
                               exit_code=code, unsent=watcher.unsent)
            await record.close()
    log.info("training exited with %d", exit_code_of(returncode))
    if returncode == 0 and watcher.unsent:
        log.error("the training succeeded but %d file(s) could not be uploaded",
                  watcher.unsent)
        return EXIT_SOME_FAILED
    return exit_code_of(returncode)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
