"""What a run tells its user: counters, per-file JSON lines, a progress bar, a summary.

stdout carries only machine-readable output (`--json`); logs, warnings and the progress
bar go to stderr. The progress bar is drawn only when stderr is a terminal.

File names and keys in log lines go through `names.printable`: a newline or an escape
sequence in a name is shown escaped, never acted on, whatever handler the records reach
(the CLI's text formatter escapes every message as well, which covers the other modules'
log lines). JSON lines carry names exactly: json.dumps escapes what JSON needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from .errors import TransientStoreError
from .names import printable
from .pipeline.events import FileOutcome, Status
from .pipeline.scan import FileStat, ScanIssue

log = logging.getLogger("asyncsync")
# The ETA's rate is the progress over this many seconds.
_RATE_WINDOW = 10.0
# A str as a JSON string literal, as json.dumps(..., ensure_ascii=False) writes it.
_json_string: Callable[[str], str] = json.encoder.encode_basestring


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Reporter:
    def __init__(
        self,
        *,
        json_lines: bool = False,
        progress: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.json_lines = json_lines
        self.progress = progress
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.started = time.monotonic()
        self.uploaded = 0
        self.copied = 0  # of the uploaded: made by a server-side copy, no body sent
        self.copied_bytes = 0  # their content: what dedup saved sending
        self.unchanged = 0
        self.would_upload = 0
        self.failed = 0
        self.ignored = 0
        self.bytes_sent = 0
        self.retries = 0
        self.resumed_parts = 0
        self.scanned_files = 0
        self.scanned_bytes = 0
        self.done_bytes = 0
        self.sent_by_done = 0  # bytes_sent of the files done: the rest is files under way
        self.scan_done = False
        # (time, bytes done) over the last seconds: the ETA's rate is the recent one, not
        # the average since a start that may have been all hashing or all small files.
        self._samples: deque[tuple[float, float]] = deque()

    # -- events ---------------------------------------------------------------------------

    def scanned(self, size: int) -> None:
        self.scanned_files += 1
        self.scanned_bytes += size

    def unchanged_files(self, prefix: str, key_prefix: str, files: list[FileStat]) -> None:
        """Files of one directory (relative path ``prefix + name``, key ``key_prefix +
        name``) that the manifest proves unchanged: counted at once, a re-run's common
        case."""
        if log.isEnabledFor(logging.DEBUG) or self.json_lines:
            files = sorted(files)  # the walk's order: by name
        if log.isEnabledFor(logging.DEBUG):
            for name, size, _, _ in files:
                self.scanned(size)
                self.outcome(FileOutcome(prefix + name, key_prefix + name, Status.UNCHANGED,
                                         "unchanged", size))
            return
        if self.json_lines:
            # The same records `outcome` prints, formatted without a dict and a dumps() per
            # file: a re-run of 100,000 unchanged files prints 100,000 of them.
            self.out.write("".join([
                f'{{"type": "file", "path": {_json_string(prefix + name)}, '
                f'"key": {_json_string(key_prefix + name)}, "status": "unchanged", '
                f'"reason": "unchanged", "size": {size}, "bytes": 0}}\n'
                for name, size, _, _ in files
            ]))
        nbytes = sum([file[1] for file in files])
        self.scanned_files += len(files)
        self.scanned_bytes += nbytes
        self.done_bytes += nbytes
        self.unchanged += len(files)

    def scan_finished(self) -> None:
        self.scan_done = True

    def sent(self, nbytes: int) -> None:
        self.bytes_sent += nbytes

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        self.retries += 1
        log.info("retry %d in %.2fs: %s", attempt, pause, printable(str(exc)))

    def issue(self, issue: ScanIssue) -> None:
        if issue.failed:
            self.failed += 1
            log.error("%s: %s", printable(issue.relative), printable(issue.message))
        else:
            self.ignored += 1
            log.warning("%s: %s", printable(issue.relative), printable(issue.message))
        self._emit(
            {"type": "file", "path": issue.relative,
             "status": "failed" if issue.failed else "ignored", "reason": issue.message}
        )

    def outcome(self, outcome: FileOutcome) -> None:
        status = outcome.status
        self.done_bytes += outcome.size
        self.sent_by_done += outcome.bytes_sent
        if status is Status.UPLOADED and outcome.copied_from is not None:
            self.uploaded += 1
            self.copied += 1
            self.copied_bytes += outcome.size
            log.info("copied %s -> %s (%s, same content as %s: not sent)",
                     printable(outcome.relative), printable(outcome.key),
                     human_bytes(outcome.size), printable(outcome.copied_from))
        elif status is Status.UPLOADED:
            self.uploaded += 1
            self.resumed_parts += outcome.resumed_parts
            log.info("uploaded %s -> %s (%s, %s)", printable(outcome.relative),
                     printable(outcome.key), human_bytes(outcome.size), outcome.reason)
        elif status is Status.UNCHANGED:
            self.unchanged += 1
            log.debug("unchanged %s", printable(outcome.relative))
        elif status is Status.WOULD_UPLOAD:
            self.would_upload += 1
            log.info("would upload %s -> %s (%s)", printable(outcome.relative),
                     printable(outcome.key), outcome.reason)
        elif status is Status.SKIPPED:
            self.ignored += 1
            log.warning("%s: %s", printable(outcome.relative), printable(outcome.reason))
        else:
            self.failed += 1
            log.error("%s: %s", printable(outcome.relative), printable(str(outcome.error)))
        if not self.json_lines:
            return  # a no-op run passes here once per file: build nothing it will not print
        record: dict[str, Any] = {
            "type": "file", "path": outcome.relative, "key": outcome.key,
            # A copy is an upload to every counter; the line says which kind it was.
            "status": "copied" if outcome.copied else status,
            "reason": outcome.reason, "size": outcome.size, "bytes": outcome.bytes_sent,
        }
        if outcome.copied_from is not None:
            record["copied_from"] = outcome.copied_from
        if outcome.parts:
            record["parts"] = outcome.parts
            record["resumed_parts"] = outcome.resumed_parts
        if outcome.error:
            record["error"] = outcome.error
        self._emit(record)

    def _emit(self, record: dict[str, Any]) -> None:
        if self.json_lines:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")

    # -- the end ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "type": "summary",
            "uploaded": self.uploaded,
            "copied": self.copied,
            "skipped": self.unchanged,
            "would_upload": self.would_upload,
            "failed": self.failed,
            "ignored": self.ignored,
            "bytes": self.bytes_sent,
            "retries": self.retries,
            "resumed_parts": self.resumed_parts,
            "scanned": self.scanned_files,  # files this run looked at (a shard: its own)
            "seconds": round(seconds, 3),
        }

    def finish(self, *, quiet: bool = False) -> dict[str, Any]:
        """Print the summary (a JSON line, or one human line on stderr) and return it."""
        self._clear_progress()
        summary = self.summary()
        if self.json_lines:
            self._emit(summary)
            self.out.flush()
        elif not quiet:
            seconds = max(summary["seconds"], 1e-9)
            uploaded = f"{self.uploaded} uploaded"
            if self.copied:
                uploaded += (f" ({self.copied} copied server-side,"
                             f" {human_bytes(self.copied_bytes)} not sent)")
            parts = [uploaded, f"{self.unchanged} unchanged"]
            if self.would_upload:
                parts.append(f"{self.would_upload} would upload")
            parts.append(f"{self.failed} failed")
            if self.ignored:
                parts.append(f"{self.ignored} ignored")
            rate = human_bytes(self.bytes_sent / seconds)
            self.err.write(
                f"asyncsync: {', '.join(parts)}; {human_bytes(self.bytes_sent)} sent "
                f"in {seconds:.1f}s ({rate}/s)"
                + (f", {self.retries} retries" if self.retries else "")
                + "\n"
            )
        return summary

    # -- progress bar -----------------------------------------------------------------------

    async def draw_progress(self, interval: float = 0.2) -> None:
        """Redraw one status line on stderr until cancelled."""
        if not self.progress:
            return
        while True:
            self._draw()
            await asyncio.sleep(interval)

    def _terminal_width(self) -> int:
        """The width of the terminal the line is drawn on (stderr's, not stdout's: stdout
        may be a pipe to jq), re-read each time: the window may be resized."""
        try:
            columns = os.get_terminal_size(self.err.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        # A terminal that does not know its size (0 columns) gets the usual 80.
        return columns if columns > 0 else shutil.get_terminal_size((80, 24)).columns

    def _draw(self) -> None:
        width = self._terminal_width()
        self.err.write("\r" + self.progress_line(time.monotonic(), width) + "\x1b[K")
        self.err.flush()

    def progress_line(self, now: float, width: int) -> str:
        """One line of at most ``width - 1`` characters (a full line would wrap on some
        terminals): files and bytes done of the whole job once the scan has found it all,
        the percent and an ETA from the bytes still to go at the recent rate."""
        files = self.uploaded + self.unchanged + self.failed + self.would_upload
        # Bytes done: whole files, plus what has gone up of those under way (their parts).
        done = self.done_bytes + max(0, self.bytes_sent - self.sent_by_done)
        total = self.scanned_bytes
        if self.scan_done:
            done = min(done, total)
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW:
            self._samples.popleft()
        first_time, first_done = self._samples[0]
        rate = (done - first_done) / (now - first_time) if now - first_time >= 0.5 else 0.0
        if self.scan_done:
            percent = 100.0 * done / total if total else 100.0
            fields = [f"{files}/{self.scanned_files} files",
                      f"{human_bytes(done)}/{human_bytes(total)}", f"{percent:.0f}%"]
        else:  # the total is not known yet: say what is known, and that more is coming
            fields = [f"{files} of {self.scanned_files}+ files", f"{human_bytes(done)}"]
        fields.append(f"{human_bytes(rate)}/s")
        if self.scan_done and rate > 0 and total > done:
            eta = int((total - done) / rate)
            fields.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}" if eta >= 3600
                          else f"ETA {eta // 60}:{eta % 60:02d}")
        if self.failed:
            fields.append(f"{self.failed} failed")
        line = "  ".join(fields)
        return line[: max(0, width - 1)]

    def _clear_progress(self) -> None:
        if self.progress:
            self.err.write("\r\x1b[K")
            self.err.flush()
