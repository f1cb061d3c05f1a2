"""Unit tests for asyncsync.config: sizes, destinations, state directory, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncsync.config import (
    MIN_DELETE_AFTER,
    Destination,
    GiB,
    MiB,
    check_delete_after,
    check_destination_outside,
    default_state_dir,
    descriptors_needed,
    ensure_open_files,
    parse_destination,
    parse_seconds,
    parse_size,
    validate_endpoint,
    validate_source,
)
from asyncsync.errors import ConfigError

# -- parse_size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 * MiB),
        ("64mib", 64 * MiB),
        ("64MB", 64 * MiB),
        ("16M", 16 * MiB),
        ("16m", 16 * MiB),
        ("1G", GiB),
        ("1GiB", GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5M", MiB // 2),
        ("1048576", 1048576),
        ("0", 0),
        ("4k", 4096),
        ("4K", 4096),
        ("4KiB", 4096),
        ("2T", 2 * 1024 * GiB),
        ("10B", 10),
        ("  8 MiB  ", 8 * MiB),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    value = parse_size(text, what="--max-memory")
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "abc", "MiB", "-1", "-5M", "1.5.5", "1e6", "64 MiBs", "64X", "64Pi", "0x10",
     "1,024", "64MiB extra", "1_000"],
)
def test_parse_size_rejects_bad_values(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text, what="--part-size")
    message = str(info.value)
    assert message.startswith("--part-size: ")
    assert repr(text) in message
    assert "is not a size" in message


@pytest.mark.parametrize("text", ["64iB", "64i"])
def test_parse_size_rejects_i_without_unit(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text, what="--part-size")


# -- parse_destination -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bucket", "prefix"),
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://bucket/a", "bucket", "a"),
        ("s3://bucket/a/b/", "bucket", "a/b"),
        ("s3://bucket//a//b", "bucket", "a/b"),
        ("s3://bucket///", "bucket", ""),
        ("s3://my-bucket.2024/runs/exp 1", "my-bucket.2024", "runs/exp 1"),
        ("s3://abc/...x/y..", "abc", "...x/y.."),
        ("s3://" + "a" * 63 + "/p", "a" * 63, "p"),
        ("s3://1bucket9/p", "1bucket9", "p"),
    ],
)
def test_parse_destination_s3(text: str, bucket: str, prefix: str) -> None:
    dest = parse_destination(text)
    assert dest == Destination("s3", bucket, prefix)
    assert "//" not in dest.prefix
    assert not dest.prefix.startswith("/") and not dest.prefix.endswith("/")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("s3:/x", "expected s3://BUCKET"),
        ("x", "expected s3://BUCKET"),
        ("bucket/x", "expected s3://BUCKET"),
        ("S3://bucket", "expected s3://BUCKET"),
        ("https://bucket/x", "expected s3://BUCKET"),
        ("", "expected s3://BUCKET"),
        ("s3://", "no bucket name"),
        ("s3:///prefix", "no bucket name"),
    ],
)
def test_parse_destination_rejects_malformed(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_destination(text)
    message = str(info.value)
    assert repr(text) in message
    assert fragment in message


@pytest.mark.parametrize(
    ("bucket", "problem"),
    [
        ("MyBucket", "lowercase"),
        ("my_bucket", "lowercase"),
        ("ab", "3 to 63"),
        ("a", "3 to 63"),
        ("a" * 64, "3 to 63"),
        ("-bucket", "start and end"),
        ("bucket-", "start and end"),
        (".bucket", "start and end"),
        ("buck et", "lowercase"),
        ("192.168.1.1", "IP address"),
        ("a..b", "'..'"),
    ],
)
def test_parse_destination_rejects_invalid_bucket_names(bucket: str, problem: str) -> None:
    text = f"s3://{bucket}/prefix"
    with pytest.raises(ConfigError) as info:
        parse_destination(text)
    message = str(info.value)
    assert repr(text) in message
    assert f"invalid bucket name {bucket!r}" in message
    assert problem in message


@pytest.mark.parametrize(
    "text",
    ["s3://bucket/.", "s3://bucket/..", "s3://bucket/a/../b", "s3://bucket/a/./b",
     "s3://bucket/a/..", "s3://bucket//./"],
)
def test_parse_destination_rejects_dot_segments_in_prefix(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_destination(text)
    assert repr(text) in str(info.value)
    assert "'.' and '..' are not allowed" in str(info.value)


def test_parse_destination_file_absolute() -> None:
    dest = parse_destination("file:///srv/backup")
    assert dest == Destination("file", "/srv/backup", "")
    assert dest.url == "file:///srv/backup"
    assert parse_destination("file:///srv/x/../backup/").bucket == "/srv/backup"


@pytest.mark.parametrize("text", ["file://rel", "file://rel/path", "file://", "file://./x"])
def test_parse_destination_file_relative_rejected(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_destination(text)
    assert repr(text) in str(info.value)
    assert "absolute path" in str(info.value)


def test_destination_key_for_and_url() -> None:
    with_prefix = parse_destination("s3://bucket/runs/exp1/")
    assert with_prefix.url == "s3://bucket/runs/exp1"
    assert with_prefix.key_for("weights/best.pt") == "runs/exp1/weights/best.pt"
    bare = parse_destination("s3://bucket")
    assert bare.url == "s3://bucket"
    assert bare.key_for("weights/best.pt") == "weights/best.pt"
    file_dest = Destination("file", "/srv/backup", "sub")
    assert file_dest.url == "file:///srv/backup/sub"
    assert file_dest.key_for("a.txt") == "sub/a.txt"


def test_destination_url_round_trips() -> None:
    for text in ("s3://bucket", "s3://bucket/a/b", "file:///srv/backup"):
        assert parse_destination(parse_destination(text).url) == parse_destination(text)


# -- default_state_dir ---------------------------------------------------------------------


def test_state_dir_explicit_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASYNCSYNC_STATE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "explicit"


def test_state_dir_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASYNCSYNC_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "asyncsync"


def test_state_dir_home_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASYNCSYNC_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "asyncsync"


def test_state_dir_empty_env_vars_are_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ASYNCSYNC_STATE_DIR", "")
    monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "asyncsync"


# -- validate_source -------------------------------------------------------------------------


def test_validate_source_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        validate_source(missing)
    assert str(info.value) == f"source {str(missing)!r} does not exist"


def test_validate_source_file(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ConfigError) as info:
        validate_source(file)
    assert str(info.value) == f"source {str(file)!r} is not a directory"


def test_validate_source_ok_returns_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "exp1"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    result = validate_source(Path("runs/../runs/exp1"))
    assert result == run.resolve()
    assert result.is_absolute()
    link = tmp_path / "link"
    link.symlink_to(run)
    assert validate_source(link) == run.resolve()


# -- validate_endpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, ""])
def test_validate_endpoint_empty(url: str | None) -> None:
    assert validate_endpoint(url) is None


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9000", "https://s3.example.com", "http://localhost:8333/",
     "https://[::1]:9000"],
)
def test_validate_endpoint_ok(url: str) -> None:
    assert validate_endpoint(url) == url


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://x", "expected http(s)://HOST[:PORT]"),
        ("localhost:9000", "expected http(s)://HOST[:PORT]"),
        ("127.0.0.1:9000", "expected http(s)://HOST[:PORT]"),
        ("http://", "expected http(s)://HOST[:PORT]"),
        ("http:///path", "expected http(s)://HOST[:PORT]"),
        ("http://h:99999", "out of range"),
        ("http://h:port", "port"),
    ],
)
def test_validate_endpoint_rejects(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_endpoint(url)
    message = str(info.value)
    assert message.startswith(f"endpoint URL {url!r}")
    assert fragment in message


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://minio-user:hunter2@minio:9000", "minio:9000"),
        ("https://minio-user:hunter2/x@s3.example.com/path", "s3.example.com"),
        ("http://minio-user@host", "host"),
        ("minio-user:hunter2@host:9000", "host:9000"),  # no scheme: checked first all the same
        ("ftp://minio-user:hunter2@h:99999", "h:99999"),
    ],
)
def test_validate_endpoint_refuses_credentials_without_echoing_them(url: str, host: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_endpoint(url)
    assert str(info.value) == (
        f"endpoint URL ...@{host}: credentials in the endpoint URL are not allowed; "
        "use the AWS credential chain"
    )
    assert "hunter2" not in str(info.value) and "minio-user" not in str(info.value)


# -- seconds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [("10", 10.0), ("0.5", 0.5), (" 3 ", 3.0), ("0", 0.0), (7, 7.0)]
)
def test_parse_seconds(value: str | float, expected: float) -> None:
    assert parse_seconds(value, what="--settle") == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("nan", "--settle nan: must be a finite number of seconds"),
        ("inf", "--settle inf: must be a finite number of seconds"),
        ("-inf", "--settle -inf: must be a finite number of seconds"),
        ("1e400", "--settle 1e400: must be a finite number of seconds"),
        (float("nan"), "--settle nan: must be a finite number of seconds"),
        ("-1", "--settle -1: must not be negative"),
        ("abc", "--settle abc: not a number of seconds"),
        ("", "--settle : not a number of seconds"),
        (True, "--settle True: not a number of seconds"),
    ],
)
def test_parse_seconds_rejects(value: str | float, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_seconds(value, what="--settle")
    assert str(info.value) == fragment


def test_parse_seconds_minimum_and_positive() -> None:
    assert parse_seconds("1", what="--interval", minimum=1.0) == 1.0
    with pytest.raises(ConfigError) as info:
        parse_seconds("0.2", what="--interval", minimum=1.0, why="each scan stats every file")
    assert str(info.value) == (
        "--interval 0.2: must be at least 1 s (each scan stats every file)"
    )
    with pytest.raises(ConfigError) as info:
        parse_seconds("0", what="--read-timeout", positive=True)
    assert str(info.value) == "--read-timeout 0: must be more than 0 s"
    assert parse_seconds("0.25", what="--read-timeout", positive=True) == 0.25


# -- --delete-after --------------------------------------------------------------------------


def test_short_delete_after_needs_the_explicit_flag() -> None:
    assert check_delete_after(MIN_DELETE_AFTER, "10m", allow_short=False) == MIN_DELETE_AFTER
    assert check_delete_after(7 * 86400, "7d", allow_short=False) == 7 * 86400
    for seconds, text in ((0.0, "0"), (59.0, "59s"), (MIN_DELETE_AFTER - 1, "599")):
        with pytest.raises(ConfigError) as info:
            check_delete_after(seconds, text, allow_short=False)
        message = str(info.value)
        assert message.startswith(f"--delete-after {text}: under 10 minutes")
        assert "--allow-short-delete-after" in message
        assert check_delete_after(seconds, text, allow_short=True) == seconds
    with pytest.raises(ConfigError, match="finite"):
        check_delete_after(float("inf"), "9" * 400, allow_short=True)


# -- file:// destination inside SRC ---------------------------------------------------------


def test_file_destination_inside_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "data" / "run"
    src.mkdir(parents=True)
    for inside in (src, src / "mirror", src / "a" / ".." / "b"):
        with pytest.raises(ConfigError) as info:
            check_destination_outside(src, parse_destination(f"file://{inside}"))
        assert "lies inside SRC" in str(info.value)
    # Through a symlink that leads back into SRC.
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(ConfigError):
        check_destination_outside(src, parse_destination(f"file://{tmp_path / 'link' / 'm'}"))
    # Components, not a string prefix: run2 is beside run, not in it; a parent is fine too.
    for outside in (tmp_path / "data" / "run2", tmp_path / "data", tmp_path / "elsewhere"):
        check_destination_outside(src, parse_destination(f"file://{outside}"))
    check_destination_outside(src, parse_destination("s3://bucket/run"))


# -- open files ------------------------------------------------------------------------------


def test_descriptors_needed_counts_files_connections_and_headroom() -> None:
    direct = descriptors_needed(32, 44, direct_uploads=True)
    botocore = descriptors_needed(32, 44, direct_uploads=False)
    assert direct - botocore == 32  # botocore's control pool beside the upload pool
    assert botocore > 2 * 32 + 44  # a file and its directory per worker, plus headroom
    assert descriptors_needed(64, 76, direct_uploads=True) > direct


def test_open_file_limit_is_raised_toward_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        ensure_open_files(400, workers=10)  # enough already: left alone
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (512, hard)
        ensure_open_files(2000, workers=500)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (2000, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_open_file_limit_beyond_the_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    with pytest.raises(ConfigError) as info:
        ensure_open_files(5000, workers=1200)
    assert calls == [(4096, 4096)]  # raised as far as it goes, still not enough
    assert str(info.value) == (
        "--workers 1200: needs about 5000 open files, but the limit is 4096; "
        "use fewer workers or raise the limit (ulimit -n 5000)"
    )
