"""Unit tests for asyncsync.pipeline.keys: object keys and the include/exclude filter."""

from __future__ import annotations

import os

import pytest

from asyncsync.pipeline.keys import MAX_KEY_BYTES, InvalidKey, PathFilter, object_key

# -- object_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "relative", "expected"),
    [
        ("runs", "a.txt", "runs/a.txt"),
        ("runs/exp1", "weights/best.pt", "runs/exp1/weights/best.pt"),
        ("", "a.txt", "a.txt"),
        ("", "dir/sub/a.txt", "dir/sub/a.txt"),
    ],
)
def test_object_key_joins_prefix(prefix: str, relative: str, expected: str) -> None:
    assert object_key(prefix, relative) == expected


def test_object_key_never_has_double_slashes() -> None:
    for prefix in ("", "p", "p/q"):
        key = object_key(prefix, "a/b/c.bin")
        assert "//" not in key
        assert not key.startswith("/")
        assert not key.endswith("/")


@pytest.mark.parametrize(
    "relative",
    [
        "a b.txt",
        "über/naïve.txt",
        "日本語/ファイル.csv",
        "a+b#c%d&e=f.txt",
        "%20literal.txt",
        "emoji-🙂.json",
        "  leading and trailing  ",
        "x?y*z[1].txt",
    ],
)
def test_object_key_keeps_names_verbatim(relative: str) -> None:
    assert object_key("pre", relative) == f"pre/{relative}"
    assert object_key("", relative) == relative


@pytest.mark.parametrize(
    "relative",
    [
        "",
        ".",
        "..",
        "a/./b",
        "a/../b",
        "../escape.txt",
        "a/..",
        "./a",
        "/abs.txt",
        "a//b",
        "a/",
    ],
)
def test_object_key_rejects_empty_dot_and_dotdot_segments(relative: str) -> None:
    with pytest.raises(InvalidKey, match="empty, '.' or '..' segment") as info:
        object_key("pre", relative)
    assert repr(relative) in str(info.value)


def test_object_key_accepts_dots_inside_names() -> None:
    assert object_key("p", ".hidden/..dots../a.b") == "p/.hidden/..dots../a.b"
    assert object_key("p", "...") == "p/..."


def test_object_key_rejects_non_utf8_names() -> None:
    name = os.fsdecode(b"\xff.txt")  # surrogate-escaped, as os.scandir gives it
    assert name != "\xff.txt"
    with pytest.raises(InvalidKey, match="not valid UTF-8"):
        object_key("pre", name)
    with pytest.raises(InvalidKey, match="not valid UTF-8"):
        object_key("", f"dir/{name}")


def test_invalid_key_is_a_value_error() -> None:
    assert issubclass(InvalidKey, ValueError)


def test_object_key_length_limit_counts_utf8_bytes() -> None:
    assert MAX_KEY_BYTES == 1024
    prefix = "pre"
    room = MAX_KEY_BYTES - len(prefix) - 1
    exactly = "a" * room
    assert len(object_key(prefix, exactly).encode()) == MAX_KEY_BYTES
    with pytest.raises(InvalidKey, match="longer than 1024 bytes"):
        object_key(prefix, exactly + "a")
    # 'é' is two bytes in UTF-8: fewer characters than bytes.
    wide = "é" * (room // 2 + 1)
    assert len(f"{prefix}/{wide}") < MAX_KEY_BYTES
    with pytest.raises(InvalidKey, match="longer than 1024 bytes"):
        object_key(prefix, wide)


def test_object_key_length_limit_without_prefix() -> None:
    assert object_key("", "b" * 1024) == "b" * 1024
    with pytest.raises(InvalidKey, match="longer than"):
        object_key("", "b" * 1025)


# -- PathFilter ----------------------------------------------------------------------------


def test_filter_without_patterns_accepts_everything() -> None:
    f = PathFilter()
    for path in ("a.txt", "dir/b.jpg", "x/y/z/.hidden", "weights/last.pt"):
        assert f.accepts(path)


def test_filter_exclude_only() -> None:
    f = PathFilter(exclude=["*.tmp"])
    assert not f.accepts("a.tmp")
    assert not f.accepts("deep/dir/b.tmp")
    assert f.accepts("a.txt")
    assert f.accepts("tmp/a.txt")


def test_filter_include_restricts() -> None:
    f = PathFilter(include=["*.pt", "*.yaml"])
    assert f.accepts("last.pt")
    assert f.accepts("weights/best.pt")
    assert f.accepts("args.yaml")
    assert not f.accepts("results.csv")
    assert not f.accepts("weights/best.pt.bak")


def test_filter_exclude_wins_over_include() -> None:
    f = PathFilter(include=["*.pt"], exclude=["last.pt"])
    assert f.accepts("weights/best.pt")
    assert not f.accepts("weights/last.pt")
    assert not f.accepts("last.pt")
    both = PathFilter(include=["*"], exclude=["*"])
    assert not both.accepts("anything.txt")


def test_filter_pattern_without_slash_matches_basename_only() -> None:
    f = PathFilter(include=["*.jpg"])
    assert f.accepts("a.jpg")
    assert f.accepts("images/train/a.jpg")
    # The directory name matching does not make a file match.
    assert not f.accepts("x.jpg/readme.txt")
    g = PathFilter(exclude=["weights"])
    assert not g.accepts("run/weights")
    assert g.accepts("weights/best.pt")  # basename is best.pt


def test_filter_is_case_sensitive() -> None:
    f = PathFilter(include=["*.jpg"])
    assert not f.accepts("A.JPG")


def test_filter_pattern_with_slash_matches_whole_path() -> None:
    f = PathFilter(include=["weights/*.pt"])
    assert f.accepts("weights/best.pt")
    # Anchored at the start of the relative path.
    assert not f.accepts("run1/weights/best.pt")
    assert not f.accepts("best.pt")
    # '*' crosses directories.
    assert f.accepts("weights/epoch1/best.pt")


def test_filter_star_in_slash_pattern_crosses_directories() -> None:
    f = PathFilter(exclude=["*/weights/*"])
    assert not f.accepts("run1/weights/best.pt")
    assert not f.accepts("a/b/weights/c/d.pt")
    assert f.accepts("weights/best.pt")  # needs something before /weights/
    assert f.accepts("run1/results.csv")


def test_filter_leading_slash_in_pattern_is_ignored() -> None:
    f = PathFilter(include=["/weights/*"])
    assert f.accepts("weights/best.pt")
    assert not f.accepts("x/weights/best.pt")


def test_filter_character_classes_and_question_mark() -> None:
    f = PathFilter(include=["epoch?.pt", "[ab]*.txt"])
    assert f.accepts("w/epoch1.pt")
    assert not f.accepts("w/epoch10.pt")
    assert f.accepts("alpha.txt")
    assert f.accepts("d/beta.txt")
    assert not f.accepts("gamma.txt")
