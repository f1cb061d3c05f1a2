"""`push`: one pass of the pipeline, scan -> manifest -> plan -> transfer -> store.

The scanner streams files; each is looked up in the manifest and planned; files that need
work go into a short bounded queue that at most ``workers`` worker tasks drain (so the walk
never runs far ahead of the uploads and memory stays flat), and the byte budget bounds what
those workers buffer. The watch daemon composes the same stages; only the driving loop
differs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..config import PushConfig
from ..errors import AsyncsyncError, FatalStoreError, TransientStoreError, first_error
from ..pipeline.budget import ByteBudget
from ..pipeline.keys import InvalidKey, PathFilter, object_key
from ..pipeline.manifest import Manifest, Scope
from ..pipeline.plan import Action, Decision, plan_file, uses_multipart
from ..pipeline.scan import (
    FileStat,
    Listing,
    ScanIssue,
    ScanItem,
    ScannedFile,
    ScanOptions,
    scan_listings,
)
from ..pipeline.transfer import FileOutcome, Uploader
from ..report import Reporter
from ..stores.protocol import ObjectInfo, ObjectStore

log = logging.getLogger("asyncsync")


class EndpointUnreachable(AsyncsyncError):
    """The store did not answer at all, after every retry: nothing could be sent."""


def scope_for(config: PushConfig) -> Scope:
    """Manifest scope: which store (endpoint) and bucket rows belong to."""
    if config.destination.scheme == "file":
        return Scope("file", config.destination.bucket)
    store = config.store
    name = store.endpoint_url.rstrip("/") if store.endpoint_url else "aws"
    if not store.endpoint_url and store.profile:
        name = f"aws:{store.profile}"
    return Scope(name, config.destination.bucket)


class StoreSession:
    """Opens the store on first use, checks the bucket once, and shares it.

    Opening is deferred because a re-run that finds nothing to send never needs the store
    (nor botocore's import time). A failure to open is remembered: every later caller gets
    the same error at once instead of retrying the whole backoff schedule again.
    """

    def __init__(self, opener: Callable[[], object], attempts: int, *, sticky: bool = True) -> None:
        self._opener = opener
        self._attempts = attempts
        # push gives up on an unreachable store; the watch daemon tries again later.
        self._sticky = sticky
        self._store: ObjectStore | None = None
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self._opening: asyncio.Task[ObjectStore] | None = None

    def open_soon(self) -> None:
        """Start opening the store now, in the background, for an upload about to need it.

        Opening is mostly imports, on the event loop's thread; the first large file's hash
        runs in a worker thread meanwhile instead of after it. A failure is not raised
        here: the first `get` raises it.
        """
        if self._store is not None or self._opening is not None or self._error is not None:
            return
        self._opening = asyncio.get_running_loop().create_task(self._open())
        self._opening.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[ObjectStore]) -> None:
        if self._opening is task:
            self._opening = None  # a later get() opens again unless the failure is sticky
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not logged as lost

    async def get(self) -> ObjectStore:
        if self._store is not None:
            return self._store
        if self._opening is not None:
            # Share the attempt under way, and its failure: never a second one behind it.
            return await asyncio.shield(self._opening)
        return await self._open()

    async def _open(self) -> ObjectStore:
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._error is not None:
                raise self._error
            if self._store is None:
                try:
                    store: ObjectStore = await self._opener()  # type: ignore[misc]
                    try:
                        await store.check_bucket()
                    except BaseException:
                        await store.close()
                        raise
                except TransientStoreError as exc:
                    error = EndpointUnreachable(
                        f"store unreachable: {exc} (gave up after {self._attempts} attempts)"
                    )
                    if self._sticky:
                        self._error = error
                    raise error from exc
                except FatalStoreError as exc:
                    if self._sticky:
                        self._error = exc
                    raise
                self._store = store
        return self._store

    async def close(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            # Its cancellation is collected; a cancellation of close() itself still raises.
            await asyncio.gather(opening, return_exceptions=True)
        if self._store is not None:
            await self._store.close()
            self._store = None


def open_store(config: PushConfig, on_retry: Callable[..., None]) -> Callable[[], object]:
    """The store implementation for the destination's scheme, opened on first use.
    --max-bandwidth paces S3 bodies; a local directory is not paced."""
    pace: Callable[[int], Awaitable[None]] | None = None
    if config.transfer.max_bandwidth:
        from ..pipeline.ratelimit import RateLimiter

        pace = RateLimiter(config.transfer.max_bandwidth).take

    async def open_s3() -> ObjectStore:
        from ..stores.s3 import open_s3_store

        return await open_s3_store(
            config.destination.bucket, config.store, on_retry=on_retry, pace=pace
        )

    async def open_directory() -> ObjectStore:
        from ..stores.local import open_file_store

        return await open_file_store(config.destination.bucket, on_retry=on_retry)

    return open_directory if config.destination.scheme == "file" else open_s3


async def run_push(config: PushConfig, reporter: Reporter) -> None:
    """Mirror config.source into config.destination once. Outcomes go to ``reporter``."""
    manifest = Manifest.open(config.state_dir)
    session = StoreSession(open_store(config, reporter.retried), config.store.max_attempts)
    temp_dir = config.state_dir / "tmp"
    uploader = Uploader(
        store=session.get, manifest=manifest, scope=scope_for(config), config=config.transfer,
        budget=ByteBudget(config.transfer.max_memory), temp_dir=temp_dir,
        dry_run=config.dry_run, on_bytes=reporter.sent,
    )
    try:
        await mirror(config, reporter, manifest, session, uploader)
    finally:
        uploader.close()
        try:
            await session.close()
        finally:
            manifest.close()


async def mirror(
    config: PushConfig, reporter: Reporter, manifest: Manifest, session: StoreSession,
    uploader: Uploader,
) -> None:
    """One pass over config.source with stages already open: push runs it once; the
    Ultralytics integration runs it after each epoch and at the end of a training."""
    scope = scope_for(config)
    transfer = config.transfer
    listing: dict[str, ObjectInfo] | None = None
    if config.reconcile:
        listing = await _list_destination(session, config)
    options = ScanOptions(
        follow_symlinks=config.follow_symlinks,
        path_filter=PathFilter(config.include, config.exclude),
        skip_paths=state_dir_inside(config.source, config.state_dir),
    )
    large_keys: set[str] = set()
    key_base = f"{config.destination.prefix}/" if config.destination.prefix else ""
    known = ManifestKnowledge(manifest, scope, key_base, remember=not config.dry_run)
    # Workers take files from a short queue: a worker that finishes one file starts the
    # next in the same step, instead of waking the walk to spawn a task for it (two more
    # trips round the event loop per file, and a tree of small files is latency-bound).
    # The queue is bounded, so the walk still waits for the uploads.
    jobs: asyncio.Queue[tuple[ScannedFile, str, Decision] | None] = asyncio.Queue(
        transfer.workers
    )
    workers = 0

    async def work() -> None:
        while (job := await jobs.get()) is not None:
            reporter.outcome(await uploader.sync(*job))

    try:
        async with asyncio.TaskGroup() as tasks:
            # With a bucket listing to reconcile against, every file is planned one by one.
            async for found in scan_listings(str(config.source), options,
                                             known=known if listing is None else None):
                if found.unchanged:
                    reporter.unchanged_files(found.prefix, key_base + found.prefix,
                                             found.unchanged)
                    large_keys.update(_large_keys(found, key_base, transfer.multipart_threshold))
                keyed = _keyed(found.items, config, reporter)
                if not keyed:
                    continue
                large_keys.update(
                    key for key, item in keyed if uses_multipart(item.size, transfer)
                )
                records = manifest.lookup_many(scope, [key for key, _ in keyed])
                for key, item in keyed:
                    reporter.scanned(item.size)
                    decision = plan_file(item, records.get(key))
                    if listing is not None:
                        decision = _reconcile(decision, listing.get(key))
                    if decision.action is Action.SKIP:
                        reporter.outcome(FileOutcome(
                            item.relative, key, "unchanged", decision.reason, item.size
                        ))
                        continue
                    if workers < transfer.workers:
                        tasks.create_task(work())
                        workers += 1
                    await jobs.put((item, key, decision))
                    if not config.dry_run:
                        session.open_soon()  # after the worker: its hash starts first
            reporter.scan_done = True
            for _ in range(workers):
                await jobs.put(None)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    manifest.commit()
    if not config.dry_run:
        await _abort_orphans(config, manifest, scope, session, large_keys)


def _keyed(
    batch: list[ScanItem], config: PushConfig, reporter: Reporter
) -> list[tuple[str, ScannedFile]]:
    """One directory's files with their keys; issues and unusable names are reported."""
    keyed: list[tuple[str, ScannedFile]] = []
    for item in batch:
        if isinstance(item, ScanIssue):
            reporter.issue(item)
            continue
        try:
            keyed.append((object_key(config.destination.prefix, item.relative), item))
        except InvalidKey as exc:
            reporter.outcome(
                FileOutcome(item.relative, "", "failed", "new", item.size, error=str(exc))
            )
    return keyed


class ManifestKnowledge:
    """The manifest as what the walk compares each directory with (`scan.KnownFiles`):
    directory ``prefix`` of the source holds the keys ``key_base + prefix + name``."""

    def __init__(self, manifest: Manifest, scope: Scope, key_base: str, *, remember: bool
                 ) -> None:
        self.manifest = manifest
        self.scope = scope
        self.key_base = key_base
        self.remembers = remember  # a dry run writes nothing to the manifest

    def matches(self, directory: str, prefix: str, digest: bytes) -> bool:
        return self.manifest.directory_matches(
            self.scope, self.key_base + prefix, os.path.join(directory, ""), digest
        )

    def rows(self, directory: str, prefix: str, names: list[str], subdirs: list[str] | None
             ) -> set[FileStat]:
        return self.manifest.known_files(
            self.scope, self.key_base + prefix, os.path.join(directory, ""), names, subdirs
        )

    def remember(self, directory: str, prefix: str, digest: bytes) -> None:
        if self.remembers:
            self.manifest.remember_directory(
                self.scope, self.key_base + prefix, os.path.join(directory, ""), digest
            )


def _large_keys(found: Listing, key_base: str, threshold: int) -> list[str]:
    """Keys of the unchanged files that would be sent in parts (their stale uploads stay):
    `uses_multipart` with its threshold inlined, for every file of a no-op re-run."""
    key_prefix = key_base + found.prefix
    return [key_prefix + file[0] for file in found.unchanged or () if file[1] > threshold]


def _reconcile(decision: Decision, listed: ObjectInfo | None) -> Decision:
    """Adjust a plan made from the manifest with what the bucket listing says."""
    record = decision.record
    if record is None:
        if listed is not None:
            return Decision(Action.ADOPT, "in bucket, not in manifest")
        return decision
    if listed is None:
        return Decision(Action.UPLOAD, "missing in bucket")
    if listed.etag != record.etag or listed.size != record.object_size:
        return Decision(Action.UPLOAD, "changed in bucket")
    return decision


async def _list_destination(session: StoreSession, config: PushConfig) -> dict[str, ObjectInfo]:
    store = await session.get()
    prefix = config.destination.prefix
    listing: dict[str, ObjectInfo] = {}
    async for info in store.list_objects(prefix + "/" if prefix else ""):
        listing[info.key] = info
    log.info("reconcile: %d object(s) under %s", len(listing), config.destination.url)
    return listing


async def _abort_orphans(
    config: PushConfig, manifest: Manifest, scope: Scope, session: StoreSession,
    seen: set[str],
) -> None:
    """Abort multipart uploads recorded for files of this source that are gone now."""
    prefix = config.destination.prefix
    root = str(config.source) + os.sep
    orphans = [
        pending
        for pending in manifest.pending_uploads(scope, prefix + "/" if prefix else "")
        if pending.key not in seen and pending.source.startswith(root)
    ]
    if not orphans:
        return
    store = await session.get()
    for pending in orphans:
        try:
            await store.abort_multipart_upload(pending.key, pending.upload_id)
        except Exception as exc:  # noqa: BLE001 - kept in the manifest for the next run
            log.warning("%s: could not abort stale upload: %s", pending.key, exc)
            continue
        manifest.forget_upload(scope, pending.key, pending.upload_id)
        log.info("%s: aborted stale upload of a file that is gone", pending.key)


def state_dir_inside(source: Path, state_dir: Path) -> frozenset[str]:
    """The state directory's path relative to the source, if it lives inside it."""
    try:
        relative = state_dir.resolve().relative_to(source.resolve())
    except ValueError:
        return frozenset()
    return frozenset({relative.as_posix()}) if relative.parts else frozenset()

