"""The domain errors every stage raises, and the exit codes they map to.

Store errors are translated once, at the storage layer (s3.py), into this small hierarchy with
the original exception kept as ``__cause__``; everything above the store reasons about these
classes only. The split that matters: transient errors are retried, per-file errors fail one
file, and fatal errors (bad configuration, bad credentials, missing bucket) stop the whole run.
"""

from __future__ import annotations

import asyncio

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# The shells' convention for a writer whose reader went away (`yes | head`): 128 + SIGPIPE.
EXIT_CLOSED_PIPE = 141
# `run`'s own, as `env`, `timeout` and shells answer: COMMAND not found / not executable.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126


class AsyncsyncError(Exception):
    """Base class of every error asyncsync reports to its user."""

    exit_code = EXIT_SOME_FAILED  # the CLI's, when it ends a command


class CommandNotStarted(AsyncsyncError):
    """`run`'s COMMAND could not be started: 127 not found, 126 not executable (the exit
    codes of `env`, `timeout` and the shells, apart from the child's own and 128+N)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(AsyncsyncError):
    """Bad usage or configuration: the run cannot start (exit code 2)."""


class ManifestError(ConfigError):
    """The manifest database cannot be opened, read or written."""


class ManifestFull(ManifestError):
    """The manifest cannot be written because the state directory's disk is full: nothing
    is wrong with the settings, and it passes once there is room again (a daemon rides it
    out, as it rides out a store outage)."""


class StoreError(AsyncsyncError):
    """An object store operation failed.

    ``op`` is the store operation (PutObject, UploadPart, ...), ``key`` the object key when
    there is one, ``code`` the store's error code when it sent one.
    """

    def __init__(self, message: str, *, op: str = "", key: str = "", code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.op = op
        self.key = key
        self.code = code

    def __str__(self) -> str:
        return self.message


class TransientStoreError(StoreError):
    """Worth retrying: 5xx, throttling, connection reset, timeout."""


class FatalStoreError(StoreError, ConfigError):
    """No point going on with any file: wrong credentials, access denied, no such bucket."""


class EndpointUnreachable(AsyncsyncError):
    """The store did not answer at all, after every retry: nothing could be sent."""


class NoSuchUpload(StoreError):
    """A multipart upload id the store no longer knows (completed, aborted or expired)."""


class NotFound(StoreError):
    """The object does not exist."""


class ObjectChanged(StoreError):
    """The object is not (or no longer) the version asked for: its ETag differs from the
    ``if_match`` given, or it was replaced while its body was being read. Nothing of two
    versions is ever spliced together; read it again from the start."""


class BadDigest(TransientStoreError):
    """What the store says it stored is not what was sent: its ETag is an MD5 other than the
    body's, or the checksum it echoes is not the one sent. The body was damaged on the way,
    and the store did not check (or a proxy rewrote its answer). Sending it again is the
    cure; such an object is never recorded as uploaded."""


class NotSupported(StoreError):
    """The store does not implement the operation (405 MethodNotAllowed, 501 NotImplemented):
    retrying cannot help, another way round can."""


class SourceChanged(AsyncsyncError):
    """The file changed while it was being read for upload; nothing was published."""


class SourceVanished(AsyncsyncError):
    """The file disappeared between the scan and its upload."""


class SourceNotRegular(AsyncsyncError):
    """The file (or a directory on its path) is no longer what the scan saw but a symlink,
    a FIFO or the like: it was not read, and is not uploaded. The message is the reason
    alone; the caller names the file."""


# The store's error codes for "slow down": the answer to load, not a fault.
_THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "429",
})


def store_cause(exc: BaseException) -> str:
    """The class of a store failure, for the ``reason`` label of the failure and retry
    metrics: throttled, server (a 5xx answer), network (no answer: refused, reset, timed
    out), auth (credentials or permissions), integrity (the body was damaged on the way),
    or other. A fixed, small set, whatever the store sends."""
    if isinstance(exc, BadDigest):
        return "integrity"
    code = exc.code if isinstance(exc, StoreError) else ""
    if code in _THROTTLE_CODES:
        return "throttled"
    if isinstance(exc, FatalStoreError):
        return "auth" if code != "NoSuchBucket" else "other"
    if isinstance(exc, TransientStoreError):
        return "network" if not code else "server"
    if isinstance(exc, EndpointUnreachable):
        return "network"
    return "other"


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that made a task group fail, not the cancellations it caused."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
