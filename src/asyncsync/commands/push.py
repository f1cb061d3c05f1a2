"""`push`: one pass of the pipeline over SRC (`pipeline.mirror`), with the stages that
`Pipeline.open` opens and closes. Outcomes go to the reporter, the command's `Events` sink.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import PushConfig
from ..pipeline.events import Events, Fanout
from ..pipeline.mirror import mirror
from ..pipeline.session import Pipeline
from ..report import Reporter

if TYPE_CHECKING:
    from ..service.metrics import Metrics


async def run_push(config: PushConfig, reporter: Reporter, metrics: Metrics | None = None) -> None:
    """Mirror config.source into config.destination once; ``metrics`` hears every event
    the reporter does (for --metrics-textfile and --pushgateway)."""
    events: Events = reporter if metrics is None else Fanout((reporter, metrics))
    async with Pipeline.open(config, events) as pipeline:
        if metrics is not None:
            metrics.watch_pipeline(pipeline)
        await mirror(pipeline)
