"""A shard's manifest, kept in the bucket beside its completion report.

A pod of an Indexed Job that dies is replaced with the same index on another node, with an
empty disk. Its manifest is what lets the replacement skip what its predecessor finished
(without listing the bucket) and resume its multipart uploads: so `push --shard` copies it to
``PREFIX/_asyncsync/shards/N/I.db.gz`` every ``--checkpoint-manifest`` seconds and at exit,
and a shard that starts without a manifest restores that copy first.

The copy is SQLite's online backup of the open database (consistent, whatever is being
written meanwhile), gzip-compressed; it is restored through a temp file and a rename, so a
manifest is never half there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import logging
import os
import zlib
from pathlib import Path

from ..errors import EndpointUnreachable, ManifestError, NotFound, StoreError
from ..stores.protocol import ObjectAttributes, ObjectStore
from .manifest import MANIFEST_FILE, Manifest, make_state_dir

log = logging.getLogger("asyncsync")

# The manifest of a million files is a few hundred MB; level 1 compresses it 3-4x in seconds.
_LEVEL = 1


async def restore_manifest(store: ObjectStore, key: str, state_dir: Path) -> bool:
    """Put the copy at ``key`` in place as ``state_dir``'s manifest, if there is none there
    yet; True if one was restored. A copy that cannot be read is logged and left: the shard
    then starts from scratch, as a first run does (slower, never wrong)."""
    target = state_dir / MANIFEST_FILE
    if target.exists():
        return False
    try:
        async with store.get_object(key) as body:
            packed = b"".join([bytes(chunk) async for chunk in body])
    except NotFound:
        return False
    except (StoreError, EndpointUnreachable) as exc:
        log.warning("%s: the shard's manifest copy was not restored: %s", key, exc)
        return False
    # The restored manifest comes first on an empty disk: the state directory is made here,
    # private, as the manifest itself would make it.
    make_state_dir(state_dir)
    temp = state_dir / f".{MANIFEST_FILE}.restoring"
    try:
        data = await asyncio.to_thread(gzip.decompress, packed)
        await asyncio.to_thread(_write_durably, temp, data)
        os.replace(temp, target)
    except (OSError, EOFError, zlib.error) as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        log.warning("%s: the shard's manifest copy is damaged (%s); starting afresh", key, exc)
        return False
    log.info("restored the shard's manifest from %s (%d bytes)", key, len(data))
    return True


async def checkpoint_manifest(manifest: Manifest, store: ObjectStore, key: str) -> bool:
    """Copy ``manifest`` to ``key``; False (and a warning) if the store refused it."""
    temp = manifest.path.with_name(f".{MANIFEST_FILE}.checkpoint")
    try:
        _create_private(temp)
        manifest.backup_to(temp)  # on the loop's thread: the connection is used there
        packed = await asyncio.to_thread(_packed, temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    md5 = base64.b64encode(hashlib.md5(packed).digest()).decode()  # noqa: S324 - Content-MD5
    try:
        await store.put_object(key, packed, md5_b64=md5, attributes=ObjectAttributes(
            metadata={}, content_type="application/gzip"))
    except (StoreError, EndpointUnreachable) as exc:
        log.warning("%s: the shard's manifest was not copied: %s", key, exc)
        return False
    return True


def _create_private(path: Path) -> None:
    """An empty ``path``, 0600, for the backup to fill: SQLite would create it with the
    umask's mode, and the copy holds what the manifest holds (the store, the keys, upload
    ids). A copy left by a process that died mid-backup is replaced."""
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask took away (0600 is meant, no less)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ManifestError(
            f"manifest copy {str(path)!r} cannot be created: {exc.strerror}") from exc


def _packed(path: Path) -> bytes:
    return gzip.compress(path.read_bytes(), compresslevel=_LEVEL, mtime=0)


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a strict umask must not leave the restored manifest read-only
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
