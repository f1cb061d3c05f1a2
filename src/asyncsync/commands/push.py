"""`push`: one pass of the pipeline over SRC (`pipeline.mirror`), with the stages that
`Pipeline.open` opens and closes. Outcomes go to the reporter, the command's `Events` sink.

With ``--shard I/N`` the pass covers shard I's part of the tree only (`pipeline.shard`), and
the shard keeps its state where a replacement can find it: its manifest is copied to the
bucket every ``--checkpoint-manifest`` seconds and at exit (and restored first when the
local one is missing, `pipeline.manifest_copy`), and a completion report says when it
started, how it ended and what it sent (`commands.shards`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..config import PushConfig
from ..errors import EXIT_OK, EXIT_SOME_FAILED
from ..pipeline.events import Events, Fanout
from ..pipeline.manifest import MANIFEST_FILE
from ..pipeline.mirror import mirror
from ..pipeline.session import Pipeline
from ..report import Reporter

if TYPE_CHECKING:
    from ..pipeline.shard import Shard
    from ..service.metrics import Metrics
    from .shards import ShardReport


async def run_push(config: PushConfig, reporter: Reporter, metrics: Metrics | None = None) -> None:
    """Mirror config.source into config.destination once; ``metrics`` hears every event
    the reporter does (for --metrics-textfile and --pushgateway)."""
    events: Events = reporter if metrics is None else Fanout((reporter, metrics))
    if (config.shard is not None and not config.dry_run
            and not (config.state_dir / MANIFEST_FILE).exists()):
        await _restore(config, config.shard, events)
    async with Pipeline.open(config, events) as pipeline:
        if metrics is not None:
            metrics.watch_pipeline(pipeline)
        if config.shard is None or config.dry_run:  # a dry run leaves no trace in the bucket
            await mirror(pipeline)
        else:
            await _push_shard(config, config.shard, pipeline, reporter)


async def _restore(config: PushConfig, shard: Shard, events: Events) -> None:
    """A shard starting on an empty disk (a replaced pod): its predecessor's manifest."""
    from ..pipeline.manifest_copy import restore_manifest
    from .shards import manifest_key

    # The session is its own: the pipeline's opens the manifest this restores.
    async with Pipeline.open_read(config.destination, config.store, on_retry=events.retried,
                                  on_sent=events.sent,
                                  max_bandwidth=config.transfer.max_bandwidth) as session:
        await restore_manifest(await session.store(),
                               manifest_key(config.destination.prefix, shard), config.state_dir)


async def _push_shard(
    config: PushConfig, shard: Shard, pipeline: Pipeline, reporter: Reporter
) -> None:
    # Loaded only for --shard: an ordinary push does not pay their import.
    from ..pipeline.manifest_copy import checkpoint_manifest
    from .shards import ShardReport, manifest_key

    key = manifest_key(config.destination.prefix, shard)
    report = ShardReport(pipeline.session, config.destination.prefix, shard)
    await report.start()

    async def copy() -> None:
        await checkpoint_manifest(pipeline.manifest, await pipeline.store(), key)

    async def every_interval() -> None:
        while True:
            await asyncio.sleep(config.checkpoint_manifest)
            await copy()

    periodic = (asyncio.create_task(every_interval()) if config.checkpoint_manifest > 0
                else None)
    code = EXIT_SOME_FAILED  # until the pass has ended
    try:
        await mirror(pipeline)
        code = EXIT_SOME_FAILED if reporter.failed else EXIT_OK
    finally:
        if periodic is not None:
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await periodic
        # At exit, however it ends (a SIGTERM'd pod too): what was done is not done again.
        # Shielded: the cancellation that ends a drained push must not cut the copy short.
        await asyncio.shield(_final(copy, report, reporter, code))


async def _final(
    copy: Callable[[], Awaitable[None]], report: ShardReport, reporter: Reporter, code: int
) -> None:
    await copy()
    await report.finish(reporter.summary(), code)
