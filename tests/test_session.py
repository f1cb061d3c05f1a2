"""The composition root (`pipeline.session`): the only module that opens the stages, the read
side's manifest beside a writer, the order stages close in, and a read session's store built
as the uploads' is (--retries, retries and bytes reported)."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncsync.config import Destination, PushConfig, StoreConfig, parse_destination
from asyncsync.errors import EndpointUnreachable, ManifestError
from asyncsync.pipeline.digest import md5_b64
from asyncsync.pipeline.events import NoEvents
from asyncsync.pipeline.manifest import CLEAN_MARK, MANIFEST_FILE, Manifest
from asyncsync.pipeline.mirror import mirror
from asyncsync.pipeline.session import ManifestUse, Pipeline, scope_of
from asyncsync.pipeline.transfer import Uploader
from asyncsync.stores.capabilities import Capability
from asyncsync.stores.local import FileStore
from asyncsync.stores.protocol import ObjectAttributes

from .conftest import S3Server, read_object

SRC = Path(__file__).resolve().parents[1] / "src" / "asyncsync"
ROOT = "pipeline/session.py"
# What opens a stage: the manifest, the store session, the uploader, and a store itself.
ASSEMBLY = ("Manifest.open", "StoreSession", "Uploader",
            "open_store", "store_opener", "open_s3_store", "open_file_store")
# stores/session.py is the store side of the seam: `open_store` (push's settings) hands over
# to `store_opener`, which imports the scheme's store lazily and opens it (botocore is loaded
# on first use only). It builds no stage: `StoreSession` and the openers are called with
# what they need from the root alone.
ALLOWED = {
    "stores/session.py": {"store_opener", "open_s3_store", "open_file_store"},
}


def assembly_calls(path: Path) -> set[str]:
    """The ASSEMBLY names called in one module (``x.StoreSession(...)`` counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        names: set[str] = set()
        if isinstance(func, ast.Name):
            names.add(func.id)
        elif isinstance(func, ast.Attribute):
            names.add(func.attr)
            if isinstance(func.value, ast.Name):
                names.add(f"{func.value.id}.{func.attr}")
        found |= names & set(ASSEMBLY)
    return found


def test_stages_are_opened_in_the_composition_root_alone() -> None:
    calls = {path.relative_to(SRC).as_posix(): assembly_calls(path)
             for path in sorted(SRC.rglob("*.py"))}
    outside = {module: sorted(names - ALLOWED.get(module, set()))
               for module, names in calls.items() if module != ROOT}
    assert {module: names for module, names in outside.items() if names} == {}
    # The walk sees what it looks for: the root does call each of them.
    assert calls[ROOT] >= {"Manifest.open", "StoreSession", "Uploader", "open_store",
                           "store_opener"}


# -- the manifest beside a writer --------------------------------------------------------------


def file_config(tmp_path: Path, **store: Any) -> PushConfig:
    mirror_dir = tmp_path / "mirror"
    mirror_dir.mkdir(exist_ok=True)
    (tmp_path / "src").mkdir(exist_ok=True)
    return PushConfig(source=tmp_path / "src", destination=parse_destination(
        f"file://{mirror_dir}"), state_dir=tmp_path / "state", store=StoreConfig(**store))


def test_a_reader_reads_the_manifest_a_writer_holds_and_sees_its_commits(
    tmp_path: Path
) -> None:
    config = file_config(tmp_path)
    (config.source / "a.txt").write_bytes(b"a" * 1000)

    async def main() -> None:
        async with Pipeline.open(config, NoEvents()) as writer:
            await mirror(writer)
            writer.manifest.commit()
            for use in (ManifestUse.READ, ManifestUse.READ_IF_ANY):
                async with Pipeline.open_read(config.destination, config.store,
                                              state_dir=config.state_dir,
                                              manifest=use) as reader:
                    assert reader.manifest is not None and reader.manifest.read_only
                    assert reader.scope == writer.scope
                    record = reader.manifest.lookup(reader.scope, "a.txt")
                    assert record is not None and record.size == 1000
                    # The writer is not blocked by the reader, and the reader sees its commit.
                    (config.source / "b.txt").write_bytes(b"b" * 2000)
                    await mirror(writer)
                    writer.manifest.commit()
                    record = reader.manifest.lookup(reader.scope, "b.txt")
                    assert record is not None and record.size == 2000
                    (config.source / "b.txt").unlink()
                    # What the store of a reader shows is not written to the manifest.
                    with pytest.raises(ManifestError, match="read-only"):
                        reader.manifest.learn_capability(reader.scope, "list-parts", True)
                # The reader's close took nothing from the writer: it goes on writing.
                writer.manifest.learn_capability(writer.scope, "list-parts", True)
                writer.manifest.commit()

    asyncio.run(main())
    # A reader after the writer's clean close changes nothing on disk: the mark still holds.
    mark = config.state_dir / CLEAN_MARK
    before = mark.read_text(), (config.state_dir / MANIFEST_FILE).stat().st_mtime_ns

    async def read_again() -> dict[str, bool]:
        async with Pipeline.open_read(config.destination, config.store,
                                      state_dir=config.state_dir,
                                      manifest=ManifestUse.READ) as reader:
            assert reader.manifest is not None
            return reader.manifest.capabilities(reader.scope)

    assert asyncio.run(read_again()) == {"list-parts": True}
    assert (mark.read_text(), (config.state_dir / MANIFEST_FILE).stat().st_mtime_ns) == before


def test_a_missing_or_unreadable_manifest_is_none_for_a_reader_that_can_do_without(
    tmp_path: Path
) -> None:
    config = file_config(tmp_path)

    async def opened(use: ManifestUse) -> tuple[Manifest | None, ManifestError | None, bool]:
        async with Pipeline.open_read(config.destination, config.store,
                                      state_dir=config.state_dir, manifest=use) as reader:
            reachable = await reader.store() is not None  # the store works regardless
            return reader.manifest, reader.manifest_problem, reachable

    assert asyncio.run(opened(ManifestUse.READ_IF_ANY)) == (None, None, True)
    with pytest.raises(ManifestError, match="no manifest at"):
        asyncio.run(opened(ManifestUse.READ))
    assert not config.state_dir.exists()  # a reader creates nothing
    config.state_dir.mkdir()
    (config.state_dir / MANIFEST_FILE).write_bytes(b"not a database, " * 512)
    manifest, problem, reachable = asyncio.run(opened(ManifestUse.READ_IF_ANY))
    assert manifest is None and reachable
    assert isinstance(problem, ManifestError) and MANIFEST_FILE in str(problem)


# -- the capabilities a read session's store starts from ------------------------------------


def test_a_read_sessions_store_knows_what_the_manifest_learned_and_writes_only_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client is made, never used: no request leaves (the bucket is not checked).
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                        "AWS_CONFIG_FILE": "/dev/null",
                        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(name, value)
    destination = Destination("s3", "bucket-a", "p")
    store = StoreConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1",
                        direct_uploads=False)
    state = tmp_path / "state"
    scope = scope_of(destination, store)
    manifest = Manifest.open(state)
    manifest.learn_capability(scope, Capability.CRC32_ECHO.value, False)
    manifest.close()

    async def capabilities(use: ManifestUse, fresh: bool = False) -> tuple[bool | None, ...]:
        async with Pipeline.open_read(destination, store, state_dir=state, manifest=use,
                                      fresh_capabilities=fresh, check_bucket=False) as reader:
            known: Any = (await reader.store()).capabilities
            shown = known[Capability.CRC32_ECHO], known[Capability.LIST_PARTS]
            known.learn(Capability.LIST_PARTS, True)  # what an answer would show
            return shown

    def written() -> dict[str, bool]:
        reader = Manifest.open(state, read_only=True)
        try:
            return reader.capabilities(scope)
        finally:
            reader.close()

    assert asyncio.run(capabilities(ManifestUse.READ_IF_ANY)) == (False, None)
    assert written() == {"crc32-echo": False}  # a reader writes nothing back
    assert asyncio.run(capabilities(ManifestUse.NONE)) == (None, None)
    # doctor: the store starts knowing nothing; what it learns is doctor's to record.
    assert asyncio.run(capabilities(ManifestUse.WRITE, fresh=True)) == (None, None)
    assert written() == {"crc32-echo": False}
    # A writer's store keeps what it is shown, as the uploads' does.
    assert asyncio.run(capabilities(ManifestUse.WRITE)) == (False, None)
    assert written() == {"crc32-echo": False, "list-parts": True}


# -- teardown order ------------------------------------------------------------------------------


@pytest.fixture
def closings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The stages' close calls, in order (each still closes)."""
    order: list[str] = []
    manifest_close, store_close, uploader_close = Manifest.close, FileStore.close, Uploader.close

    def closing_manifest(self: Manifest) -> None:
        order.append("manifest")
        manifest_close(self)

    async def closing_store(self: FileStore) -> None:
        order.append("store")
        await store_close(self)

    def closing_uploader(self: Uploader) -> None:
        order.append("uploader")
        uploader_close(self)

    monkeypatch.setattr(Manifest, "close", closing_manifest)
    monkeypatch.setattr(FileStore, "close", closing_store)
    monkeypatch.setattr(Uploader, "close", closing_uploader)
    yield order


class Boom(Exception):
    pass


@pytest.mark.parametrize("fails", [False, True])
def test_stages_close_in_the_reverse_order_they_opened(
    tmp_path: Path, closings: list[str], fails: bool
) -> None:
    config = file_config(tmp_path)

    async def read_side() -> None:
        async with Pipeline.open_read(config.destination, config.store,
                                      state_dir=config.state_dir,
                                      manifest=ManifestUse.WRITE) as reader:
            await reader.store()
            if fails:
                raise Boom

    async def upload_side() -> None:
        async with Pipeline.open(config, NoEvents()) as pipeline:
            await pipeline.store()
            if fails:
                raise Boom

    for side in (read_side, upload_side):
        if fails:
            with pytest.raises(Boom):
                asyncio.run(side())
        else:
            asyncio.run(side())
    assert closings == ["store", "manifest", "uploader", "store", "manifest"]


# -- the store session: --retries, retries and bytes reported ---------------------------------


@pytest.mark.servers("seaweedfs")  # what is checked is the client's, the same on every store
def test_a_read_sessions_store_takes_the_retries_and_reports_retries_and_bytes(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .faultproxy import FaultProxy

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    destination = Destination("s3", bucket, "r")
    body = b"x" * 100_000
    retried: list[int] = []
    sent: list[int] = []

    async def session(proxy: FaultProxy, attempts: int) -> None:
        store = StoreConfig(endpoint_url=proxy.endpoint, region="us-east-1",
                            addressing_style="path", max_attempts=attempts,
                            backoff_base=0.01, backoff_cap=0.05)
        async with Pipeline.open_read(destination, store,
                                      on_retry=lambda exc, attempt, pause: retried.append(
                                          attempt), on_sent=sent.append) as reader:
            opened = await reader.store()
            await opened.put_object("r/k", body, md5_b64=md5_b64(body),
                                    attributes=ObjectAttributes(metadata={}))

    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.inject("503", 2, method="HEAD")  # the bucket check, twice
        asyncio.run(session(proxy, attempts=3))
        assert retried == [1, 2]
        assert sum(sent) == len(body)
        assert read_object(s3_server.client(), bucket, "r/k") == body
        # --retries is the session's: two attempts, then the store is given up on.
        retried.clear()
        proxy.inject("503", 10, method="HEAD")
        with pytest.raises(EndpointUnreachable, match="gave up after 2 attempts"):
            asyncio.run(session(proxy, attempts=2))
        assert retried == [1]
        assert proxy.stats.faults == 2 + 2
