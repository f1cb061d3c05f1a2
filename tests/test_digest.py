"""Unit tests for asyncsync.pipeline.digest: consistent reads, xxh3-128 digests, gzip bodies."""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
from pathlib import Path

import pytest
import xxhash

from asyncsync.errors import SourceChanged, SourceVanished
from asyncsync.pipeline.digest import (
    HASH_CHUNK,
    LARGE_HASH_CHUNK,
    LARGE_HASH_FROM,
    FileIdentity,
    gzip_to_temp,
    hash_chunk_for,
    hash_file,
    md5_b64,
    new_digest,
    read_part,
    read_small,
    starts_with,
)
from asyncsync.pipeline.source import SourcePath, SourceRoot


def at(path: Path | str) -> SourcePath:
    """A file of the tree rooted at its directory, as a scan would have seen it."""
    path = str(path)
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return SourcePath(path, SourceRoot(os.path.dirname(path)), -1, -1)
    return SourcePath.of(path, os.path.dirname(path), st)


def identity_of(path: Path) -> FileIdentity:
    st = os.stat(path)
    return FileIdentity(st.st_size, st.st_mtime_ns, st.st_ino)


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


TEXT = b"epoch,loss,acc\n" + b"".join(b"%d,0.%04d,0.%04d\n" % (i, i, i) for i in range(2000))


# -- helpers -------------------------------------------------------------------------------


def test_md5_b64() -> None:
    assert md5_b64(b"") == "1B2M2Y8AsgTpgAmY7PhCfg=="
    assert md5_b64(b"hello") == md5(b"hello")
    assert md5_b64(memoryview(b"hello")) == md5(b"hello")


def test_new_digest_is_xxh3_128() -> None:
    hasher = new_digest()
    hasher.update(b"abc")
    hasher.update(b"def")
    assert hasher.hexdigest() == xxh(b"abcdef")
    assert len(hasher.hexdigest()) == 32


# -- read_small ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 65536, 65537, 300_000])
def test_read_small_plain(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    snap = read_small(at(path), max_size=1_000_000, compress=False)
    assert snap.body == data
    assert snap.digest == xxh(data)
    assert snap.body_md5_b64 == md5(data)
    assert snap.content_encoding is None
    assert snap.identity == identity_of(path)
    assert snap.identity.size == size


def test_read_small_compressed(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(TEXT)
    snap = read_small(at(path), max_size=len(TEXT), compress=True)
    assert snap.content_encoding == "gzip"
    assert snap.body[:2] == b"\x1f\x8b"
    assert gzip.decompress(snap.body) == TEXT
    assert len(snap.body) < len(TEXT)
    # The digest is of the original content, the MD5 of what is sent.
    assert snap.digest == xxh(TEXT)
    assert snap.digest != xxh(snap.body)
    assert snap.body_md5_b64 == md5(snap.body)
    assert snap.identity == identity_of(path)
    assert snap.identity.size == len(TEXT)


def test_read_small_compression_is_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_bytes(TEXT)
    first = read_small(at(path), max_size=10**6, compress=True)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))  # mtime must not leak into the body
    second = read_small(at(path), max_size=10**6, compress=True)
    assert first.body == second.body
    assert first.body_md5_b64 == second.body_md5_b64
    other = tmp_path / "copy.txt"
    other.write_bytes(TEXT)  # the file name must not leak into the body either
    assert read_small(at(other), max_size=10**6, compress=True).body == first.body


def test_read_small_compress_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_bytes(b"")
    snap = read_small(at(path), max_size=10, compress=True)
    assert gzip.decompress(snap.body) == b""
    assert snap.digest == xxh(b"")


def test_read_small_larger_than_max_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 101)
    assert read_small(at(path), max_size=101, compress=False).body == b"x" * 101
    with pytest.raises(SourceChanged, match="grew past the multipart threshold") as info:
        read_small(at(path), max_size=100, compress=False)
    assert str(path) in str(info.value)


def test_read_small_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone.txt"
    with pytest.raises(SourceVanished, match="vanished before upload") as info:
        read_small(at(missing), max_size=100, compress=False)
    assert str(missing) in str(info.value)


# -- hash_file -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, HASH_CHUNK - 1, HASH_CHUNK, HASH_CHUNK + 1])
def test_hash_file(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    digest, identity = hash_file(at(path))
    assert digest == xxh(data)
    assert identity == identity_of(path)


def test_the_read_size_changes_no_digest(tmp_path: Path) -> None:
    data = os.urandom(3 * LARGE_HASH_CHUNK + 5)
    path = tmp_path / "last.pt"
    path.write_bytes(data)
    assert hash_file(at(path), LARGE_HASH_CHUNK) == hash_file(at(path), HASH_CHUNK)
    assert hash_file(at(path), LARGE_HASH_CHUNK)[0] == xxh(data)


def test_only_very_large_files_are_hashed_in_large_reads() -> None:
    assert hash_chunk_for(0) == HASH_CHUNK
    assert hash_chunk_for(65 * 2**20) == HASH_CHUNK  # a YOLOv8 last.pt
    assert hash_chunk_for(LARGE_HASH_FROM - 1) == HASH_CHUNK
    assert hash_chunk_for(LARGE_HASH_FROM) == LARGE_HASH_CHUNK


def test_hash_file_matches_read_small(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(TEXT)
    assert hash_file(at(path))[0] == read_small(at(path), 10**6, compress=False).digest
    assert hash_file(at(path))[0] == read_small(at(path), 10**6, compress=True).digest


def test_hash_file_missing(tmp_path: Path) -> None:
    with pytest.raises(SourceVanished):
        hash_file(at(tmp_path / "missing"))


# -- read_part -----------------------------------------------------------------------------


def test_read_part_exact_slices(tmp_path: Path) -> None:
    data = os.urandom(1_000_003)
    path = tmp_path / "big"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_part(fd, 0, 100) == data[:100]
        assert read_part(fd, 500_000, 250_000) == data[500_000:750_000]
        assert read_part(fd, 1_000_000, 3) == data[1_000_000:]
        assert read_part(fd, 0, len(data)) == data
        # Parts in any order, cut like a multipart upload.
        part = 300_000
        pieces = [read_part(fd, off, part) for off in range(0, len(data), part)]
        assert b"".join(pieces) == data
        assert len(pieces[-1]) == len(data) % part
        # Past the end: short or empty (the caller detects the shrink).
        assert read_part(fd, 999_990, 100) == data[999_990:]
        assert read_part(fd, len(data), 10) == b""
        assert read_part(fd, 0, 0) == b""
    finally:
        os.close(fd)


# -- gzip_to_temp --------------------------------------------------------------------------


def test_gzip_to_temp(tmp_path: Path) -> None:
    data = TEXT * 50 + os.urandom(HASH_CHUNK + 17)  # more than one read chunk
    source = tmp_path / "big.log"
    source.write_bytes(data)
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    name, digest, identity, handle = gzip_to_temp(at(source), str(temp_dir))
    try:
        assert os.path.dirname(name) == str(temp_dir)
        assert os.path.basename(name).startswith("gzip-")
        assert name.endswith(".gz")
        compressed = Path(name).read_bytes()
        assert compressed[:2] == b"\x1f\x8b"
        assert gzip.decompress(compressed) == data
        assert digest == xxh(data)
        assert identity == identity_of(source)
        handle.seek(0)
        assert handle.read() == compressed
    finally:
        handle.close()
    assert not os.path.exists(name)  # closing deletes it
    assert os.listdir(temp_dir) == []


def _gzip_twice(source: Path, temp_dir: Path) -> list[bytes]:
    bodies = []
    for _ in range(2):
        name, digest, _, handle = gzip_to_temp(at(source), str(temp_dir))
        try:
            bodies.append(Path(name).read_bytes())
            assert digest == xxh(TEXT)
        finally:
            handle.close()
    return bodies


def test_gzip_to_temp_content_matches_read_small(tmp_path: Path) -> None:
    source = tmp_path / "results.csv"
    source.write_bytes(TEXT)
    bodies = _gzip_twice(source, tmp_path)
    snap = read_small(at(source), max_size=10**6, compress=True)
    assert gzip.decompress(bodies[0]) == gzip.decompress(bodies[1]) == TEXT
    assert gzip.decompress(snap.body) == TEXT
    assert snap.digest == xxh(TEXT)
    # The header carries no timestamp (MTIME, bytes 4-7, is zero).
    assert bodies[0][4:8] == b"\x00\x00\x00\x00"


def test_gzip_to_temp_is_deterministic(tmp_path: Path) -> None:
    source = tmp_path / "results.csv"
    source.write_bytes(TEXT)
    bodies = _gzip_twice(source, tmp_path)
    assert bodies[0] == bodies[1]


def test_gzip_to_temp_missing_source_leaves_no_temp(tmp_path: Path) -> None:
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    with pytest.raises(SourceVanished):
        gzip_to_temp(at(tmp_path / "missing"), str(temp_dir))
    assert os.listdir(temp_dir) == []


def _zip_bytes() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", os.urandom(200_000))
        archive.writestr("archive/version", b"3")
    return buffer.getvalue()


def test_complete_zip_archives_pass_and_torn_ones_are_refused(tmp_path: Path) -> None:
    """torch.save writes zip archives; one caught mid-write has no central directory yet."""
    whole = _zip_bytes()
    path = tmp_path / "last.pt"
    path.write_bytes(whole)
    assert read_small(at(path), 1 << 30, False).body == whole
    assert hash_file(at(path))[0] == xxhash.xxh3_128_hexdigest(whole)
    for torn in (whole[: len(whole) // 2], whole[:-10], whole[:4] + b"\0" * 100):
        path.write_bytes(torn)
        with pytest.raises(SourceChanged, match="incomplete zip archive"):
            read_small(at(path), 1 << 30, False)
        with pytest.raises(SourceChanged, match="incomplete zip archive"):
            hash_file(at(path))
    # Files that merely contain the signature later on are not held to it.
    path.write_bytes(b"x" + whole[: len(whole) // 2])
    assert read_small(at(path), 1 << 30, False).body.startswith(b"xPK")


def test_starts_with_tells_an_append_from_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_bytes(b"epoch,loss\n1,0.9\n")
    first = xxhash.xxh3_128_hexdigest(path.read_bytes())
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"2,0.8\n")
    assert starts_with(at(path), size, first, chunk=4)  # appended to
    path.write_bytes(b"epoch,loss\n1,0.95\n2,0.85\n")  # rewritten, longer
    assert not starts_with(at(path), size, first)
    path.write_bytes(b"epoch\n")  # shorter than the object now
    assert not starts_with(at(path), size, first)
