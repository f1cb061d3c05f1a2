"""One pass of the pipeline over a tree: scan -> manifest -> plan -> transfer -> store.

The scanner streams files; each is looked up in the manifest and planned; files that need
work go into a short bounded queue that at most ``workers`` worker tasks drain (so the walk
never runs far ahead of the uploads and memory stays flat), and the byte budget bounds what
those workers buffer. push runs one pass; attach() runs one after each epoch; the watch
daemon drives the same stages from its own queue (pipeline/syncqueue.py).
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..config import PushConfig
from ..errors import first_error
from ..stores.protocol import ObjectInfo
from ..stores.session import StoreSession
from .events import Events, Failure, FileOutcome, Status
from .keys import InvalidKey, object_key
from .manifest import Manifest, Scope
from .plan import Action, Decision, plan_file, uses_multipart
from .scan import FileStat, Listing, ScanIssue, ScanItem, ScannedFile, scan_listings
from .session import Pipeline, scan_options_for

log = logging.getLogger("asyncsync")


async def mirror(pipeline: Pipeline, config: PushConfig | None = None) -> None:
    """One pass over the source with the pipeline's stages: push runs it once; attach()
    runs it after each epoch and at the end of a training (``config``: the pipeline's own,
    or a variant of it with other filters, as attach() excludes checkpoints per epoch)."""
    config = config or pipeline.config
    reporter, manifest, session = pipeline.events, pipeline.manifest, pipeline.session
    uploader, scope = pipeline.uploader, pipeline.scope
    transfer = config.transfer
    listing: dict[str, ObjectInfo] | None = None
    if config.reconcile:
        listing = await _list_destination(session, config)
    options = scan_options_for(config)
    large_keys: set[str] = set()
    key_base = pipeline.key_base
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
                            item.relative, key, Status.UNCHANGED, decision.reason, item.size
                        ))
                        continue
                    if workers < transfer.workers:
                        tasks.create_task(work())
                        workers += 1
                    await jobs.put((item, key, decision))
                    if not config.dry_run:
                        session.open_soon()  # after the worker: its hash starts first
            reporter.scan_finished()
            for _ in range(workers):
                await jobs.put(None)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    manifest.commit()
    if not config.dry_run:
        # A large file of the tree that the walk did not find is gone (or filtered out now):
        # its upload in progress can never complete.
        await pipeline.abort_orphans(lambda pending: pending.key in large_keys)


def _keyed(
    batch: list[ScanItem], config: PushConfig, reporter: Events
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
            reporter.outcome(FileOutcome(item.relative, "", Status.FAILED, "new", item.size,
                                         error=str(exc), failure=Failure.KEY))
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
