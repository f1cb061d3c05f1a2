"""Unit tests for asyncsync.pipeline.scan.scan_tree: the streaming directory walk."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from asyncsync.pipeline.keys import PathFilter
from asyncsync.pipeline.scan import (
    FileStat,
    Listing,
    ScanIssue,
    ScanItem,
    ScannedFile,
    ScanOptions,
    StatCache,
    directory_digest,
    scan_directories,
    scan_listings,
    scan_tree,
)


def scan(root: Path | str, options: ScanOptions | None = None) -> list[ScanItem]:
    async def collect() -> list[ScanItem]:
        return [item async for item in scan_tree(str(root), options)]

    async def bounded() -> list[ScanItem]:
        return await asyncio.wait_for(collect(), timeout=10)

    return asyncio.run(bounded())


def files(items: list[ScanItem]) -> list[ScannedFile]:
    return [item for item in items if isinstance(item, ScannedFile)]


def issues(items: list[ScanItem]) -> dict[str, ScanIssue]:
    return {item.relative: item for item in items if isinstance(item, ScanIssue)}


def relatives(items: list[ScanItem]) -> list[str]:
    return [item.relative for item in files(items)]


def write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    write(root / "b.txt", b"bbbb")
    write(root / "empty.txt")
    write(root / "a" / "x.txt", b"x" * 100)
    write(root / "a" / "sub" / "y.bin", os.urandom(4096))
    write(root / "c" / "z.txt", b"zz")
    (root / "d-empty-dir").mkdir()
    return root


def test_yields_regular_files_with_stat(tree: Path) -> None:
    items = scan(tree)
    assert all(isinstance(item, ScannedFile) for item in items)
    by_rel = {f.relative: f for f in files(items)}
    assert set(by_rel) == {"b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"}
    for rel, scanned in by_rel.items():
        on_disk = tree / rel
        st = os.stat(on_disk)
        assert scanned.path == str(on_disk)
        assert os.path.isabs(scanned.path)
        assert scanned.size == st.st_size
        assert scanned.mtime_ns == st.st_mtime_ns
        assert scanned.inode == st.st_ino
    assert by_rel["empty.txt"].size == 0
    assert by_rel["a/sub/y.bin"].size == 4096
    assert by_rel["b.txt"].size == 4


def test_order_is_depth_first_with_sorted_names(tree: Path) -> None:
    # A directory's own files first (names sorted), then its subdirectories, alphabetically.
    expected = ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"]
    assert relatives(scan(tree)) == expected
    assert relatives(scan(tree)) == expected  # deterministic


def test_order_within_directory_is_by_code_point(tmp_path: Path) -> None:
    for name in ("b", "B", "a", "_x", "10", "9", "é"):
        write(tmp_path / name, b"1")
    assert relatives(scan(tmp_path)) == ["10", "9", "B", "_x", "a", "b", "é"]


def test_relative_paths_are_posix_without_dot_segments(tree: Path) -> None:
    for rel in relatives(scan(tree)):
        assert "\\" not in rel
        assert not rel.startswith(("/", "./"))
        assert all(seg not in ("", ".", "..") for seg in rel.split("/"))


def test_empty_tree(tmp_path: Path) -> None:
    assert scan(tmp_path) == []


def test_scan_with_trailing_slash_root(tree: Path) -> None:
    assert relatives(scan(str(tree) + "/")) == relatives(scan(tree))


def test_odd_and_unicode_names(tmp_path: Path) -> None:
    names = ["a b+#%&=ü.txt", "日本語.csv", " lead", "trail ", "-dash", ".hidden", "x?y*[z]"]
    for name in names:
        write(tmp_path / "dir ü" / name, name.encode())
    scanned = files(scan(tmp_path))
    assert [f.relative for f in scanned] == [f"dir ü/{n}" for n in sorted(names)]
    for f in scanned:
        assert f.size == len(f.relative.split("/", 1)[1].encode())


# -- symlinks --------------------------------------------------------------------------------


def test_symlinks_skipped_by_default(tree: Path, tmp_path: Path) -> None:
    (tree / "link-to-file").symlink_to(tree / "b.txt")
    (tree / "link-to-dir").symlink_to(tree / "a")
    outside = write(tmp_path / "outside.txt", b"secret")
    (tree / "link-outside").symlink_to(outside)
    (tree / "dangling").symlink_to(tree / "nope")
    items = scan(tree)
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"]
    found = issues(items)
    assert set(found) == {"link-to-file", "link-to-dir", "link-outside", "dangling"}
    for issue in found.values():
        assert issue.message == "skipped symlink (see --follow-symlinks)"
        assert issue.failed is False


def test_follow_symlinks_inside_root(tree: Path) -> None:
    (tree / "a" / "link.txt").symlink_to(tree / "b.txt")
    (tree / "rel-link.txt").symlink_to("c/z.txt")
    items = scan(tree, ScanOptions(follow_symlinks=True))
    by_rel = {f.relative: f for f in files(items)}
    assert "a/link.txt" in by_rel
    assert "rel-link.txt" in by_rel
    target = os.stat(tree / "b.txt")
    link = by_rel["a/link.txt"]
    assert link.path == str(tree / "a" / "link.txt")
    assert link.size == target.st_size == 4
    assert link.inode == target.st_ino
    assert by_rel["rel-link.txt"].size == 2
    assert issues(items) == {}


def test_follow_symlinks_refuses_targets_outside_root(tree: Path, tmp_path: Path) -> None:
    outside = write(tmp_path / "outside.txt", b"secret")
    (tree / "out-link").symlink_to(outside)
    outside_dir = tmp_path / "outside-dir"
    write(outside_dir / "f.txt", b"f")
    (tree / "out-dir").symlink_to(outside_dir)
    # A sibling whose name starts with the root's name is still outside.
    sibling = write(tmp_path / "run-sibling" / "s.txt", b"s")
    (tree / "sibling-link").symlink_to(sibling)
    items = scan(tree, ScanOptions(follow_symlinks=True))
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"]
    found = issues(items)
    assert set(found) == {"out-link", "out-dir", "sibling-link"}
    for issue in found.values():
        assert issue.message == "skipped symlink pointing outside the source"
        assert issue.failed is False


def test_follow_symlinks_directory_inside_root(tmp_path: Path) -> None:
    write(tmp_path / "data" / "f.txt", b"f")
    (tmp_path / "zz-alias").symlink_to(tmp_path / "data")
    items = scan(tmp_path, ScanOptions(follow_symlinks=True))
    # Following a link means its files appear under the link's name too (as rsync -L).
    assert relatives(items) == ["data/f.txt", "zz-alias/f.txt"]
    assert issues(items) == {}


def test_an_earlier_symlinked_alias_does_not_hide_the_real_directory(tmp_path: Path) -> None:
    write(tmp_path / "z_dir" / "f.txt", b"f")
    (tmp_path / "a_link").symlink_to(tmp_path / "z_dir")
    items = scan(tmp_path, ScanOptions(follow_symlinks=True))
    assert relatives(items) == ["a_link/f.txt", "z_dir/f.txt"]
    assert issues(items) == {}


def test_symlink_loop_terminates(tree: Path) -> None:
    (tree / "a" / "sub" / "up").symlink_to("../..")  # back to the root
    (tree / "c" / "self").symlink_to(".")
    items = scan(tree, ScanOptions(follow_symlinks=True))
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"]
    found = issues(items)
    assert set(found) == {"a/sub/up", "c/self"}
    for issue in found.values():
        assert issue.message == "skipped symlink loop"
        assert issue.failed is False


def test_mutual_directory_links_terminate(tmp_path: Path) -> None:
    write(tmp_path / "p" / "p.txt", b"p")
    write(tmp_path / "q" / "q.txt", b"q")
    (tmp_path / "p" / "to-q").symlink_to(tmp_path / "q")
    (tmp_path / "q" / "to-p").symlink_to(tmp_path / "p")
    items = scan(tmp_path, ScanOptions(follow_symlinks=True))
    # Each link is followed once; the way back up is a loop and stops there.
    assert relatives(items) == ["p/p.txt", "p/to-q/q.txt", "q/q.txt", "q/to-p/p.txt"]
    assert set(issues(items)) == {"p/to-q/to-p", "q/to-p/to-q"}
    assert all(i.message == "skipped symlink loop" for i in issues(items).values())


def test_dangling_symlink_followed_is_a_warning(tree: Path) -> None:
    (tree / "dangling").symlink_to(tree / "missing-target")
    items = scan(tree, ScanOptions(follow_symlinks=True))
    issue = issues(items)["dangling"]
    assert issue.failed is False
    assert "dangling" not in relatives(items)


# -- special files -------------------------------------------------------------------------


def test_fifo_is_skipped_with_warning(tree: Path) -> None:
    os.mkfifo(tree / "a" / "pipe")
    items = scan(tree)
    assert issues(items) == {"a/pipe": ScanIssue("a/pipe", "skipped: a FIFO", failed=False)}
    assert "a/pipe" not in relatives(items)
    # A FIFO that sorts first is never opened (the scan does not hang on it).
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")
def test_unix_socket_is_skipped_with_warning(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree / "c")  # a short relative path: AF_UNIX paths are limited
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("sock")
        items = scan(tree)
    finally:
        sock.close()
    assert issues(items) == {"c/sock": ScanIssue("c/sock", "skipped: a socket", failed=False)}


def test_excluded_special_files_are_silent(tree: Path) -> None:
    os.mkfifo(tree / "pipe.tmp")
    items = scan(tree, ScanOptions(path_filter=PathFilter(exclude=["*.tmp"])))
    assert issues(items) == {}


# -- filters and pruning ---------------------------------------------------------------------


def test_include_filter(tree: Path) -> None:
    items = scan(tree, ScanOptions(path_filter=PathFilter(include=["*.txt"])))
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "c/z.txt"]


def test_exclude_filter(tree: Path) -> None:
    items = scan(tree, ScanOptions(path_filter=PathFilter(exclude=["*.txt"])))
    assert relatives(items) == ["a/sub/y.bin"]


def test_include_and_exclude_with_paths(tree: Path) -> None:
    f = PathFilter(include=["a/*"], exclude=["*.bin"])
    assert relatives(scan(tree, ScanOptions(path_filter=f))) == ["a/x.txt"]


def test_skip_paths_prunes_state_dir_inside_tree(tree: Path) -> None:
    write(tree / ".asyncsync" / "manifest.db", b"sqlite")
    write(tree / ".asyncsync" / "tmp" / "gzip-1.gz", b"gz")
    write(tree / "a" / "state" / "x.txt", b"kept: different path")
    items = scan(tree, ScanOptions(skip_paths=frozenset({".asyncsync"})))
    rels = relatives(items)
    assert not any(r.startswith(".asyncsync") for r in rels)
    assert "a/state/x.txt" in rels
    assert issues(items) == {}


def test_skip_paths_nested_directory(tree: Path) -> None:
    write(tree / "a" / "state" / "manifest.db", b"sqlite")
    items = scan(tree, ScanOptions(skip_paths=frozenset({"a/state"})))
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin", "c/z.txt"]


def test_scan_is_lazy(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / f"d{i}" / "f.txt", b"f")

    async def first() -> ScanItem:
        agen = scan_tree(str(tmp_path))
        try:
            return await agen.__anext__()
        finally:
            await agen.aclose()

    item = asyncio.run(first())
    assert isinstance(item, ScannedFile)
    assert item.relative == "d0/f.txt"


def _scandir_failing_for(monkeypatch: pytest.MonkeyPatch, path: Path, exc: OSError) -> None:
    """Opening the directory ``path`` for its listing fails with ``exc``."""
    real_open = os.open

    def fake_open(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if isinstance(name, str) and os.path.abspath(name) == str(path):
            raise exc
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_unreadable_directory_is_a_failed_issue(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: chmod 0 does not stop root, and tests may run as root.
    _scandir_failing_for(
        monkeypatch, tree / "a", PermissionError(13, "Permission denied", str(tree / "a"))
    )
    items = scan(tree)
    assert issues(items) == {
        "a": ScanIssue("a", "cannot list directory: Permission denied", failed=True)
    }
    # Its siblings are still scanned; nothing below it is.
    assert relatives(items) == ["b.txt", "empty.txt", "c/z.txt"]


def test_directory_vanishing_during_scan_is_a_warning(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scandir_failing_for(
        monkeypatch, tree / "c", FileNotFoundError(2, "No such file or directory")
    )
    items = scan(tree)
    assert issues(items) == {
        "c": ScanIssue("c", "directory vanished during the scan", failed=False)
    }
    assert relatives(items) == ["b.txt", "empty.txt", "a/x.txt", "a/sub/y.bin"]


def test_stat_cache_reports_only_what_changed_since_the_last_scan(tmp_path: Path) -> None:
    for name in ("a/1.txt", "a/2.txt", "b/3.txt"):
        write(tmp_path / name, name.encode())
    cache = StatCache()

    def rescan() -> tuple[list[str], list[str]]:
        async def collect() -> list[str]:
            found = []
            async for batch in scan_directories(str(tmp_path), ScanOptions(), cache):
                found.extend(i.relative for i in batch if isinstance(i, ScannedFile))
            return found

        cache.begin()
        found = asyncio.run(collect())
        return sorted(found), sorted(cache.end())  # a cached rescan keeps no order

    assert rescan() == (["a/1.txt", "a/2.txt", "b/3.txt"], [])
    assert rescan() == ([], [])
    write(tmp_path / "a/2.txt", b"longer content")
    os.utime(tmp_path / "b/3.txt", ns=(1, 1))
    write(tmp_path / "c/new.txt", b"new")
    (tmp_path / "a/1.txt").unlink()
    assert rescan() == (["a/2.txt", "b/3.txt", "c/new.txt"], ["a/1.txt"])
    cache.forget("b/3.txt")
    assert rescan() == (["b/3.txt"], [])


def test_a_slow_chunk_sends_the_rest_of_the_walk_to_a_worker_thread(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks run on the loop's thread while they are quick; after three slow chunks the
    walk moves to a worker thread, with the same files in the same order."""
    import threading

    from asyncsync.pipeline import scan as scan_module

    expected = relatives(scan(tree))
    threads: list[str] = []
    real_walk_some = scan_module._walk_some

    def recording_walk_some(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_walk_some(*args)

    monkeypatch.setattr(scan_module, "_walk_some", recording_walk_some)
    monkeypatch.setattr(scan_module, "_DIRECTORIES_PER_CALL", 1)
    monkeypatch.setattr(scan_module, "_INLINE_CHUNK_SECONDS", 0.0)
    assert relatives(scan(tree)) == expected
    main = threading.main_thread().name
    assert threads[:3] == [main] * 3 and len(threads) > 3
    assert all(name != main for name in threads[3:])


# -- comparing with what the caller knows (push's manifest) --------------------------------


class FakeKnowledge:
    """`KnownFiles` from a table of file stats by relative path, and remembered digests."""

    def __init__(self, known: dict[str, FileStat]) -> None:
        self.known = known
        self.remembered: dict[str, bytes] = {}
        self.calls: list[tuple[str, str, list[str] | None]] = []

    def matches(self, directory: str, prefix: str, digest: bytes) -> bool:
        self.calls.append(("matches", prefix, None))
        return self.remembered.get(prefix) == digest

    def rows(self, directory: str, prefix: str, names: list[str], subdirs: list[str] | None
             ) -> set[FileStat]:
        assert directory.endswith(prefix.rstrip("/"))
        self.calls.append(("rows", prefix, subdirs))
        return {self.known[prefix + name] for name in names if prefix + name in self.known}

    def remember(self, directory: str, prefix: str, digest: bytes) -> None:
        self.remembered[prefix] = digest


def listings(root: Path, known: FakeKnowledge) -> list[Listing]:
    async def collect() -> list[Listing]:
        return [listing async for listing in scan_listings(str(root), known=known)]

    return asyncio.run(collect())


def stat_of(path: Path) -> FileStat:
    st = path.stat()
    return (path.name, st.st_size, st.st_mtime_ns, st.st_ino)


def test_known_files_are_listed_as_unchanged_and_the_rest_as_files(tree: Path) -> None:
    """Files whose (name, size, mtime_ns, inode) the caller knows become the directory's
    `unchanged`; the others are yielded as usual. A directory whose files all match is
    remembered, and the next walk takes it whole from one `matches` call."""
    everything = {item.relative: stat_of(Path(item.path)) for item in files(scan(tree))}
    known = FakeKnowledge(dict(everything))
    known.known["b.txt"] = ("b.txt", 999, 1, 1)  # the manifest saw another b.txt
    found = {listing.prefix: listing for listing in listings(tree, known)}
    top = found[""]
    assert [item.relative for item in top.items] == ["b.txt"]
    assert top.unchanged == [stat_of(tree / "empty.txt")]
    assert isinstance(top.items[0], ScannedFile) and top.items[0].path == str(tree / "b.txt")
    assert found["a/"].unchanged == [stat_of(tree / "a" / "x.txt")] and not found["a/"].items
    # The subdirectories, for the range lookup.
    assert [sorted(subdirs or ()) for call, prefix, subdirs in known.calls
            if (call, prefix) == ("rows", "")] == [["a", "c", "d-empty-dir"]]
    assert sorted(known.remembered) == ["a/", "a/sub/", "c/"]  # not "": b.txt differed

    known.calls.clear()
    again = {listing.prefix: listing for listing in listings(tree, known)}
    assert [call[0] for call in known.calls if call[1] == "a/"] == ["matches"]
    assert again["a/sub/"].unchanged == [stat_of(tree / "a" / "sub" / "y.bin")]
    assert [call[0] for call in known.calls if call[1] == ""] == ["matches", "rows"]

    # Changed since it was remembered: the digest differs, the file is yielded.
    write(tree / "a" / "x.txt", b"y" * 101)
    third = {listing.prefix: listing for listing in listings(tree, known)}
    assert [item.relative for item in third["a/"].items] == ["a/x.txt"]
    assert third["a/"].unchanged == []


def test_directory_digest_is_of_names_and_stats_in_order() -> None:
    files_ = [("a", 1, 2, 3), ("b", 4, 5, 6)]
    assert directory_digest(files_) == directory_digest([("a", 1, 2, 3), ("b", 4, 5, 6)])
    assert directory_digest(files_) != directory_digest([("a", 1, 2, 3), ("b", 4, 5, 7)])
    assert directory_digest(files_) != directory_digest([("a", 1, 2, 3)])
    assert len(directory_digest([])) == 16


def test_a_walk_in_a_worker_thread_is_compared_on_the_loop_thread(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`KnownFiles` is used on the event loop's thread only: once the walk has moved to a
    worker thread, each listing it returns is compared file by file after the call, with
    the same outcome as inline."""
    import threading

    from asyncsync.pipeline import scan as scan_module

    monkeypatch.setattr(scan_module, "_DIRECTORIES_PER_CALL", 1)
    monkeypatch.setattr(scan_module, "_INLINE_CHUNK_SECONDS", 0.0)
    everything = {item.relative: stat_of(Path(item.path)) for item in files(scan(tree))}
    known = FakeKnowledge(dict(everything))
    known.known["a/sub/y.bin"] = ("y.bin", 1, 2, 3)  # the manifest saw another y.bin
    threads: list[str] = []
    real_rows = known.rows

    def recording_rows(*args: Any) -> set[FileStat]:
        threads.append(threading.current_thread().name)
        return real_rows(*args)

    monkeypatch.setattr(known, "rows", recording_rows)
    found = {listing.prefix: listing for listing in listings(tree, known)}
    assert set(threads) == {threading.main_thread().name}
    assert [item.relative for item in found["a/sub/"].items] == ["a/sub/y.bin"]
    assert found["a/sub/"].unchanged == []
    unchanged = {prefix + name for prefix, listing in found.items()
                 for name, *_ in listing.unchanged or ()}
    assert unchanged == set(everything) - {"a/sub/y.bin"}
    assert all(listing.unchanged is not None for listing in found.values())


def test_a_directory_swapped_for_a_symlink_after_its_parent_was_listed_is_not_entered(
    tmp_path: Path,
) -> None:
    """The parent's listing saw a real directory; by the time it is listed itself it is a
    symlink to a directory outside the root: its entries are never listed or yielded."""
    from asyncsync.pipeline.scan import ScanOptions, _Walker

    root, outside = tmp_path / "src", tmp_path / "outside"
    (root / "train" / "weights").mkdir(parents=True)
    (root / "train" / "weights" / "last.pt").write_bytes(b"ours")
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not ours")
    for follow in (False, True):
        walker = _Walker(str(root), ScanOptions(follow_symlinks=follow))
        st = os.stat(root)
        top, pending = walker.list_directory(str(root), "", frozenset(), (st.st_dev, st.st_ino))
        (train,) = pending
        _, below = walker.list_directory(*train)
        (weights,) = below
        os.rename(root / "train" / "weights", tmp_path / "moved")
        os.symlink(outside, root / "train" / "weights")
        listing, deeper = walker.list_directory(*weights)
        assert deeper == []
        assert [type(item).__name__ for item in listing.items] == ["ScanIssue"]
        assert "replaced" in listing.items[0].message  # type: ignore[union-attr]
        os.unlink(root / "train" / "weights")
        os.rename(tmp_path / "moved", root / "train" / "weights")


def test_asyncsync_temp_files_are_never_scanned(tmp_path: Path) -> None:
    """A pull's half-written download (or a placement under way) is asyncsync's own: never
    uploaded, whatever the filters say."""
    from asyncsync.pipeline.place import TEMP_PREFIX

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "results.csv").write_text("epoch\n")
    (tmp_path / "exp" / f"{TEMP_PREFIX}pull-0123abcd").write_bytes(b"half a checkpoint")
    (tmp_path / "exp" / f"{TEMP_PREFIX}pull-0123abcd.ranges").write_text("{}")
    assert relatives(scan(tmp_path)) == ["exp/results.csv"]

    async def by_directories() -> list[str]:
        found: list[str] = []
        async for batch in scan_directories(str(tmp_path), ScanOptions(), StatCache()):
            found.extend(i.relative for i in batch if isinstance(i, ScannedFile))
        return found

    assert asyncio.run(by_directories()) == ["exp/results.csv"]
