"""`push`: one pass of the pipeline over SRC (`pipeline.mirror`), with the stages that
`Pipeline.open` opens and closes. Outcomes go to the reporter, the command's `Events` sink.
"""

from __future__ import annotations

from ..config import PushConfig
from ..pipeline.mirror import mirror
from ..pipeline.session import Pipeline
from ..report import Reporter


async def run_push(config: PushConfig, reporter: Reporter) -> None:
    """Mirror config.source into config.destination once."""
    async with Pipeline.open(config, reporter) as pipeline:
        await mirror(pipeline)
