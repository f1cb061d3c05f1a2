"""The run record: one small JSON object next to a run in the bucket.

`asyncsync run` writes ``PREFIX/_asyncsync/run.json`` for the directory it watches; the
Ultralytics integration writes ``PREFIX/<run>/_asyncsync/run.json`` for each training. Both
say running, finished or crashed, with the host, the times, and the epochs and latest
metrics read from results.csv, so a dashboard (or a person with `aws s3 cp`) can tell what
happened to a run without downloading it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EndpointUnreachable, SourceNotRegular, SourceVanished, StoreError
from ..pipeline.source import read_beneath
from ..stores.protocol import ObjectAttributes
from ..stores.session import StoreSession

log = logging.getLogger("asyncsync")

RECORD_PATH = "_asyncsync/run.json"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_results(results: Path, root: Path) -> dict[str, Any]:
    """Epochs done and the last row of metrics of one ultralytics results.csv, read beneath
    ``root`` without following links (the record is published: a results.csv swapped for a
    symlink to some other file must not put that file's last line in the bucket)."""
    try:
        text = read_beneath(str(results), str(root)).decode(errors="replace")
    except (OSError, SourceNotRegular, SourceVanished):
        return {"epochs": 0, "metrics": {}}
    rows = list(csv.DictReader(io.StringIO(text)))
    last = {k.strip(): (v or "").strip() for k, v in rows[-1].items() if k} if rows else {}
    return {"epochs": len(rows), "metrics": last}


def training_progress(directory: Path) -> list[dict[str, Any]]:
    """`read_results` for every results.csv under ``directory``, with its run's path."""
    return [
        {"path": results.parent.relative_to(directory).as_posix(),
         **read_results(results, directory)}
        for results in sorted(directory.rglob("results.csv"))
    ]


class RunRecord:
    """Writes the record object; failures are logged, never fatal to the run."""

    what = "run record"  # the object's name in the warning that it was not written

    def __init__(self, session: StoreSession, key: str, **fields: Any) -> None:
        self.key = key
        self._session = session
        self._last_error = ""
        self.fields: dict[str, Any] = {
            "status": "running", "host": socket.gethostname(), "started": now_iso(),
            "asyncsync": __version__, **fields,
        }

    async def write(self, **fields: Any) -> bool:
        self.fields.update(fields)
        body = json.dumps(self.fields, indent=2, sort_keys=True).encode()
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        try:
            store = await self._session.get()
            await store.put_object(self.key, body, md5_b64=md5, attributes=ObjectAttributes(
                metadata={}, content_type="application/json"))
        except (StoreError, EndpointUnreachable) as exc:
            if str(exc) != self._last_error:  # once per cause, not once per epoch
                log.warning("%s %s not written: %s", self.what, self.key, exc)
            self._last_error = str(exc)
            return False
        self._last_error = ""
        return True
