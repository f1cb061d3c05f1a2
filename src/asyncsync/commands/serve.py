"""`serve`: the run browser of a prefix, read-only, until SIGINT/SIGTERM.

The settings become a frozen `ServeConfig`; the store is opened through the composition
root (`Pipeline.open_read`, as `runs` does); `service.web` does the rest. `browse` is also
what `watch --serve` runs inside the daemon, with the daemon's snapshot for the live sync
state. Bad settings (an address beyond loopback without credentials, an unreadable auth file,
--presign on a ``file://`` destination) are one ConfigError line, exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import Destination, StoreConfig, parse_destination, store_config_from
from ..errors import EXIT_OK, ConfigError
from ..options import Settings
from ..pipeline.session import Pipeline
from ..service.daemon import Snapshot
from .runs import READS_AT_ONCE

log = logging.getLogger("asyncsync")

# S3 refuses presigned URLs that live longer than a week.
MAX_PRESIGN_EXPIRY = 7 * 24 * 3600


@dataclass(frozen=True)
class ServeConfig:
    destination: Destination
    store: StoreConfig
    run_depth: int
    host: str
    port: int
    auth_file: Path | None = None
    presign: bool = False
    presign_expiry: int = 300


def serve_config_from(settings: Settings, destination: str | Destination, *,
                      address: tuple[str, int] | None = None) -> ServeConfig:
    """DEST and validated settings -> the frozen config (``address``: watch's --serve)."""
    parsed = parse_destination(destination) if isinstance(destination, str) else destination
    host, port = address if address is not None else settings["addr"]
    expiry = settings["presign_expiry"]
    if expiry > MAX_PRESIGN_EXPIRY:
        raise settings.error("presign_expiry", f"--presign-expiry {settings.text('presign_expiry')}"
                             f": at most {MAX_PRESIGN_EXPIRY} s (7 days, S3's limit)")
    if settings["presign"] and parsed.scheme == "file":
        raise settings.error("presign", "--presign: a file:// destination has no presigned "
                             "URLs; leave it off (objects are streamed)")
    return ServeConfig(parsed, store_config_from(settings, connections=4 * READS_AT_ONCE),
                       run_depth=settings["run_depth"], host=host, port=port,
                       auth_file=settings["auth_file"], presign=settings["presign"],
                       presign_expiry=int(expiry))


def _retried(exc: Exception, attempt: int, pause: float) -> None:
    log.info("retry %d in %.2fs: %s", attempt, pause, exc)


@contextlib.asynccontextmanager
async def browse(config: ServeConfig, live: Callable[[], Snapshot] | None = None
                 ) -> AsyncIterator[object]:
    """The browser served for the duration of the block (yields its `BrowserServer`)."""
    from ..service.web.app import Browser, BrowserServer, BrowserSettings, store_origin
    from ..service.web.auth import credentials_from
    from ..service.web.catalog import RunCatalog

    credentials = credentials_from(config.auth_file, dict(os.environ))
    async with Pipeline.open_read(config.destination, config.store,
                                  on_retry=_retried) as session:
        await session.store()  # a missing bucket or refused keys: one line, before serving
        catalog = RunCatalog(session.store, config.destination, config.run_depth, live=live)
        settings = BrowserSettings(presign=config.presign, presign_expiry=config.presign_expiry,
                                   store_origin=store_origin(config.store.endpoint_url))
        try:
            async with BrowserServer(Browser(catalog, settings, credentials),
                                     config.host, config.port) as server:
                yield server
        finally:
            await catalog.close()


async def run_serve(config: ServeConfig, stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set (the CLI cancels instead, on the first signal)."""
    if config.presign and config.destination.scheme == "file":
        raise ConfigError("--presign: a file:// destination has no presigned URLs")
    async with browse(config):
        await (stop or asyncio.Event()).wait()
    return EXIT_OK
