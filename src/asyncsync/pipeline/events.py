"""What the pipeline tells the world: typed outcomes and the one `Events` protocol.

Every stage reports through an `Events` sink: the terminal and JSON reporter, the Prometheus
metrics and attach()'s run tally are each one of them, and `Fanout` feeds several at once. A
file's outcome is a `FileOutcome` whose status and failure reason are enums (string-valued,
so JSON output and comparisons with the documented strings stay as they were), and it carries
the identity of what was read and sent, so that no consumer has to read the manifest again to
learn it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .digest import FileIdentity

if TYPE_CHECKING:
    from ..errors import TransientStoreError
    from .scan import FileStat, ScanIssue


class Status(enum.StrEnum):
    """What became of one file."""

    UPLOADED = "uploaded"  # sent, or copied server-side (`FileOutcome.copied`)
    UNCHANGED = "unchanged"
    WOULD_UPLOAD = "would-upload"  # --dry-run
    SKIPPED = "skipped"  # vanished, or no longer a regular file: nothing was read
    FAILED = "failed"


class Failure(enum.StrEnum):
    """Why a failed file failed (the reason label of the failure metric)."""

    STORE = "store"  # worth retrying later
    READ = "read"  # local I/O
    CHANGED = "changed"  # still being written: wait for it to settle
    KEY = "key"  # its name cannot be a key


@dataclass(frozen=True, slots=True)
class FileOutcome:
    relative: str
    key: str
    status: Status
    reason: str
    size: int
    bytes_sent: int = 0
    parts: int = 0
    resumed_parts: int = 0
    error: str | None = None
    failure: Failure | None = None  # set when failed
    # What was read (uploaded) or verified (unchanged): the identity the manifest now holds.
    identity: FileIdentity | None = None
    # An upload's duration, from the first read to the store's acknowledgement.
    seconds: float = 0.0
    # A store failure's class (`errors.store_cause`: throttled, server, network, auth...).
    cause: str = ""
    # Reads refused because the file changed under them (each one was read again).
    torn_reads: int = 0
    # Uploaded by a server-side copy of this key's object (same content): no body was sent.
    copied_from: str | None = None

    @property
    def copied(self) -> bool:
        """Whether the object was made by a server-side copy (dedup) rather than sent."""
        return self.copied_from is not None

    @property
    def failure_reason(self) -> str:
        """The reason label of the failure metric: the store failure's class, else the
        failure itself (read, changed, key)."""
        if self.failure is Failure.STORE:
            return self.cause or "other"
        return self.failure.value if self.failure is not None else "other"


class Events(Protocol):
    """The sink of everything a pipeline run reports. Methods are called on the event loop's
    thread and must return quickly (no I/O beyond a log line or a counter)."""

    def scanned(self, size: int) -> None:
        """A file was found that needs looking at (planned one by one)."""

    def unchanged_files(self, prefix: str, key_prefix: str, files: list[FileStat]) -> None:
        """Files of one directory (``prefix``) the manifest vouches for, in bulk."""

    def scan_finished(self) -> None:
        """The walk is over: totals are final from now on."""

    def issue(self, issue: ScanIssue) -> None:
        """Something the scan could not upload (a symlink, a FIFO, an unreadable dir)."""

    def outcome(self, outcome: FileOutcome) -> None:
        """One file's outcome."""

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        """A store request failed transiently and is tried again after ``pause``."""

    def sent(self, nbytes: int) -> None:
        """Body bytes that reached the store: every attempt it answered counts, so a body
        sent again (after a 503, or damaged on the way) counts again."""


class Fanout:
    """Several sinks as one, in order."""

    def __init__(self, sinks: Iterable[Events]) -> None:
        self._sinks = tuple(sinks)

    def scanned(self, size: int) -> None:
        for sink in self._sinks:
            sink.scanned(size)

    def unchanged_files(self, prefix: str, key_prefix: str, files: list[FileStat]) -> None:
        for sink in self._sinks:
            sink.unchanged_files(prefix, key_prefix, files)

    def scan_finished(self) -> None:
        for sink in self._sinks:
            sink.scan_finished()

    def issue(self, issue: ScanIssue) -> None:
        for sink in self._sinks:
            sink.issue(issue)

    def outcome(self, outcome: FileOutcome) -> None:
        for sink in self._sinks:
            sink.outcome(outcome)

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        for sink in self._sinks:
            sink.retried(exc, attempt, pause)

    def sent(self, nbytes: int) -> None:
        for sink in self._sinks:
            sink.sent(nbytes)


class NoEvents:
    """A sink that listens to nothing (a pipeline opened only for its manifest or store)."""

    def scanned(self, size: int) -> None:
        pass

    def unchanged_files(self, prefix: str, key_prefix: str, files: list[FileStat]) -> None:
        pass

    def scan_finished(self) -> None:
        pass

    def issue(self, issue: ScanIssue) -> None:
        pass

    def outcome(self, outcome: FileOutcome) -> None:
        pass

    def retried(self, exc: TransientStoreError, attempt: int, pause: float) -> None:
        pass

    def sent(self, nbytes: int) -> None:
        pass
