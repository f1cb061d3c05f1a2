"""The composition root: the one place that opens the stages of a pipeline and closes them.

push, watch, run and attach() (and the commands that read the bucket back) ask
`Pipeline.open` for the manifest, its scope, the store session, the uploader with its byte
budget and temp directory, and the scan options; none of them builds those itself, so that
what one command gets (a temp directory for gzip, --retries for a file:// store, the abort of
orphaned uploads) every command gets. The stages are closed in the reverse order they were
opened, whatever ends the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from ..config import PushConfig
from ..errors import NotSupported
from ..stores.capabilities import Capabilities
from ..stores.protocol import ObjectStore
from ..stores.session import StoreSession, open_store
from .budget import ByteBudget
from .events import Events
from .keys import PathFilter
from .manifest import Manifest, PendingUpload, Scope
from .scan import ScanOptions
from .transfer import Uploader

log = logging.getLogger("asyncsync")


def scope_for(config: PushConfig) -> Scope:
    """Manifest scope: which store (endpoint) and bucket rows belong to."""
    if config.destination.scheme == "file":
        return Scope("file", config.destination.bucket)
    store = config.store
    name = store.endpoint_url.rstrip("/") if store.endpoint_url else "aws"
    if not store.endpoint_url and store.profile:
        name = f"aws:{store.profile}"
    return Scope(name, config.destination.bucket)


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
        manifest = Manifest.open(config.state_dir)
        try:
            scope = scope_for(config)
            # What this store was seen to do in earlier runs; what it shows now is kept.
            capabilities = Capabilities(
                manifest.capabilities(scope),
                on_learn=lambda capability, value: manifest.learn_capability(
                    scope, capability.value, value
                ),
            )
            # Bytes are counted where they leave: the store, every attempt.
            session = StoreSession(open_store(config, events.retried, capabilities,
                                              events.sent),
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
        finally:
            manifest.close()

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


def source_gone(pending: PendingUpload) -> bool:
    """A pending upload whose file no longer exists can never be resumed."""
    return not os.path.lexists(pending.source)
