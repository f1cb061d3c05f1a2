"""Unit tests for asyncsync.pipeline.manifest: the SQLite record of what is in the bucket."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncsync.errors import ConfigError, ManifestError
from asyncsync.pipeline.manifest import (
    CLEAN_MARK,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Manifest,
    ObjectRecord,
    PendingUpload,
    RecordedPart,
    Scope,
)

SCOPE = Scope(store="http://127.0.0.1:9000", bucket="bucket")
OTHER_BUCKET = Scope(store="http://127.0.0.1:9000", bucket="other")
OTHER_STORE = Scope(store="aws", bucket="bucket")


def record(key: str, **overrides: object) -> ObjectRecord:
    values: dict[str, object] = {
        "key": key,
        "source": f"/data/{key}",
        "size": 123,
        "mtime_ns": 1_700_000_000_000_000_001,
        "inode": 77,
        "digest": "ab" * 16,
        "etag": '"0123456789abcdef"',
        "object_size": 123,
        "content_encoding": None,
        "uploaded_at": 1_700_000_000.5,
    }
    values.update(overrides)
    return ObjectRecord(**values)  # type: ignore[arg-type]


def pending(key: str, upload_id: str, **overrides: object) -> PendingUpload:
    values: dict[str, object] = {
        "key": key,
        "upload_id": upload_id,
        "source": f"/data/{key}",
        "size": 100 * 1024 * 1024,
        "mtime_ns": 1_700_000_000_000_000_002,
        "inode": 88,
        "digest": "cd" * 16,
        "part_size": 8 * 1024 * 1024,
        "content_encoding": None,
        "created_at": 1_700_000_001.25,
    }
    values.update(overrides)
    return PendingUpload(**values)  # type: ignore[arg-type]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "nested"


@pytest.fixture
def manifest(state_dir: Path) -> Iterator[Manifest]:
    m = Manifest.open(state_dir)
    try:
        yield m
    finally:
        m.close()


def read_only_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


# -- open ----------------------------------------------------------------------------------


def test_open_creates_state_dir_and_wal_database(state_dir: Path) -> None:
    assert not state_dir.exists()
    m = Manifest.open(state_dir)
    try:
        assert state_dir.is_dir()
        assert m.path == state_dir / MANIFEST_FILE
        assert m.path.is_file()
        db = sqlite3.connect(m.path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            assert {"objects", "uploads", "parts"} <= tables
        finally:
            db.close()
    finally:
        m.close()


def test_open_twice_is_fine(state_dir: Path) -> None:
    Manifest.open(state_dir).close()
    m = Manifest.open(state_dir)
    assert m.lookup(SCOPE, "nothing") is None
    m.close()


# -- permissions: the manifest names the store and holds upload ids ---------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """umask 000: whatever is private must be so by its own mode, not by the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_fresh_state_dir_is_0700_and_the_manifest_files_0600(
    state_dir: Path, loose_umask: None
) -> None:
    m = Manifest.open(state_dir)
    try:
        m.record_object(SCOPE, record("k"))
        m.commit()
        wal, shm = Path(f"{m.path}-wal"), Path(f"{m.path}-shm")
        assert wal.exists() and shm.exists()  # WAL mode, open: both are there
        assert mode(state_dir) == 0o700
        assert {name: mode(path) for name, path in
                (("db", m.path), ("wal", wal), ("shm", shm))} == {
            "db": 0o600, "wal": 0o600, "shm": 0o600}
        # Parents created on the way are not the manifest's: the umask decides for them.
        assert mode(state_dir.parent) == 0o777
    finally:
        m.close()
    assert mode(state_dir) == 0o700 and mode(m.path) == 0o600
    # The mark a clean close leaves beside the manifest is no more the umask's than it is.
    assert mode(state_dir / CLEAN_MARK) == 0o600


def test_a_strict_umask_still_leaves_the_manifest_usable(tmp_path: Path) -> None:
    """0600 is meant exactly: a umask that takes the owner's write bit must not leave a
    read-only manifest behind."""
    old = os.umask(0o277)
    try:
        m = Manifest.open(tmp_path / "state")
        m.record_object(SCOPE, record("k"))
        m.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / MANIFEST_FILE) == 0o600


def test_an_existing_state_dir_keeps_its_mode_and_old_manifest_files_are_tightened(
    tmp_path: Path, loose_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest left 0644 by an older asyncsync, in a directory someone chose 0755: the
    files become 0600, the directory stays as its owner made it (and the log says so)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    m = Manifest.open(state)
    m.record_object(SCOPE, record("k"))
    m.commit()
    wal, shm = Path(f"{m.path}-wal"), Path(f"{m.path}-shm")
    # Another process still has the database open, so its -wal and -shm stay for the next open.
    holder = sqlite3.connect(m.path)
    holder.execute("SELECT count(*) FROM objects").fetchone()
    m.close()
    try:
        for path in (m.path, wal, shm):
            path.chmod(0o644)
        with caplog.at_level(logging.DEBUG, logger="asyncsync.pipeline.manifest"):
            again = Manifest.open(state)
        try:
            assert again.lookup(SCOPE, "k") == record("k")
            assert (mode(m.path), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)
            assert mode(state) == 0o755
            assert "mode 755" in caplog.text
        finally:
            again.close()
    finally:
        holder.close()


# -- objects ---------------------------------------------------------------------------------


def test_lookup_missing_is_none(manifest: Manifest) -> None:
    assert manifest.lookup(SCOPE, "a/b.txt") is None


def test_record_and_lookup_round_trip(manifest: Manifest) -> None:
    rec = record("run/a.txt")
    manifest.record_object(SCOPE, rec)
    assert manifest.lookup(SCOPE, "run/a.txt") == rec
    gz = record("run/b.csv", content_encoding="gzip", object_size=40, size=1000)
    manifest.record_object(SCOPE, gz)
    assert manifest.lookup(SCOPE, "run/b.csv") == gz


def test_record_replaces_existing_row(manifest: Manifest) -> None:
    manifest.record_object(SCOPE, record("k", size=1))
    newer = record("k", size=2, digest="ff" * 16, etag='"new"')
    manifest.record_object(SCOPE, newer)
    assert manifest.lookup(SCOPE, "k") == newer


def test_unicode_keys_round_trip(manifest: Manifest) -> None:
    key = "runs/ü b+#%&=/日本.txt"
    manifest.record_object(SCOPE, record(key))
    found = manifest.lookup(SCOPE, key)
    assert found is not None
    assert found.key == key


def test_large_values_round_trip(manifest: Manifest) -> None:
    big = record("big", size=5 * 1024**4, object_size=5 * 1024**4, inode=2**62,
                 mtime_ns=2**62 + 12345)
    manifest.record_object(SCOPE, big)
    assert manifest.lookup(SCOPE, "big") == big


def test_scopes_are_isolated(manifest: Manifest) -> None:
    a = record("same/key", digest="aa" * 16)
    b = record("same/key", digest="bb" * 16)
    c = record("same/key", digest="cc" * 16)
    manifest.record_object(SCOPE, a)
    manifest.record_object(OTHER_BUCKET, b)
    manifest.record_object(OTHER_STORE, c)
    assert manifest.lookup(SCOPE, "same/key") == a
    assert manifest.lookup(OTHER_BUCKET, "same/key") == b
    assert manifest.lookup(OTHER_STORE, "same/key") == c
    assert manifest.lookup(Scope("aws", "other"), "same/key") is None
    assert [r.digest for r in manifest.objects_under(OTHER_BUCKET, "")] == ["bb" * 16]


def test_objects_under_filters_by_prefix(manifest: Manifest) -> None:
    keys = ["run1/a", "run1/b/c", "run10/x", "run2/a", "run0/z", "run1", "other/run1/a"]
    for key in keys:
        manifest.record_object(SCOPE, record(key))
    manifest.record_object(OTHER_BUCKET, record("run1/zzz"))
    assert [r.key for r in manifest.objects_under(SCOPE, "run1/")] == ["run1/a", "run1/b/c"]
    assert [r.key for r in manifest.objects_under(SCOPE, "run1")] == [
        "run1", "run1/a", "run1/b/c", "run10/x",
    ]
    assert [r.key for r in manifest.objects_under(SCOPE, "")] == sorted(keys)
    assert list(manifest.objects_under(SCOPE, "nope/")) == []
    under = list(manifest.objects_under(SCOPE, "run2/"))
    assert under == [record("run2/a")]


# -- multipart uploads ---------------------------------------------------------------------


def test_upload_lifecycle(manifest: Manifest) -> None:
    upload = pending("run/big.bin", "upload-1")
    assert manifest.pending_upload(SCOPE, "run/big.bin") is None
    manifest.begin_upload(SCOPE, upload)
    assert manifest.pending_upload(SCOPE, "run/big.bin") == upload
    assert manifest.pending_upload(OTHER_BUCKET, "run/big.bin") is None
    assert manifest.recorded_parts("upload-1") == {}

    p1 = RecordedPart(1, '"etag1"', "md5-1==", 8 * 1024 * 1024)
    p3 = RecordedPart(3, '"etag3"', "md5-3==", 4)
    manifest.record_part("upload-1", p1)
    manifest.record_part("upload-1", p3)
    assert manifest.recorded_parts("upload-1") == {1: p1, 3: p3}
    # Re-sending a part replaces its row.
    p1b = RecordedPart(1, '"etag1b"', "md5-1b==", 8 * 1024 * 1024)
    manifest.record_part("upload-1", p1b)
    assert manifest.recorded_parts("upload-1") == {1: p1b, 3: p3}
    assert manifest.recorded_parts("other-upload") == {}

    manifest.forget_upload(SCOPE, "run/big.bin", "upload-1")
    assert manifest.pending_upload(SCOPE, "run/big.bin") is None
    assert manifest.recorded_parts("upload-1") == {}


def test_forget_upload_needs_matching_upload_id(manifest: Manifest) -> None:
    manifest.begin_upload(SCOPE, pending("k", "new-id"))
    manifest.record_part("new-id", RecordedPart(1, '"e"', "m", 5))
    manifest.forget_upload(SCOPE, "k", "stale-id")
    assert manifest.pending_upload(SCOPE, "k") == pending("k", "new-id")
    assert manifest.recorded_parts("new-id") == {1: RecordedPart(1, '"e"', "m", 5)}


def test_begin_upload_replaces_previous_upload_for_key(manifest: Manifest) -> None:
    manifest.begin_upload(SCOPE, pending("k", "first"))
    manifest.begin_upload(SCOPE, pending("k", "second", part_size=16 * 1024 * 1024))
    found = manifest.pending_upload(SCOPE, "k")
    assert found is not None
    assert found.upload_id == "second"
    assert found.part_size == 16 * 1024 * 1024


def test_pending_uploads_by_prefix_and_scope(manifest: Manifest) -> None:
    manifest.begin_upload(SCOPE, pending("run1/b", "u-b"))
    manifest.begin_upload(SCOPE, pending("run1/a", "u-a", content_encoding="gzip"))
    manifest.begin_upload(SCOPE, pending("run10/c", "u-c"))
    manifest.begin_upload(OTHER_BUCKET, pending("run1/d", "u-d"))
    assert [u.upload_id for u in manifest.pending_uploads(SCOPE, "run1/")] == ["u-a", "u-b"]
    assert [u.key for u in manifest.pending_uploads(SCOPE, "")] == ["run1/a", "run1/b", "run10/c"]
    assert [u.key for u in manifest.pending_uploads(OTHER_BUCKET, "")] == ["run1/d"]
    assert manifest.pending_uploads(SCOPE, "none/") == []
    assert manifest.pending_uploads(SCOPE, "run1/")[0].content_encoding == "gzip"


# -- durability ------------------------------------------------------------------------------


def test_data_survives_close_and_reopen(state_dir: Path) -> None:
    m = Manifest.open(state_dir)
    m.record_object(SCOPE, record("a"))  # batched: not committed yet
    m.begin_upload(SCOPE, pending("big", "u1"))
    m.record_part("u1", RecordedPart(2, '"e2"', "m2", 10))
    m.close()

    again = Manifest.open(state_dir)
    try:
        assert again.lookup(SCOPE, "a") == record("a")
        assert again.pending_upload(SCOPE, "big") == pending("big", "u1")
        assert again.recorded_parts("u1") == {2: RecordedPart(2, '"e2"', "m2", 10)}
    finally:
        again.close()


def test_batched_rows_visible_to_another_connection_after_commit(manifest: Manifest) -> None:
    manifest.BATCH_SECONDS = 3600.0  # only the explicit commit counts
    manifest.record_object(SCOPE, record("batched"))
    other = read_only_connection(manifest.path)
    try:
        query = "SELECT key FROM objects WHERE key='batched'"
        assert other.execute(query).fetchall() == []
        manifest.commit()
        assert other.execute(query).fetchall() == [("batched",)]
    finally:
        other.close()


def test_batch_commits_after_batch_rows(manifest: Manifest) -> None:
    manifest.BATCH_SECONDS = 3600.0
    manifest.BATCH_ROWS = 3
    other = read_only_connection(manifest.path)
    try:
        count = "SELECT count(*) FROM objects"
        manifest.record_object(SCOPE, record("r1"))
        manifest.record_object(SCOPE, record("r2"))
        assert other.execute(count).fetchone() == (0,)
        manifest.record_object(SCOPE, record("r3"))  # third row: the batch commits
        assert other.execute(count).fetchone() == (3,)
    finally:
        other.close()


def test_multipart_progress_is_committed_at_once(manifest: Manifest) -> None:
    manifest.BATCH_SECONDS = 3600.0
    manifest.begin_upload(SCOPE, pending("big", "u1"))
    manifest.record_part("u1", RecordedPart(1, '"e"', "m", 5))
    other = read_only_connection(manifest.path)
    try:
        assert other.execute("SELECT upload_id FROM uploads").fetchall() == [("u1",)]
        assert other.execute("SELECT part_number FROM parts").fetchall() == [(1,)]
    finally:
        other.close()


# -- errors --------------------------------------------------------------------------------


def test_corrupt_manifest_raises_manifest_error_with_hint(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db_path = state / MANIFEST_FILE
    db_path.write_bytes(b"this is not sqlite, just garbage bytes\x00\xff" * 200)
    with pytest.raises(ManifestError) as info:
        Manifest.open(state)
    message = str(info.value)
    assert repr(str(db_path)) in message
    assert "corrupt" in message
    assert "--reconcile" in message
    assert isinstance(info.value, ConfigError)


def test_state_dir_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = blocker / "state"
    with pytest.raises(ManifestError) as info:
        Manifest.open(state)
    message = str(info.value)
    assert repr(str(state)) in message
    assert "cannot be created" in message


def test_state_dir_is_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ManifestError) as info:
        Manifest.open(blocker)
    assert repr(str(blocker)) in str(info.value)
    assert "is not a directory" in str(info.value)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db_path = state / MANIFEST_FILE
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(ManifestError) as info:
        Manifest.open(state)
    message = str(info.value)
    assert repr(str(db_path)) in message
    assert "newer asyncsync" in message
    assert "schema 99" in message
    # The refused database is left as it was.
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 99
    finally:
        db.close()


def _corrupt_one_btree_page(state: Path) -> Path:
    """A manifest whose header is fine but one b-tree page (the uploads table) is garbage."""
    m = Manifest.open(state)
    for i in range(10):
        m.record_object(SCOPE, record(f"k{i:05}"))
    m.close()
    db_path = state / MANIFEST_FILE
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode = DELETE")
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name='uploads'").fetchone()
    db.close()
    data = bytearray(db_path.read_bytes())
    offset = (root - 1) * page_size
    data[offset : offset + 8] = b"\xff" * 8
    db_path.write_bytes(bytes(data))
    db = sqlite3.connect(db_path)
    try:
        assert db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok"
    finally:
        db.close()
    return db_path


def test_malformed_page_is_detected_at_open(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db_path = _corrupt_one_btree_page(state)
    with pytest.raises(ManifestError) as info:
        Manifest.open(state).close()
    assert repr(str(db_path)) in str(info.value)
    assert "--reconcile" in str(info.value)




# -- the no-op fast path ---------------------------------------------------------------------


STAT = (123, 1_700_000_000_000_000_001, 77)  # record()'s size, mtime_ns and inode


def test_known_files_of_one_directory_by_range_and_of_a_few_names_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows come back as (name, size, mtime_ns, inode), only for keys directly under the
    prefix and recorded from the same source path; a big directory is read by key range
    around its subdirectories, a small one by exact keys."""
    m = Manifest.open(tmp_path / "state")
    try:
        names = [f"f{i:03d}.txt" for i in range(40)]
        for name in names:
            m.record_object(SCOPE, record(f"p/run/{name}"))
        for key in ["p/run/sub/deeper.txt", "p/run/sub-2/x", "p/run.txt", "p/run0", "p/other/f"]:
            m.record_object(SCOPE, record(key))
        m.record_object(SCOPE, record("p/run/moved.txt", source="/elsewhere/moved.txt"))
        m.record_object(OTHER_BUCKET, record("p/run/f000.txt", size=1))
        expected = {(name, *STAT) for name in names}
        statements: list[str] = []
        m._db.set_trace_callback(statements.append)
        many = m.known_files(SCOPE, "p/run/", "/data/p/run/", [*names, "sub", "sub-2"],
                             ["sub", "sub-2"])
        assert many == expected  # not sub/, sub-2/, run.txt, run0, other/ or moved.txt
        # Three ranges, around p/run/sub/ and p/run/sub-2/.
        assert len(statements) == 3 and all("key>=" in sql for sql in statements)
        statements.clear()
        few = m.known_files(SCOPE, "p/run/", "/data/p/run/", ["f001.txt", "moved.txt", "nope"],
                            None)
        assert few == {("f001.txt", *STAT)}
        assert len(statements) == 1 and "key IN" in statements[0]
        statements.clear()
        # Too many subdirectories for one range query per gap: exact keys again.
        subdirs = [f"d{i}" for i in range(Manifest.RANGE_MAX_SUBDIRS + 1)]
        assert m.known_files(SCOPE, "p/run/", "/data/p/run/", names + subdirs, subdirs) == (
            expected
        )
        assert all("key IN" in sql for sql in statements)
        m._db.set_trace_callback(None)
        assert m.known_files(SCOPE, "", "/data/", ["p", "run"], []) == set()
        # A name that is not UTF-8 cannot have been recorded.
        assert m.known_files(SCOPE, "p/run/", "/data/p/run/", ["\udcff.txt"], None) == set()
    finally:
        m.close()


def test_known_files_at_the_top_of_a_bucket(tmp_path: Path) -> None:
    m = Manifest.open(tmp_path / "state")
    try:
        names = [f"f{i:03d}" for i in range(40)]
        for key in [*names, "a/deeper", "zz/deeper"]:
            m.record_object(SCOPE, record(key))
        assert m.known_files(SCOPE, "", "/data/", [*names, "a", "zz"], ["a", "zz"]) == {
            (name, *STAT) for name in names
        }
    finally:
        m.close()


def test_a_remembered_directory_is_forgotten_when_a_row_in_it_changes(tmp_path: Path) -> None:
    """The digest of a directory stands only while none of its own rows change: a row
    recorded, replaced or forgotten there drops it; rows above or below it do not."""
    m = Manifest.open(tmp_path / "state")
    digest = b"\x01" * 16

    def remembered() -> bool:
        return m.directory_matches(SCOPE, "p/run/", "/data/p/run/", digest)

    try:
        m.record_object(SCOPE, record("p/run/a.txt"))
        m.remember_directory(SCOPE, "p/run/", "/data/p/run/", digest)
        assert remembered()
        assert not m.directory_matches(SCOPE, "p/run/", "/data/p/run/", b"\x02" * 16)
        assert not m.directory_matches(SCOPE, "p/run/", "/other/p/run/", digest)
        assert not m.directory_matches(OTHER_BUCKET, "p/run/", "/data/p/run/", digest)
        # Elsewhere: a parent, a child, a sibling with the same start, another bucket.
        for scope, key in [(SCOPE, "p/x.txt"), (SCOPE, "p/run/sub/b.txt"),
                           (SCOPE, "p/run2/a.txt"), (OTHER_BUCKET, "p/run/a.txt")]:
            m.record_object(scope, record(key))
        assert remembered()
        m.record_object(SCOPE, record("p/run/b.txt"))  # a new file here
        assert not remembered()
        m.remember_directory(SCOPE, "p/run/", "/data/p/run/", digest)
        m.record_object(SCOPE, record("p/run/a.txt", size=5))  # replaced
        assert not remembered()
        m.remember_directory(SCOPE, "p/run/", "/data/p/run/", digest)
        m._db.execute("DELETE FROM objects WHERE key='p/run/a.txt'")
        assert not remembered()
        m.remember_directory(SCOPE, "p/run/", "/data/p/run/", digest)
        m._db.execute("UPDATE objects SET etag='x' WHERE key='p/run/b.txt'")
        assert not remembered()
        # The top of the bucket is a directory too.
        m.remember_directory(SCOPE, "", "/data/", digest)
        m.record_object(SCOPE, record("top.txt"))
        assert not m.directory_matches(SCOPE, "", "/data/", digest)
    finally:
        m.close()


def test_integrity_check_is_skipped_only_after_a_clean_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    m = Manifest.open(state)
    m.record_object(SCOPE, record("k"))
    m.close()
    mark = state / CLEAN_MARK
    assert mark.exists()

    checks: list[str] = []
    real_connect = sqlite3.connect

    class Recording:
        def __init__(self, db: sqlite3.Connection) -> None:
            self._db = db

        def execute(self, sql: str, *args: Any) -> Any:
            if "quick_check" in sql:
                checks.append(sql)
            return self._db.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._db, name)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: Recording(real_connect(*a, **k)))
    m = Manifest.open(state)
    assert checks == [] and not mark.exists()  # taken: a crash from here leaves none
    assert m.lookup(SCOPE, "k") == record("k")
    m._db.close()  # the process dies without closing the manifest
    Manifest.open(state).close()
    assert len(checks) == 1
    Manifest.open(state).close()
    assert len(checks) == 1  # clean again


def test_a_manifest_of_schema_1_gains_the_checksum_columns(tmp_path: Path) -> None:
    """Schema 1 had no record of CRC32 part checksums: opening it adds the columns, keeps
    every row (old uploads read as Content-MD5 ones), and stamps schema 2."""
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "manifest.db") as db:
        db.executescript("""
            CREATE TABLE uploads (store TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,
                upload_id TEXT NOT NULL, source TEXT NOT NULL, size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL,
                part_size INTEGER NOT NULL, content_encoding TEXT, created_at REAL NOT NULL,
                PRIMARY KEY (store, bucket, key)) WITHOUT ROWID;
            CREATE TABLE parts (upload_id TEXT NOT NULL, part_number INTEGER NOT NULL,
                etag TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL,
                PRIMARY KEY (upload_id, part_number)) WITHOUT ROWID;
            INSERT INTO uploads VALUES ('http://127.0.0.1:9000', 'bucket', 'old', 'u-old', '/s',
                1, 2, 3, 'd', 5242880, NULL, 1.5);
            INSERT INTO parts VALUES ('u-old', 1, '"e1"', 'bWQ1', 5242880);
            PRAGMA user_version = 1;
        """)
    m = Manifest.open(state)
    try:
        old = m.pending_upload(SCOPE, "old")
        assert old is not None and old.upload_id == "u-old" and old.checksum is None
        assert m.recorded_parts("u-old") == {1: RecordedPart(1, '"e1"', "bWQ1", 5242880)}
        m.begin_upload(SCOPE, pending("new", "u-new", checksum="crc32"))
        m.record_part("u-new", RecordedPart(1, '"e"', "", 5, "AAAAAA=="))
        new = m.pending_upload(SCOPE, "new")
        assert new is not None and new.checksum == "crc32"
        assert m.recorded_parts("u-new") == {1: RecordedPart(1, '"e"', "", 5, "AAAAAA==")}
    finally:
        m.close()
    with sqlite3.connect(state / "manifest.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# -- read-only opens, beside a writer -------------------------------------------------------


def test_a_read_only_open_sees_what_a_writer_holding_the_manifest_commits(
    tmp_path: Path,
) -> None:
    """As verify or status would, while a watch daemon has the manifest open for writing."""
    state = tmp_path / "state"
    writer = Manifest.open(state)
    try:
        writer.record_object(SCOPE, record("a"))
        writer.begin_upload(SCOPE, pending("big", "u-1"))  # committed at once
        writer.commit()
        reader = Manifest.open(state, read_only=True)
        try:
            assert reader.read_only and not writer.read_only
            assert reader.lookup(SCOPE, "a") == record("a")
            assert reader.pending_upload(SCOPE, "big") == pending("big", "u-1")
            # A batch the writer has not committed yet is not seen, and does not block.
            writer.record_object(SCOPE, record("b"))
            assert reader.lookup(SCOPE, "b") is None
            writer.commit()
            assert reader.lookup(SCOPE, "b") == record("b")
            assert [r.key for r in reader.objects_under(SCOPE, "")] == ["a", "b"]
            # The reader never holds the writer up either.
            writer.record_object(SCOPE, record("c"))
            writer.commit()
            assert reader.lookup_many(SCOPE, ["a", "c"]).keys() == {"a", "c"}
        finally:
            reader.close()
        writer.record_object(SCOPE, record("d"))
    finally:
        writer.close()
    again = Manifest.open(state)
    try:
        assert again.lookup(SCOPE, "d") == record("d")
    finally:
        again.close()


def test_a_read_only_manifest_refuses_writes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Manifest.open(state).close()
    reader = Manifest.open(state, read_only=True)
    try:
        writes = [
            lambda: reader.record_object(SCOPE, record("a")),
            lambda: reader.begin_upload(SCOPE, pending("k", "u")),
            lambda: reader.record_part("u", RecordedPart(1, '"e"', "", 5)),
            lambda: reader.forget_upload(SCOPE, "k", "u"),
            lambda: reader.remember_directory(SCOPE, "", "/data/", b"digest"),
            reader.commit,
        ]
        for write in writes:
            with pytest.raises(ManifestError, match="read-only"):
                write()
        assert reader.lookup(SCOPE, "a") is None
    finally:
        reader.close()


def test_a_read_only_open_of_a_missing_manifest_creates_nothing(tmp_path: Path) -> None:
    state = tmp_path / "never-used"
    with pytest.raises(ManifestError, match="no manifest at"):
        Manifest.open(state, read_only=True)
    assert not state.exists()
    state.mkdir()
    with pytest.raises(ManifestError, match="no manifest at"):
        Manifest.open(state, read_only=True)
    assert list(state.iterdir()) == []


def test_a_read_only_open_changes_nothing_the_writer_relies_on(
    tmp_path: Path, loose_umask: None
) -> None:
    """No schema, no chmod, no clean-mark handling: the writer's mark stays valid."""
    state = tmp_path / "odd ?#% dir"  # the URI must quote these
    writer = Manifest.open(state)
    writer.record_object(SCOPE, record("a"))
    writer.close()
    mark = state / CLEAN_MARK
    fingerprint = mark.read_text()
    os.chmod(state / MANIFEST_FILE, 0o640)  # a mode the writer would tighten
    reader = Manifest.open(state, read_only=True)
    assert reader.lookup(SCOPE, "a") == record("a")
    reader.close()
    assert mark.read_text() == fingerprint
    assert mode(state / MANIFEST_FILE) == 0o640


@pytest.mark.parametrize("version", [1, SCHEMA_VERSION + 1])
def test_a_read_only_open_refuses_another_schema(tmp_path: Path, version: int) -> None:
    state = tmp_path / "state"
    Manifest.open(state).close()
    with sqlite3.connect(state / MANIFEST_FILE) as db:
        db.execute(f"PRAGMA user_version = {version}")
    with pytest.raises(ManifestError, match=f"schema {version}"):
        Manifest.open(state, read_only=True)


def test_a_read_only_open_of_a_corrupt_manifest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / MANIFEST_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ManifestError, match="corrupt"):
        Manifest.open(state, read_only=True)
