"""Unit tests for asyncsync.pipeline.place: keys that stay beneath a root, and atomic writes.

No server: the file:// store and pull both place files with these, so what they promise is
checked here once, including against a writer SIGKILLed in the middle of a file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from asyncsync.pipeline.place import (
    TEMP_PREFIX,
    UnsafeKey,
    directory_beneath,
    key_segments,
    write_atomically,
)


def test_key_segments_of_ordinary_keys() -> None:
    assert key_segments("a") == ["a"]
    assert key_segments("runs/detect/train 2/weights/best.pt") == [
        "runs", "detect", "train 2", "weights", "best.pt"
    ]
    assert key_segments("ünï/cödé+#%&=.txt") == ["ünï", "cödé+#%&=.txt"]
    assert key_segments("..a/b..") == ["..a", "b.."]  # dots inside a name are just dots
    assert key_segments("a\\b") == ["a\\b"]  # a POSIX name may hold a backslash


@pytest.mark.parametrize(
    "key",
    ["..", "../x", "a/../../x", "a/..", "/abs/x", "/", "", ".", "./a", "a/./b", "a//b", "a/",
     "a//../x", "nul\x00byte", f"a/{TEMP_PREFIX}0123", f"{TEMP_PREFIX}x"],
)
def test_key_segments_refuses_keys_that_leave_the_root(key: str) -> None:
    with pytest.raises(UnsafeKey):
        key_segments(key)
    assert issubclass(UnsafeKey, ValueError)


def test_key_segments_reserved_names_and_backslashes() -> None:
    with pytest.raises(UnsafeKey, match="reserved"):
        key_segments(".state/x", reserved={".state"})
    assert key_segments("a/.state/x", reserved={".state"}) == ["a", ".state", "x"]
    for key in ("a\\..\\x", "..\\x", "a\\b"):
        with pytest.raises(UnsafeKey, match="backslash"):
            key_segments(key, allow_backslash=False)


def test_directory_beneath_creates_below_the_root_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with directory_beneath(str(root), ["a", "b"], create=True) as fd:
        assert os.path.samestat(os.fstat(fd), os.stat(root / "a" / "b"))
    with directory_beneath(str(root), ["a", "b"]) as fd:  # already there
        assert os.path.samestat(os.fstat(fd), os.stat(root / "a" / "b"))
    with pytest.raises(FileNotFoundError):
        with directory_beneath(str(root), ["missing"]):
            pass
    with pytest.raises(FileNotFoundError):  # a vanished root is never made again
        with directory_beneath(str(tmp_path / "gone"), ["a"], create=True):
            pass
    assert not (tmp_path / "gone").exists()
    (root / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        with directory_beneath(str(root), ["file", "x"], create=True):
            pass


def test_directory_beneath_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(NotADirectoryError):
        with directory_beneath(str(root), ["link"], create=True):
            pass
    with pytest.raises(NotADirectoryError):
        with directory_beneath(str(root), ["link", "deeper"], create=True):
            pass
    assert list(outside.iterdir()) == []
    # The root itself may be a link: the user named it.
    (tmp_path / "root-link").symlink_to(root)
    with directory_beneath(str(tmp_path / "root-link"), ["a"], create=True):
        pass
    assert (root / "a").is_dir()


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_write_atomically_publishes_and_describes_first(tmp_path: Path) -> None:
    seen: list[tuple[int, str, bool]] = []

    def fill(fd: int) -> str:
        os.write(fd, b"new content")
        return "result"

    def describe(st: os.stat_result, result: str) -> None:
        # Runs before the rename: the final name still holds the old file.
        seen.append((st.st_ino, result, (tmp_path / "f").read_bytes() == b"old"))

    (tmp_path / "f").write_bytes(b"old")
    with directory_beneath(str(tmp_path), []) as fd:
        assert write_atomically(fd, "f", fill, before_publish=describe) == "result"
    assert (tmp_path / "f").read_bytes() == b"new content"
    assert seen == [((tmp_path / "f").stat().st_ino, "result", True)]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fails_in", ["fill", "before_publish"])
def test_write_atomically_failing_leaves_the_final_name_alone(
    tmp_path: Path, fails_in: str
) -> None:
    (tmp_path / "f").write_bytes(b"old")

    def fill(fd: int) -> None:
        os.write(fd, b"half of it")
        if fails_in == "fill":
            raise OSError(28, "No space left on device")

    def describe(st: os.stat_result, result: None) -> None:
        raise OSError(28, "No space left on device")

    with directory_beneath(str(tmp_path), []) as fd, pytest.raises(OSError):
        write_atomically(fd, "f", fill,
                         before_publish=describe if fails_in == "before_publish" else None)
    assert (tmp_path / "f").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_write_atomically_replaces_a_symlink_never_writes_through_it(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    (tmp_path / "f").symlink_to(target)
    with directory_beneath(str(tmp_path), []) as fd:
        write_atomically(fd, "f", lambda out: os.write(out, b"placed"))
    assert target.read_bytes() == b"keep me"
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_bytes() == b"placed"


def test_write_atomically_killed_midway_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGKILL while a body is being written over an existing file: the final name keeps the
    old version whole, never a prefix of the new one; only a temp file is left behind (which
    listings skip). The file written before the kill is there whole."""
    (tmp_path / "old").write_bytes(b"old version")
    writer = textwrap.dedent(f"""
        import os, time
        from asyncsync.pipeline.place import directory_beneath, write_atomically

        def fill(fd, stall):
            os.write(fd, b"x" * 1_000_000)
            if stall:
                open({str(tmp_path / "halfway")!r}, "w").close()
                time.sleep(60)

        with directory_beneath({str(tmp_path)!r}, []) as fd:
            write_atomically(fd, "new", lambda out: fill(out, False))
            write_atomically(fd, "old", lambda out: fill(out, True))
    """)
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "halfway").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (tmp_path / "old").read_bytes() == b"old version"
    assert (tmp_path / "new").read_bytes() == b"x" * 1_000_000
    [temp] = leftovers(tmp_path)
    assert (tmp_path / temp).stat().st_size == 1_000_000
