"""The composition root: the one place that opens the stages of a pipeline and closes them.

push, watch, run and attach() ask `Pipeline.open` for the manifest, its scope, the store
session, the uploader with its byte budget and temp directory, and the scan options; the
commands that read back (pull, verify, status, runs, shards, metrics export, doctor, a
shard's manifest restore) ask `Pipeline.open_read` (or, for the manifest alone,
`open_manifest`) for the manifest they need, its scope and the store session. None of them
builds those itself, so that what one command gets (a temp directory for gzip, --retries for
a file:// store, the abort of orphaned uploads, the store's known capabilities) every command
gets. The stages are closed in the reverse order they were opened, whatever ends the run.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

from ..config import Destination, PushConfig, StoreConfig, TransferConfig
from ..errors import ManifestError, NotSupported
from ..stores.capabilities import Capabilities
from ..stores.protocol import ObjectStore
from ..stores.session import StoreSession, open_store, store_opener
from .budget import ByteBudget
from .events import Events
from .keys import PathFilter
from .manifest import MANIFEST_FILE, Manifest, PendingUpload, Scope
from .plan import uses_multipart
from .scan import ScanOptions
from .transfer import Uploader

log = logging.getLogger("asyncsync")


def scope_of(destination: Destination, store: StoreConfig) -> Scope:
    """Manifest scope: which store (endpoint) and bucket rows belong to."""
    if destination.scheme == "file":
        return Scope("file", destination.bucket)
    name = store.endpoint_url.rstrip("/") if store.endpoint_url else "aws"
    if not store.endpoint_url and store.profile:
        name = f"aws:{store.profile}"
    return Scope(name, destination.bucket)


def scope_for(config: PushConfig) -> Scope:
    """The manifest scope of a push-shaped config (push, watch, run, attach(), verify)."""
    return scope_of(config.destination, config.store)


def state_dir_inside(source: Path, state_dir: Path) -> frozenset[str]:
    """The state directory's path relative to the source, if it lives inside it."""
    try:
        relative = state_dir.resolve().relative_to(source.resolve())
    except ValueError:
        return frozenset()
    return frozenset({relative.as_posix()}) if relative.parts else frozenset()


def scan_options_for(config: PushConfig) -> ScanOptions:
    # A shard's state lives in STATE/shards/N-I: the whole of STATE is never uploaded.
    state_dir = config.state_dir.parents[1] if config.shard is not None else config.state_dir
    return ScanOptions(
        follow_symlinks=config.follow_symlinks,
        path_filter=PathFilter(config.include, config.exclude),
        skip_paths=state_dir_inside(config.source, state_dir),
        shard=config.shard,
    )


@contextlib.contextmanager
def open_manifest(state_dir: Path, *, read_only: bool = False) -> Iterator[Manifest]:
    """The manifest of ``state_dir``, closed when the block ends. ``read_only``: an existing
    one, read beside a writer (a watch daemon holding it open), changing nothing on disk."""
    manifest = Manifest.open(state_dir, read_only=read_only)
    try:
        yield manifest
    finally:
        manifest.close()


def known_capabilities(manifest: Manifest | None, scope: Scope) -> Capabilities:
    """What this store was seen to do in earlier runs; what it shows now is kept, where the
    manifest may be written."""
    if manifest is None:
        return Capabilities()
    if manifest.read_only:
        # A reader uploads nothing, so they are only a hint, and it writes none back; a
        # manifest too damaged to give them fails at the reader's own first query instead.
        try:
            return Capabilities(manifest.capabilities(scope))
        except ManifestError:
            return Capabilities()
    known = manifest.capabilities(scope)
    return Capabilities(known, on_learn=lambda capability, value: manifest.learn_capability(
        scope, capability.value, value))


class ManifestUse(enum.Enum):
    """What a command that reads back needs of the manifest."""

    NONE = "none"  # the bucket alone: pull, runs, shards, metrics export, a shard's restore
    READ = "read"  # read-only, beside a writer; no manifest is an error
    # Read-only where there is one (verify: it only saves work); none, or one that cannot be
    # read, leaves `ReadSession.manifest` None.
    READ_IF_ANY = "read-if-any"
    WRITE = "write"  # created or brought up to date (doctor keeps what it probed)


def _enter_manifest(
    closing: contextlib.ExitStack, state_dir: Path, use: ManifestUse,
) -> tuple[Manifest | None, ManifestError | None]:
    """The manifest ``use`` asks for, closed with ``closing``; or None, and why not."""
    if use is not ManifestUse.READ_IF_ANY:
        read_only = use is ManifestUse.READ
        return closing.enter_context(open_manifest(state_dir, read_only=read_only)), None
    if not (state_dir / MANIFEST_FILE).is_file():
        return None, None
    try:
        return closing.enter_context(open_manifest(state_dir, read_only=True)), None
    except ManifestError as exc:
        return None, exc


class ReadSession:
    """The open stages of a command that reads back: the manifest where it asked for one,
    the scope its rows are under, and the store session. Nothing is uploaded from here, so
    there is no uploader, byte budget or temp directory. Use `Pipeline.open_read`."""

    def __init__(self, scope: Scope, manifest: Manifest | None, session: StoreSession,
                 manifest_problem: ManifestError | None = None) -> None:
        self.scope = scope
        self.manifest = manifest
        self.session = session
        # Why a manifest that is there could not be read (`ManifestUse.READ_IF_ANY`).
        self.manifest_problem = manifest_problem

    async def store(self) -> ObjectStore:
        return await self.session.get()


class Pipeline:
    """The open stages of one (source, destination) pair. Use `Pipeline.open`."""

    def __init__(
        self, config: PushConfig, events: Events, manifest: Manifest, session: StoreSession,
        uploader: Uploader,
    ) -> None:
        self.config = config
        self.events = events
        self.scope = scope_for(config)
        self.manifest = manifest
        self.session = session
        self.uploader = uploader
        self.scan_options = scan_options_for(config)
        prefix = config.destination.prefix
        self.key_base = f"{prefix}/" if prefix else ""  # what every key of the tree starts with

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, config: PushConfig, events: Events, *, daemon: bool = False, settles: bool = False,
    ) -> AsyncIterator[Pipeline]:
        """Open the stages for ``config``; outcomes, retries and bytes go to ``events``.

        ``daemon``: for watch, run and attach(), which outlive a store outage: a failure to
        open the store is not remembered, the next upload tries again. ``settles``: a file
        that changes under its upload is left to the caller's settle logic (watch) instead
        of being read again at once.
        """
        with open_manifest(config.state_dir) as manifest:
            scope = scope_for(config)
            # Bytes are counted where they leave: the store, every attempt.
            session = StoreSession(open_store(config, events.retried,
                                              known_capabilities(manifest, scope), events.sent),
                                   config.store.max_attempts, sticky=not daemon)
            transfer = replace(config.transfer, changed_retries=0) if settles else config.transfer
            uploader = Uploader(
                store=session.get, manifest=manifest, scope=scope, config=transfer,
                budget=ByteBudget(transfer.max_memory), temp_dir=config.state_dir / "tmp",
                dry_run=config.dry_run,
            )
            try:
                yield cls(config, events, manifest, session, uploader)
            finally:
                uploader.close()
                await session.close()

    @staticmethod
    @contextlib.asynccontextmanager
    async def open_read(
        destination: Destination, store: StoreConfig, *,
        on_retry: Callable[..., None] | None = None,
        on_sent: Callable[[int], None] | None = None, max_bandwidth: float | None = None,
        state_dir: Path | None = None, manifest: ManifestUse = ManifestUse.NONE,
        fresh_capabilities: bool = False, check_bucket: bool = True,
    ) -> AsyncIterator[ReadSession]:
        """Open what a command that reads back needs: the manifest of ``state_dir`` as
        ``manifest`` says, and the store session the uploads would get (--retries,
        ``max_bandwidth``, the capabilities the manifest knows; retries go to ``on_retry``,
        bytes sent to ``on_sent``). The store is opened on first use; the session is
        closed before the manifest.

        ``fresh_capabilities``: the store starts knowing nothing of itself (doctor finds
        each out again, and records what it found). ``check_bucket``: False leaves the
        bucket check to the caller (doctor reads the client's settings and the store's
        clock first).
        """
        scope = scope_of(destination, store)
        with contextlib.ExitStack() as closing:
            opened: Manifest | None = None
            problem: ManifestError | None = None
            if manifest is not ManifestUse.NONE:
                if state_dir is None:
                    raise ValueError(f"manifest {manifest.value!r} needs a state directory")
                opened, problem = _enter_manifest(closing, state_dir, manifest)
            capabilities = known_capabilities(None if fresh_capabilities else opened, scope)
            session = StoreSession(
                store_opener(destination, store, on_retry, max_bandwidth=max_bandwidth,
                             capabilities=capabilities, on_sent=on_sent),
                store.max_attempts, check_bucket=check_bucket,
            )
            try:
                yield ReadSession(scope, opened, session, problem)
            finally:
                await session.close()

    async def store(self) -> ObjectStore:
        return await self.session.get()

    async def abort_orphans(self, keep: Callable[[PendingUpload], bool]) -> int:
        """Abort the multipart uploads the manifest holds for files of this source that
        ``keep`` does not vouch for (the file is gone, or will never resume them): left
        alone, a store bills them forever. Returns how many were aborted."""
        root = os.path.join(str(self.config.source), "")
        orphans = [
            pending
            for pending in self.manifest.pending_uploads(self.scope, self.key_base)
            if pending.source.startswith(root) and not keep(pending)
        ]
        if not orphans:
            return 0
        store = await self.store()
        aborted = 0
        for pending in orphans:
            try:
                await store.abort_multipart_upload(pending.key, pending.upload_id)
            except NotSupported as exc:
                # Kept, it would be tried again on every run, forever.
                log.warning("%s: %s; the stale upload is left to the store's own expiry",
                            pending.key, exc)
                self.manifest.forget_upload(self.scope, pending.key, pending.upload_id)
                continue
            except Exception as exc:  # noqa: BLE001 - kept in the manifest for the next run
                log.warning("%s: could not abort stale upload: %s", pending.key, exc)
                continue
            self.manifest.forget_upload(self.scope, pending.key, pending.upload_id)
            log.info("%s: aborted stale upload of a file that is gone", pending.key)
            aborted += 1
        return aborted


def never_resumed(pending: PendingUpload, config: TransferConfig) -> bool:
    """A pending upload that no later upload of its file will take up: the file is gone,
    or now small enough for one PUT (the final, stripped last.pt after the checkpoints of a
    killed run), which never looks at multipart uploads."""
    try:
        size = os.stat(pending.source, follow_symlinks=False).st_size
    except OSError:
        return True
    return not uses_multipart(size, config)
