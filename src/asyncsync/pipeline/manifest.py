"""Stage 2, manifest: what is known to be in the bucket, and multipart uploads in progress.

A SQLite database (WAL) in the state directory. Each object row says: this key in this
bucket of this store holds the content of this local file, which had this size, mtime_ns
and inode, and this xxh128 digest. That lets a re-run skip unchanged files without reading
them and without listing the bucket. Multipart uploads are recorded as they go (upload id,
part size, each part's ETag and MD5) so that a run killed half-way resumes where it stopped.

All access happens on the event loop thread: statements are short, and small-file rows
are committed in batches (a crash loses at most the last batch, which only means those
files are hashed again next time); multipart progress is committed at once.

The manifest names the store's endpoint, buckets and keys and holds live upload ids, so it is
private to its owner: a state directory created here is 0700, and the database with its -wal
and -shm files is 0600 whatever the umask. A state directory that existed already is the
user's choice and is left as it is.

`Manifest.open(state_dir, read_only=True)` reads it beside a writer (a watch daemon holding
it open): a WAL reader sees every committed row and never blocks the writer, and it changes
nothing on disk (no schema, no clean mark, no modes).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestError, ManifestFull

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.db"
# Written after a clean close: the manifest file's size, mtime and inode at that moment.
# A file still exactly like that was checked when it was last opened and closed cleanly
# since, so its integrity check (a full read, ~50 ms per 100,000 rows) can be skipped.
CLEAN_MARK = MANIFEST_FILE + ".clean"
# 2: uploads.checksum and parts.crc32 (uploads whose parts carry CRC32 checksums).
# 3: capabilities (what each store was seen to do).
# 4: objects.adopted, and the objects_by_digest index (server-side copies of known content).
SCHEMA_VERSION = 4

# The digest of the directory that holds row ``{row}``'s key: no longer vouched for.
_FORGET_DIRECTORY = (
    "DELETE FROM directories WHERE store = {row}.store AND bucket = {row}.bucket"
    " AND key_prefix = rtrim({row}.key, replace({row}.key, '/', ''));"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    store TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    digest TEXT NOT NULL,
    etag TEXT NOT NULL,
    object_size INTEGER NOT NULL,
    content_encoding TEXT,
    uploaded_at REAL NOT NULL,
    -- 1: the row came from the object's own metadata (--reconcile), not from an upload
    -- this manifest saw through: never the source of a server-side copy.
    adopted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (store, bucket, key)
) WITHOUT ROWID;
-- Which keys hold a content (dedup: a file about to be sent whose bytes are already in the
-- bucket is copied there instead); one lookup per file to upload, answered by the index.
CREATE INDEX IF NOT EXISTS objects_by_digest ON objects (store, bucket, digest, size);
CREATE TABLE IF NOT EXISTS uploads (
    store TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    digest TEXT NOT NULL,
    part_size INTEGER NOT NULL,
    content_encoding TEXT,
    created_at REAL NOT NULL,
    checksum TEXT,  -- 'crc32': the parts carry CRC32 checksums; NULL: Content-MD5
    PRIMARY KEY (store, bucket, key)
) WITHOUT ROWID;
-- A directory whose files all matched their object rows when it was last walked, with a
-- digest of those files' names and stats (scan.directory_digest). Any change to the row
-- of a file directly in that directory deletes it (the triggers: rtrim(key, replace(key,
-- '/', '')) is the key up to its last '/'), so while it exists, a walk that computes the
-- same digest has found every file of the directory unchanged, without reading its rows.
CREATE TABLE IF NOT EXISTS directories (
    store TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    source_prefix TEXT NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (store, bucket, key_prefix)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS directories_stale_on_insert AFTER INSERT ON objects BEGIN
    {forget_new}
END;
CREATE TRIGGER IF NOT EXISTS directories_stale_on_update AFTER UPDATE ON objects BEGIN
    {forget_old}
    {forget_new}
END;
CREATE TRIGGER IF NOT EXISTS directories_stale_on_delete AFTER DELETE ON objects BEGIN
    {forget_old}
END;
-- What a store (endpoint and bucket) was seen to do: stores.capabilities.Capability names,
-- 1 or 0. Learned from its answers; a later run starts from them instead of finding out
-- again (a part sent twice, an empty upload aborted on every run).
CREATE TABLE IF NOT EXISTS capabilities (
    store TEXT NOT NULL,
    bucket TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    learned_at REAL NOT NULL,
    PRIMARY KEY (store, bucket, name)
) WITHOUT ROWID;
-- Files whose last upload failed, until one succeeds (what `asyncsync status` counts).
CREATE TABLE IF NOT EXISTS failures (
    store TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    error TEXT NOT NULL,
    failed_at REAL NOT NULL,
    PRIMARY KEY (store, bucket, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parts (
    upload_id TEXT NOT NULL,
    part_number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    md5 TEXT NOT NULL,  -- '' for a part sent with a CRC32 only
    size INTEGER NOT NULL,
    crc32 TEXT,
    PRIMARY KEY (upload_id, part_number)
) WITHOUT ROWID;
""".format(
    forget_old=_FORGET_DIRECTORY.format(row="OLD"),
    forget_new=_FORGET_DIRECTORY.format(row="NEW"),
)

REBUILD_HINT = (
    "move it aside (or delete it) and run again with --reconcile to rebuild it from the bucket"
)


@dataclass(frozen=True)
class Scope:
    """One bucket of one store: manifest rows are per (scope, key)."""

    store: str  # the endpoint URL, or "aws" (+profile) for the default endpoint
    bucket: str


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    key: str
    source: str
    size: int
    mtime_ns: int
    inode: int
    digest: str
    etag: str
    object_size: int
    content_encoding: str | None
    uploaded_at: float
    adopted: bool = False  # known from the object's metadata alone (see the schema)

    def same_stat(self, source: str, size: int, mtime_ns: int, inode: int) -> bool:
        return (
            self.source == source
            and self.size == size
            and self.mtime_ns == mtime_ns
            and self.inode == inode
        )


@dataclass(frozen=True, slots=True)
class RecordedPart:
    part_number: int
    etag: str
    md5: str  # base64 Content-MD5 it was sent with, or ""
    size: int
    crc32: str | None = None  # base64 CRC32 it was sent with, for a CRC32 upload


@dataclass(frozen=True)
class PendingUpload:
    key: str
    upload_id: str
    source: str
    size: int
    mtime_ns: int
    inode: int
    digest: str
    part_size: int
    content_encoding: str | None
    created_at: float
    checksum: str | None = None  # "crc32" when the parts carry CRC32 checksums


class Manifest:
    """The SQLite manifest. Open with `Manifest.open(state_dir)`; close when done."""

    # Small-file rows are committed after this many changes or this many seconds.
    BATCH_ROWS = 512
    BATCH_SECONDS = 1.0
    # Keys per lookup_many query (SQLite allows at least 999 parameters).
    LOOKUP_BATCH = 500
    # known_files reads a directory with at least this many files by key range, when it
    # has at most this many subdirectories (one range query per gap between them).
    RANGE_MIN_FILES = 32
    RANGE_MAX_SUBDIRS = 16

    def __init__(self, path: Path, connection: sqlite3.Connection, *,
                 read_only: bool = False) -> None:
        self.path = path
        self._db = connection
        self.read_only = read_only
        self._pending_rows = 0
        self._last_commit = time.monotonic()
        # The keys with a failure row: a success deletes one only where there is one.
        self._failed: set[tuple[str, str, str]] = set()
        if not read_only:
            self._failed = {(str(s), str(b), str(k)) for s, b, k in connection.execute(
                "SELECT store, bucket, key FROM failures")}

    @classmethod
    def open(cls, state_dir: Path, *, read_only: bool = False) -> Manifest:
        """The manifest of ``state_dir``, created or brought up to date as needed; with
        ``read_only``, an existing one opened for reading only (see `_open_read_only`)."""
        if read_only:
            return cls._open_read_only(state_dir)
        make_state_dir(state_dir)
        if not os.access(state_dir, os.W_OK | os.X_OK):
            raise ManifestError(f"state directory {str(state_dir)!r} is not writable")
        path = state_dir / MANIFEST_FILE
        closed_cleanly = _take_clean_mark(path)
        _make_private(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ManifestError(f"manifest {str(path)!r} cannot be opened: {exc}") from exc
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ManifestError(
                    f"manifest {str(path)!r} was written by a newer asyncsync "
                    f"(schema {version}); upgrade asyncsync or use another --state-dir"
                )
            db.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a power loss may drop the last commits, never corrupt the file;
            # losing a row only means that file is hashed (not necessarily sent) again.
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
            _add_missing_columns(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # quick_check reports damage as a row, not an exception.
            verdict = ("ok",) if closed_cleanly else db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict is None or verdict[0] != "ok":
                problem = verdict[0] if verdict else "no answer"
                raise ManifestError(
                    f"manifest {str(path)!r} is corrupt ({problem}); {REBUILD_HINT}"
                )
        except ManifestError:
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise _error(exc, path) from exc
        db.execute("BEGIN")
        return cls(path, db)

    @classmethod
    def _open_read_only(cls, state_dir: Path) -> Manifest:
        """Open for reading while another process may hold the manifest open for writing.

        ``mode=ro`` makes it a WAL reader: it sees what the writer has committed, statement by
        statement, and takes no lock the writer waits for. Nothing is created, migrated,
        checked or tightened (that is the writer's business, and changing the file would void
        the writer's clean mark). Statements run outside any transaction, each on the latest
        commit: a read transaction held open would keep the writer's checkpoints from
        emptying the write-ahead log.
        """
        path = state_dir / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(
                f"no manifest at {str(path)!r}: nothing was pushed with this state directory"
                " (see --state-dir)"
            )
        try:
            # as_uri() quotes what a URI must not carry raw ('?', '#', '%', spaces).
            db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                                 isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ManifestError(f"manifest {str(path)!r} cannot be opened: {exc}") from exc
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                # Older: columns the queries name may be missing, and a reader cannot add
                # them; newer: rows may mean what this version does not know.
                hint = ("upgrade asyncsync" if version > SCHEMA_VERSION else
                        "run push or watch with this state directory once to bring it up to"
                        " date")
                raise ManifestError(
                    f"manifest {str(path)!r} has schema {version}, this asyncsync reads"
                    f" schema {SCHEMA_VERSION}: {hint}"
                )
        except ManifestError:
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise _error(exc, path) from exc
        return cls(path, db, read_only=True)

    # -- objects -----------------------------------------------------------------------

    def lookup(self, scope: Scope, key: str) -> ObjectRecord | None:
        row = self._fetchone(
            f"SELECT {_RECORD_COLUMNS} FROM objects WHERE store=? AND bucket=? AND key=?",
            (scope.store, scope.bucket, key),
        )
        return _record(row) if row else None

    def copy_sources(
        self, scope: Scope, digest: str, size: int, *, besides: str, limit: int = 3
    ) -> list[ObjectRecord]:
        """Rows of other keys of this scope that this manifest uploaded with this content
        (digest and size), the most recent first: where a server-side copy may take the
        bytes from. One query on the digest index, whether or not anything matches."""
        # INDEXED BY: without statistics SQLite would rather range over the scope's primary
        # key (every row of the bucket) than look rows of the index up by key.
        rows = self._query(
            f"SELECT {_RECORD_COLUMNS} FROM objects INDEXED BY objects_by_digest WHERE store=?"
            " AND bucket=? AND digest=? AND size=? AND key<>? AND adopted=0"
            " ORDER BY uploaded_at DESC LIMIT ?",
            (scope.store, scope.bucket, digest, size, besides, limit),
        )
        return [_record(row) for row in rows]

    def lookup_many(self, scope: Scope, keys: list[str]) -> dict[str, ObjectRecord]:
        """Rows for many keys at once (one query per few hundred keys): a scan of one
        directory costs a query, not one per file."""
        found: dict[str, ObjectRecord] = {}
        for sql, args in self._by_keys(_RECORD_COLUMNS, scope, keys):
            for row in self._query(sql, args):
                found[row[0]] = _record(row)
        return found

    def _by_keys(
        self, columns: str, scope: Scope, keys: list[str]
    ) -> Iterator[tuple[str, tuple[object, ...]]]:
        """SELECTs of ``columns`` for the keys, a few hundred keys per statement."""
        for start in range(0, len(keys), self.LOOKUP_BATCH):
            batch = keys[start:start + self.LOOKUP_BATCH]
            yield (
                f"SELECT {columns} FROM objects WHERE store=? AND bucket=?"
                f" AND key IN ({','.join('?' * len(batch))})",
                (scope.store, scope.bucket, *batch),
            )

    def known_files(
        self, scope: Scope, key_prefix: str, source_prefix: str, names: list[str],
        subdirs: list[str] | None,
    ) -> set[tuple[str, int, int, int]]:
        """(name, size, mtime_ns, inode) rows of one directory's files: those recorded under
        the key ``key_prefix + name`` from the path ``source_prefix + name``, for the
        ``names`` (and maybe other files of that directory). All a re-run needs to see that
        a file is unchanged, as a set built in C straight from the cursor: the caller tests
        membership without building anything per row. ``subdirs``, when given, are the
        directory's subdirectories: their keys lie in ranges that a range scan skips."""
        columns = (
            "SELECT substr(key, ?), size, mtime_ns, inode FROM objects WHERE store=?"
            " AND bucket=? AND source = ? || substr(key, ?) AND "
        )
        start = len(key_prefix) + 1
        head = (start, scope.store, scope.bucket, source_prefix, start)
        found: set[tuple[str, int, int, int]] = set()
        try:
            if (subdirs is not None and len(subdirs) <= self.RANGE_MAX_SUBDIRS
                    and len(names) - len(subdirs) >= self.RANGE_MIN_FILES):
                # A range scan of the primary key costs half of as many index lookups.
                # Only the gaps between the subdirectories' key ranges are read, so a
                # directory beside a large subtree does not read the subtree's rows.
                for low, high in _gaps(key_prefix, subdirs):
                    bounds = "key>=? AND key<?" if high is not None else "key>=?"
                    found |= self._query_set(
                        columns + bounds + " AND instr(substr(key, ?), '/')=0",
                        (*head, low, *((high,) if high is not None else ()), start),
                    )
                return found
            for batch_start in range(0, len(names), self.LOOKUP_BATCH):
                batch = names[batch_start:batch_start + self.LOOKUP_BATCH]
                found |= self._query_set(
                    columns + f"key IN ({','.join('?' * len(batch))})",
                    (*head, *(key_prefix + name for name in batch)),
                )
        except UnicodeEncodeError:
            return set()  # a name that is not UTF-8 cannot have been recorded
        return found

    def directory_matches(
        self, scope: Scope, key_prefix: str, source_prefix: str, digest: bytes
    ) -> bool:
        """Whether ``digest`` is remembered for the directory, its rows unchanged since."""
        try:
            row = self._fetchone(
                "SELECT source_prefix, digest FROM directories WHERE store=? AND bucket=?"
                " AND key_prefix=?", (scope.store, scope.bucket, key_prefix),
            )
        except UnicodeEncodeError:
            return False
        return row is not None and row[0] == source_prefix and row[1] == digest

    def remember_directory(
        self, scope: Scope, key_prefix: str, source_prefix: str, digest: bytes
    ) -> None:
        """Every file of the directory matched its row: remember the files' digest."""
        try:
            self._execute(
                "INSERT OR REPLACE INTO directories (store, bucket, key_prefix,"
                " source_prefix, digest) VALUES (?,?,?,?,?)",
                (scope.store, scope.bucket, key_prefix, source_prefix, digest),
            )
        except UnicodeEncodeError:
            return
        self._maybe_commit()

    def record_object(self, scope: Scope, record: ObjectRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO objects (store, bucket, key, source, size, mtime_ns, inode,"
            " digest, etag, object_size, content_encoding, uploaded_at, adopted)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                scope.store, scope.bucket, record.key, record.source, record.size,
                record.mtime_ns, record.inode, record.digest, record.etag, record.object_size,
                record.content_encoding, record.uploaded_at, int(record.adopted),
            ),
        )
        self._maybe_commit()

    def objects_under(self, scope: Scope, prefix: str) -> Iterator[ObjectRecord]:
        low = prefix
        rows = self._query(
            f"SELECT {_RECORD_COLUMNS} FROM objects WHERE store=? AND bucket=? AND key>=?"
            " ORDER BY key",
            (scope.store, scope.bucket, low),
        )
        for row in rows:
            if not str(row[0]).startswith(prefix):
                return
            yield _record(row)

    # -- multipart uploads in progress ---------------------------------------------------

    def backup_to(self, path: Path) -> None:
        """A consistent copy of the database at ``path`` (SQLite's online backup: what is
        committed now, whatever is written meanwhile)."""
        self.commit()
        try:
            target = sqlite3.connect(path)
            try:
                self._db.backup(target)
            finally:
                target.close()
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc

    def count_objects(self) -> int:
        """Rows of every scope (the manifest_rows gauge; a count of the key index)."""
        row = self._fetchone("SELECT count(*) FROM objects", ())
        return int(row[0]) if row else 0

    def pending_upload(self, scope: Scope, key: str) -> PendingUpload | None:
        row = self._fetchone(
            "SELECT key, upload_id, source, size, mtime_ns, inode, digest, part_size,"
            " content_encoding, created_at, checksum FROM uploads WHERE store=? AND bucket=?"
            " AND key=?",
            (scope.store, scope.bucket, key),
        )
        return PendingUpload(*row) if row else None

    def pending_uploads(self, scope: Scope, prefix: str) -> list[PendingUpload]:
        rows = self._query(
            "SELECT key, upload_id, source, size, mtime_ns, inode, digest, part_size,"
            " content_encoding, created_at, checksum FROM uploads WHERE store=? AND bucket=?"
            " ORDER BY key",
            (scope.store, scope.bucket),
        )
        return [PendingUpload(*row) for row in rows if str(row[0]).startswith(prefix)]

    def recorded_parts(self, upload_id: str) -> dict[int, RecordedPart]:
        rows = self._query(
            "SELECT part_number, etag, md5, size, crc32 FROM parts WHERE upload_id=?",
            (upload_id,),
        )
        return {int(row[0]): RecordedPart(*row) for row in rows}

    def begin_upload(self, scope: Scope, upload: PendingUpload) -> None:
        self._execute(
            "INSERT OR REPLACE INTO uploads (store, bucket, key, upload_id, source, size,"
            " mtime_ns, inode, digest, part_size, content_encoding, created_at, checksum)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                scope.store, scope.bucket, upload.key, upload.upload_id, upload.source,
                upload.size, upload.mtime_ns, upload.inode, upload.digest, upload.part_size,
                upload.content_encoding, upload.created_at, upload.checksum,
            ),
        )
        self.commit()

    def record_part(self, upload_id: str, part: RecordedPart) -> None:
        self._execute(
            "INSERT OR REPLACE INTO parts (upload_id, part_number, etag, md5, size, crc32)"
            " VALUES (?,?,?,?,?,?)",
            (upload_id, part.part_number, part.etag, part.md5, part.size, part.crc32),
        )
        self.commit()

    def forget_upload(self, scope: Scope, key: str, upload_id: str) -> None:
        self._execute(
            "DELETE FROM uploads WHERE store=? AND bucket=? AND key=? AND upload_id=?",
            (scope.store, scope.bucket, key, upload_id),
        )
        self._execute("DELETE FROM parts WHERE upload_id=?", (upload_id,))
        self.commit()

    # -- failures ------------------------------------------------------------------------

    def record_failure(self, scope: Scope, key: str, source: str, reason: str,
                       error: str) -> None:
        self._execute(
            "INSERT OR REPLACE INTO failures (store, bucket, key, source, reason, error,"
            " failed_at) VALUES (?,?,?,?,?,?,?)",
            (scope.store, scope.bucket, key, source, reason, error, time.time()),
        )
        self._failed.add((scope.store, scope.bucket, key))
        self._maybe_commit()

    def forget_failure(self, scope: Scope, key: str) -> None:
        """After a success; costs nothing for a key that never failed (the usual case)."""
        entry = (scope.store, scope.bucket, key)
        if entry not in self._failed:
            return
        self._failed.discard(entry)
        self._execute("DELETE FROM failures WHERE store=? AND bucket=? AND key=?", entry)
        self._maybe_commit()

    # -- what the store does --------------------------------------------------------------

    def capabilities(self, scope: Scope) -> dict[str, bool]:
        rows = self._query(
            "SELECT name, value FROM capabilities WHERE store=? AND bucket=?",
            (scope.store, scope.bucket),
        )
        return {str(name): bool(value) for name, value in rows}

    def learn_capability(self, scope: Scope, name: str, value: bool) -> None:
        self._execute(
            "INSERT OR REPLACE INTO capabilities (store, bucket, name, value, learned_at)"
            " VALUES (?,?,?,?,?)",
            (scope.store, scope.bucket, name, int(value), time.time()),
        )
        self.commit()

    # -- transactions --------------------------------------------------------------------

    def _maybe_commit(self) -> None:
        self._pending_rows += 1
        if (
            self._pending_rows >= self.BATCH_ROWS
            or time.monotonic() - self._last_commit >= self.BATCH_SECONDS
        ):
            self.commit()

    def commit(self) -> None:
        self._refuse_if_read_only()
        try:
            # A COMMIT refused for room may leave the transaction open (tried again next
            # time) or rolled back (SQLite's choice): then a new one begins.
            if self._db.in_transaction:
                self._db.execute("COMMIT")
            self._db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc
        self._pending_rows = 0
        self._last_commit = time.monotonic()

    def close(self) -> None:
        if self.read_only:
            self._db.close()  # no commit to make, and no clean mark: the writer owns it
            return
        try:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc
        finally:
            self._db.close()
        _leave_clean_mark(self.path)

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise ManifestError(f"manifest {str(self.path)!r} is open read-only: not written")

    def _execute(self, sql: str, args: tuple[object, ...]) -> None:
        # Every write goes through here: refused with a clear message, before SQLite's own
        # "attempt to write a readonly database".
        self._refuse_if_read_only()
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc

    def _fetchone(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc
        return row

    def _query_set(self, sql: str, args: tuple[object, ...]) -> set[Any]:
        try:
            return set(self._db.execute(sql, args))
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise _error(exc, self.path) from exc


def make_state_dir(state_dir: Path) -> None:
    """Create the state directory 0700 (its parents as the umask says), or accept it as it is.

    Whatever creates the state directory goes through here, whichever comes first (the
    manifest, attach()'s checkpoint staging, a shard's restored manifest copy): a directory
    another step made with the umask's mode would be kept as it is by the next one."""
    try:
        state_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not state_dir.is_dir():
            raise ManifestError(f"state directory {str(state_dir)!r} is not a directory") from None
        mode = stat.S_IMODE(state_dir.stat().st_mode)
        if mode & 0o077:
            # The files inside are 0600 all the same; the directory's mode was chosen by
            # whoever made it (a shared mount, a volume), so it is not changed behind
            # their back.
            log.debug("state directory %r is mode %o; its manifest files are 0600",
                      str(state_dir), mode)
        return
    except OSError as exc:
        raise ManifestError(
            f"state directory {str(state_dir)!r} cannot be created: {exc.strerror}"
        ) from exc
    # mkdir's mode passes through the umask; 0700 is meant whatever it is.
    os.chmod(state_dir, 0o700)


def _make_private(path: Path) -> None:
    """The manifest and its -wal and -shm files 0600: created so before SQLite opens the
    database (SQLite gives a new -wal or -shm file the database file's mode), and tightened
    when an older asyncsync left them readable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return  # SQLite's own open fails too, and is what reports it
    else:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask took away (0600 is meant, no less)
        finally:
            os.close(fd)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if stat.S_IMODE(name.stat().st_mode) & 0o077:
                os.chmod(name, 0o600)
        except OSError:
            pass  # missing, or not ours to change (then not ours to open either, mostly)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a manifest of an older schema up to this one (CREATE TABLE IF NOT EXISTS
    leaves existing tables as they are). Rows older than ``objects.adopted`` read as
    uploads: a copy from one is still refused unless HEAD confirms the object's digest, size
    and ETag."""
    for table, column, definition in (
        ("uploads", "checksum", "TEXT"), ("parts", "crc32", "TEXT"),
        ("objects", "adopted", "INTEGER NOT NULL DEFAULT 0"),
    ):
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


_RECORD_COLUMNS = ("key, source, size, mtime_ns, inode, digest, etag, object_size,"
                   " content_encoding, uploaded_at, adopted")


def _record(row: tuple[Any, ...]) -> ObjectRecord:
    """An `ObjectRecord` from a row of `_RECORD_COLUMNS`."""
    return ObjectRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        row[8], row[9], bool(row[10]))


def _gaps(key_prefix: str, subdirs: list[str]) -> list[tuple[str, str | None]]:
    """Key ranges [low, high) holding the keys directly under ``key_prefix`` ('' or ending in
    '/'), around the subdirectories' ranges [prefix + name + '/', prefix + name + '0') ('0'
    follows '/'). None: no upper bound."""
    end = key_prefix[:-1] + "0" if key_prefix else None
    gaps: list[tuple[str, str | None]] = []
    low = key_prefix
    for name in sorted(name + "/" for name in subdirs):
        gaps.append((low, key_prefix + name))
        low = key_prefix + name[:-1] + "0"
    gaps.append((low, end))
    return gaps


def _error(exc: sqlite3.Error, path: Path) -> ManifestError:
    """The error to raise for ``exc``: `ManifestFull` when only room on the disk is missing.
    SQLite says "disk I/O error" rather than "full" when it cannot grow its shared-memory
    file or write-ahead log on a full tmpfs (opening the manifest, say): the disk is asked."""
    code = getattr(exc, "sqlite_errorcode", None)
    full = code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    if not full and (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR
                     or "disk I/O error" in str(exc)):
        full = _out_of_room(path.parent)
    return (ManifestFull if full else ManifestError)(_describe(exc, path))


# Less free room than this where the manifest lives, and an I/O error means a full disk.
_ROOM_NEEDED = 1024 * 1024


def _out_of_room(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _ROOM_NEEDED


def _describe(exc: sqlite3.Error, path: Path) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"manifest {str(path)!r} is corrupt ({text}); {REBUILD_HINT}"
    if "disk is full" in text or "disk I/O error" in text:
        return f"manifest {str(path)!r} cannot be written: {text} (is the state directory full?)"
    if "readonly" in text or "read-only" in text:
        return f"manifest {str(path)!r} cannot be written: {text} (state directory not writable)"
    return f"manifest {str(path)!r}: {text}"


def _fingerprint(path: Path) -> str | None:
    """The manifest file as it is on disk, or None while a write-ahead log holds changes
    (another process has it open, or one died: the file alone says nothing then)."""
    try:
        wal = os.stat(f"{path}-wal")
        if wal.st_size:
            return None
    except FileNotFoundError:
        pass
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _take_clean_mark(path: Path) -> bool:
    """True when the manifest is untouched since a clean close. The mark is removed, so a
    process that dies with the manifest open leaves none, and the next open checks it."""
    mark = path.with_name(CLEAN_MARK)
    try:
        recorded = mark.read_text()
        mark.unlink()
    except OSError:
        return False
    return recorded == _fingerprint(path)


def _leave_clean_mark(path: Path) -> None:
    fingerprint = _fingerprint(path)
    if fingerprint is None:
        return
    try:
        # 0600 like the manifest beside it: nothing in the state directory is the umask's.
        fd = os.open(path.with_name(CLEAN_MARK),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, fingerprint.encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # only a missed shortcut: the next open checks the file
