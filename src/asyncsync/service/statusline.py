"""watch's one-line status on a terminal: queued, in flight, the last upload, the store.

The line is redrawn in place (carriage return, erase to the end of the line) and never
wider than the terminal, so it never wraps. Log records still go to the same terminal:
`StatusLineHandler` erases the line before each record and draws it again after, so a log
line is never glued to the status. When stderr is not a terminal none of this is used and
the log is all there is.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import TextIO

from ..names import printable
from ..report import human_bytes
from .daemon import Snapshot


class StatusLine:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._text = ""
        self._lock = threading.Lock()  # log records may come from other threads

    def width(self) -> int:
        try:
            columns = os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        # A terminal that does not know its size (0 columns) gets the usual 80.
        return columns if columns > 0 else shutil.get_terminal_size((80, 24)).columns

    def show(self, text: str) -> None:
        with self._lock:
            # Escaped here too, whoever built the text: a newline would forge a line of its
            # own, an ESC sequence rewrite the terminal (the log's formatter never sees it).
            self._text = printable(text)
            self._draw()

    def _draw(self) -> None:
        if self._text:
            self._stream.write("\r" + self._text[: max(0, self.width() - 1)] + "\x1b[K")
            self._stream.flush()

    def erase(self) -> None:
        self._stream.write("\r\x1b[K")

    def around(self, record: logging.LogRecord, handler: logging.StreamHandler[TextIO]) -> None:
        """Write ``record`` through ``handler`` on a line of its own, the status below."""
        with self._lock:
            if self._text:
                self.erase()
            logging.StreamHandler.emit(handler, record)
            self._draw()

    def close(self) -> None:
        with self._lock:
            if self._text:
                self.erase()
                self._stream.flush()
            self._text = ""


class StatusLineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log handler that keeps `StatusLine` below the records it writes."""

    def __init__(self, stream: TextIO, status: StatusLine) -> None:
        super().__init__(stream)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        self.status.around(record, self)


def describe(snapshot: Snapshot, last_upload: tuple[str, float] | None,
             in_flight_bytes: int, now: float | None = None) -> str:
    """``watching: 3 queued, 1 in flight (24.0 MB), last upload train/last.pt 12s ago``.

    The file name and the store's problem are data: escaped (`printable`) as the log
    escapes them, so neither can break the line or send the terminal a control sequence."""
    now = time.time() if now is None else now
    fields = [f"{snapshot.pending} queued",
              f"{snapshot.in_flight} in flight"
              + (f" ({human_bytes(in_flight_bytes)})" if snapshot.in_flight else "")]
    if last_upload is not None:
        relative, when = last_upload
        fields.append(f"last upload {printable(relative)} {_ago(now - when)} ago")
    else:
        fields.append("nothing uploaded yet")
    if snapshot.store_up is False:
        fields.append(f"store unreachable: {printable(snapshot.store_problem)}")
    return "watching: " + ", ".join(fields)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
