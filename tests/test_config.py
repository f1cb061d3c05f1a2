"""Unit tests for asyncsync.config and the option table (asyncsync.options): sizes,
destinations, state directory, validation; flags, ASYNCSYNC_* variables and the TOML file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncsync.config import (
    DEFAULT_WORKERS,
    MIN_DELETE_AFTER,
    Destination,
    GiB,
    MiB,
    PushConfig,
    StoreConfig,
    TransferConfig,
    WatchConfig,
    check_delete_after,
    check_destination_outside,
    check_settings,
    default_state_dir,
    descriptors_needed,
    ensure_open_files,
    parse_destination,
    parse_seconds,
    parse_size,
    push_config_from,
    validate_endpoint,
    validate_source,
)
from asyncsync.errors import ConfigError
from asyncsync.options import (
    BY_NAME,
    COMMANDS,
    OPTIONS,
    Kind,
    Source,
    describe,
    from_mapping,
    parse_value,
    resolve,
)

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


# -- --addressing-style virtual needs a host name ---------------------------------------------

_NO_VIRTUAL = ("is an IP address, which cannot carry the bucket in its host name (botocore "
               "would quietly address by path); use --addressing-style path")


@pytest.fixture
def no_aws_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000", "https://10.1.2.3", "http://[::1]:8333",
            "http://[fe80::1%25eth0]:9000"],
)
@pytest.mark.usefixtures("no_aws_endpoint")
def test_virtual_addressing_with_an_ip_endpoint_is_refused(url: str) -> None:
    settings = resolve("push", flags={"addressing_style": "virtual", "endpoint_url": url})
    with pytest.raises(ConfigError) as info:
        check_settings(settings)
    assert str(info.value) == f"--addressing-style virtual: the endpoint {url} {_NO_VIRTUAL}"


@pytest.mark.usefixtures("no_aws_endpoint")
def test_virtual_addressing_refusal_names_where_the_style_and_endpoint_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.example.com")  # the _S3 one wins
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://[::1]:9000")
    settings = resolve("watch", environ={"ASYNCSYNC_ADDRESSING_STYLE": "virtual"})
    with pytest.raises(ConfigError) as info:
        push_config_from(settings, source=tmp_path, destination="s3://bucket-a/x")
    assert str(info.value) == (
        "ASYNCSYNC_ADDRESSING_STYLE: --addressing-style virtual: the endpoint "
        f"http://[::1]:9000 (from $AWS_ENDPOINT_URL_S3) {_NO_VIRTUAL}"
    )


@pytest.mark.parametrize(
    ("style", "url"),
    [("virtual", "http://localhost:9000"), ("virtual", "https://s3.example.com"),
     ("virtual", None), ("path", "http://127.0.0.1:9000"), ("auto", "http://[::1]:9000")],
)
@pytest.mark.usefixtures("no_aws_endpoint")
def test_virtual_addressing_with_a_host_name_and_other_styles_with_ips_are_fine(
    tmp_path: Path, style: str, url: str | None
) -> None:
    flags = {"addressing_style": style} | ({"endpoint_url": url} if url else {})
    config = push_config_from(resolve("push", flags=flags), source=tmp_path,
                              destination="s3://bucket-a/x")
    assert config.store.addressing_style == style and config.store.endpoint_url == url


def test_virtual_addressing_with_an_ip_endpoint_exits_2_through_the_cli(tmp_path: Path) -> None:
    from .conftest import run_cli

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "ASYNCSYNC_"))}
    env.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
               AWS_ENDPOINT_URL="http://127.0.0.1:9")
    result = run_cli("push", tmp_path, "s3://bucket-a/x", "--state-dir", tmp_path / "state",
                     "--addressing-style", "virtual", env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "asyncsync: error: --addressing-style virtual: the endpoint http://127.0.0.1:9 "
        f"(from $AWS_ENDPOINT_URL) {_NO_VIRTUAL}"
    ]


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


# -- the option table: flags, ASYNCSYNC_* variables, the TOML file, attach() -------------------

PUSH_FLAGS = ["--workers", "12", "--max-memory", "128MiB", "--part-size", "8MiB",
              "--include", "*.pt", "--include", "*.csv", "--exclude", "a,b.pt",
              "--max-bandwidth", "50MB/s", "--gzip", "--no-direct-uploads",
              "--read-timeout", "30", "--addressing-style", "path", "--retries", "3",
              "--endpoint-url", "http://127.0.0.1:9", "--reconcile"]
PUSH_ENV = {"ASYNCSYNC_WORKERS": "12", "ASYNCSYNC_MAX_MEMORY": "128MiB",
            "ASYNCSYNC_PART_SIZE": "8MiB", "ASYNCSYNC_INCLUDE": "*.pt, *.csv",
            "ASYNCSYNC_EXCLUDE": '"a,b.pt"', "ASYNCSYNC_MAX_BANDWIDTH": "50MB/s",
            "ASYNCSYNC_GZIP": "true", "ASYNCSYNC_DIRECT_UPLOADS": "0",
            "ASYNCSYNC_READ_TIMEOUT": "30", "ASYNCSYNC_ADDRESSING_STYLE": "path",
            "ASYNCSYNC_RETRIES": "3", "ASYNCSYNC_ENDPOINT_URL": "http://127.0.0.1:9",
            "ASYNCSYNC_RECONCILE": "yes"}
PUSH_TOML = """
workers = 12
max_memory = "128MiB"
part_size = 8388608
include = ["*.pt", "*.csv"]
exclude = "a,b.pt"
max_bandwidth = "50MB/s"
gzip = true
direct_uploads = false
read_timeout = 30.0
addressing_style = "path"
retries = 3
endpoint_url = "http://127.0.0.1:9"
settle = 99  # watch's: push leaves it alone

[push]
reconcile = true
"""


def _push_from(tmp_path: Path, argv: list[str], *, env: dict[str, str] | None = None,
               file: str | None = None) -> object:
    from asyncsync.cli import build_parser, push_config

    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    words = ["push", str(src), "s3://bucket-a/runs", "--state-dir", str(tmp_path / "state")]
    if file is not None:
        (tmp_path / "push.toml").write_text(file)
        words += ["--config", str(tmp_path / "push.toml")]
    args = build_parser().parse_args(words + argv)
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("ASYNCSYNC_") or n.startswith("AWS_")]:
            patch.delenv(name)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        return push_config(args)


def test_the_same_push_from_flags_environment_and_file(tmp_path: Path) -> None:
    from_flags = _push_from(tmp_path, PUSH_FLAGS)
    assert from_flags == _push_from(tmp_path, [], env=PUSH_ENV)
    assert from_flags == _push_from(tmp_path, [], file=PUSH_TOML)
    assert isinstance(from_flags, PushConfig)
    assert from_flags.transfer == TransferConfig(
        workers=12, max_memory=128 * MiB, part_size=8 * MiB, gzip=True,
        max_bandwidth=50e6,
    )
    assert from_flags.store.direct_uploads is False and from_flags.store.max_attempts == 3
    assert from_flags.store.read_timeout == 30.0 and from_flags.store.addressing_style == "path"
    assert from_flags.store.endpoint_url == "http://127.0.0.1:9"
    assert from_flags.include == ("*.pt", "*.csv") and from_flags.exclude == ("a,b.pt",)
    assert from_flags.reconcile is True


def test_no_settings_anywhere_is_the_documented_defaults(tmp_path: Path) -> None:
    config = _push_from(tmp_path, [])
    assert isinstance(config, PushConfig)
    assert config.transfer == TransferConfig()
    assert config.store == StoreConfig(max_connections=config.store.max_connections)
    assert config.include == () and not config.reconcile and not config.dry_run


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    file = 'workers = 3\nretries = 4\nread_timeout = 5\ninclude = ["*.f"]\n'
    env = {"ASYNCSYNC_WORKERS": "2", "ASYNCSYNC_RETRIES": "7", "ASYNCSYNC_INCLUDE": "*.e"}
    config = _push_from(tmp_path, ["--workers", "1", "--include", "*.x"], env=env, file=file)
    assert isinstance(config, PushConfig)
    assert config.transfer.workers == 1  # flag
    assert config.include == ("*.x",)  # a repeated flag replaces the list below it
    assert config.store.max_attempts == 7  # environment
    assert config.store.read_timeout == 5.0  # file
    assert config.store.connect_timeout == StoreConfig.connect_timeout  # default


def test_a_command_section_beats_the_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('settle = 2\nworkers = 4\n[watch]\nsettle = 7\n[run]\nworkers = 9\n')
    watch = resolve("watch", file=path)
    assert watch["settle"] == 7.0 and watch["workers"] == 4
    assert watch.setting("settle").origin.describe() == "file [watch]"
    assert resolve("run", file=path)["workers"] == 9
    push = resolve("push", file=path)
    assert push["workers"] == 4 and "settle" not in push  # settle is not push's


def test_verbose_flags_add_to_the_level_below_them() -> None:
    assert resolve("push")["verbose"] == 0
    assert resolve("watch")["verbose"] == 1  # watch logs each decision by default
    assert resolve("watch", flags={"verbose": 1})["verbose"] == 2
    assert resolve("push", flags={"verbose": 1},
                   environ={"ASYNCSYNC_VERBOSE": "1"})["verbose"] == 2


def test_the_environment_reads_only_its_own_variables() -> None:
    env = {"ASYNCSYNC_TEST_ENDPOINT": "http://x", "ASYNCSYNC_SETTLE": "nan",
           "ASYNCSYNC_WORKERS": "", "ASYNCSYNC_CHECKPOINT_GLOB": "*.pt,*.ckpt"}
    push = resolve("push", environ=env)  # settle is watch's: push never reads it
    assert push["workers"] == DEFAULT_WORKERS  # an empty variable is unset
    watch = resolve("watch", environ={**env, "ASYNCSYNC_SETTLE": "3"})
    assert watch["checkpoint_glob"] == ("*.pt", "*.ckpt") and watch["settle"] == 3.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrokers = 3\n", "config file {file}: unknown key 'wrokers' (did you mean 'workers'?)"),
        ("max-memory = '8MiB'\n",
         "config file {file}: unknown key 'max-memory' (keys use underscores: max_memory)"),
        ("[push]\nsettle = 3\n", "config file {file}: [push]: push takes no option 'settle'"),
        ("[wach]\nsettle = 3\n",
         "config file {file}: [wach]: unknown section (sections: push, watch, run)"),
        ("push = 3\n", "config file {file}: push: must be a section ([push])"),
        ("workers = 0\n", "config file {file}: workers: --workers 0: must be at least 1"),
        ("workers = 'many'\n", "config file {file}: workers: --workers many: not a whole number"),
        ("workers = true\n", "config file {file}: workers: --workers True: not a whole number"),
        ("[push]\nmax_memory = '1M'\n",
         "config file {file}: push.max_memory: --max-memory 1M: must be at least 5MiB (one part)"),
        ("read_timeout = 'inf'\n",
         "config file {file}: read_timeout: --read-timeout inf: must be a finite number of "
         "seconds"),
        ("addressing_style = 'sideways'\n",
         "config file {file}: addressing_style: --addressing-style sideways: must be one of "
         "auto, path, virtual"),
        ("gzip = 'maybe'\n",
         "config file {file}: gzip: 'maybe' is not true or false (true/false, 1/0, yes/no, "
         "on/off)"),
        ("include = [1]\n", "config file {file}: include: --include 1: a glob must be a string"),
        ("region = 5\n", "config file {file}: region: --region 5: must be a string"),
        ("workers = \n", "config file {file}: not valid TOML: Invalid value (at line 1, "
         "column 11)"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "asyncsync.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve("push", file=path)
    assert str(info.value) == message.format(file=path)


def test_an_unreadable_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve("push", file=tmp_path / "missing.toml")
    assert str(info.value) == (
        f"config file {tmp_path / 'missing.toml'}: cannot read: No such file or directory"
    )
    (tmp_path / "latin1.toml").write_bytes(b"region = '\xe9'\n")
    with pytest.raises(ConfigError, match="latin1.toml: not valid TOML"):
        resolve("push", file=tmp_path / "latin1.toml")


def test_a_bad_variable_names_it() -> None:
    with pytest.raises(ConfigError) as info:
        resolve("watch", environ={"ASYNCSYNC_INTERVAL": "0.1"})
    assert str(info.value) == (
        "ASYNCSYNC_INTERVAL: --interval 0.1: must be at least 0.5 s "
        "(each full scan stats every file under SRC)"
    )


def test_checks_across_options_name_where_the_value_was_set(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[watch]\nkeep = ['best.pt']\n")
    with pytest.raises(ConfigError) as info:
        check_settings(resolve("watch", file=path))
    assert str(info.value) == (
        f"config file {path}: watch.keep: --keep, --delete-dry-run and "
        "--allow-short-delete-after need --delete-after"
    )
    with pytest.raises(ConfigError) as info:
        check_settings(resolve("watch", environ={"ASYNCSYNC_DELETE_AFTER": "5m"}))
    assert str(info.value).startswith("ASYNCSYNC_DELETE_AFTER: --delete-after 5m: under 10 ")


def test_every_option_has_one_name_flag_and_variable_and_a_valid_default() -> None:
    assert len(BY_NAME) == len(OPTIONS)
    spellings = [flag for option in OPTIONS for flag in option.spellings]
    assert len(spellings) == len(set(spellings))
    for option in OPTIONS:
        assert option.env == "ASYNCSYNC_" + option.name.upper()
        assert option.commands <= set(COMMANDS) and option.help
        for command in option.commands:
            default = option.default_for(command)
            if default is not None and option.kind not in (Kind.RATE, Kind.DURATION,
                                                           Kind.ADDRESS):
                assert parse_value(option, default) == default, option.name


def test_the_printed_settings_are_a_config_file_that_gives_the_same_settings(
    tmp_path: Path,
) -> None:
    import tomllib

    settings = resolve("watch", flags={"workers": "5", "include": ["*.pt"], "settle": "2.5",
                                       "max_bandwidth": "40MiB/s", "metrics_addr": ":9100",
                                       "delete_after": "2h"})
    text = "\n".join(describe(settings))
    path = tmp_path / "printed.toml"
    path.write_text(text)
    assert set(tomllib.loads(text)) == {"watch"}
    again = resolve("watch", file=path)
    assert dict(again) == dict(settings)
    assert {again.setting(name).origin.source for name in again} <= {
        Source.FILE, Source.DEFAULT
    }


def test_attach_options_go_through_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncsync.integrations.ultralytics import settings_from

    monkeypatch.setenv("ASYNCSYNC_WORKERS", "64")  # a library call reads its arguments only
    options = {"state_dir": tmp_path, "max_bandwidth": "20MB/s", "exclude": "*.jpg",
               "part_size": 8 * MiB, "endpoint_url": None}
    attached = settings_from("s3://bucket-a/prefix", dict(options, flush_timeout=60))
    assert attached.flush_timeout == 60.0
    assert attached.checkpoint_interval == WatchConfig.checkpoint_interval
    expected = push_config_from(from_mapping("attach", options), source=".",
                                destination="s3://bucket-a/prefix", source_may_be_missing=True)
    assert attached.push == expected
    assert attached.push.transfer.workers == 8  # attach's own default
    assert attached.push.exclude == ("*.jpg",) and attached.push.transfer.max_bandwidth == 2e7
    with pytest.raises(ConfigError) as info:
        settings_from("s3://bucket-a/prefix", {"part_size": "1KiB"})
    assert str(info.value) == (
        "attach(): part_size: --part-size 1KiB: must be between 5MiB and 5GiB"
    )
    with pytest.raises(ConfigError, match=r"unknown option 'dry_run'"):
        settings_from("s3://bucket-a/prefix", {"dry_run": True})  # push's, not attach's
    with pytest.raises(ConfigError, match=r"did you mean 'exclude'\?"):
        settings_from("s3://bucket-a/prefix", {"exlude": "*.jpg"})


def test_the_config_module_imports_neither_the_cli_nor_argparse() -> None:
    import subprocess
    import sys

    code = ("import sys, asyncsync.options, asyncsync.integrations.ultralytics; "
            "print([m for m in ('asyncsync.cli', 'argparse') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("machine", "number"),
                         [("x86_64", 251), ("aarch64", 30), ("riscv64", None), ("ppc64le", None),
                          ("i686", None)])
def test_ioprio_set_number_follows_the_architecture(machine: str, number: int | None) -> None:
    from asyncsync.cli import ioprio_set_number

    assert ioprio_set_number(machine) == number


def test_readme_lists_every_option_with_its_flags_and_commands() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    order = ("push", "watch", "run", "attach")
    for option in OPTIONS:
        flags = ", ".join(f"`{flag}`" for flag in option.spellings)
        row = next((line for line in readme.splitlines()
                    if line.startswith(f"| `{option.name}` | {flags} |")), None)
        assert row is not None, f"README's Configuration table lacks {option.name}"
        commands = row.rstrip(" |").rsplit("|", 1)[1]
        listed = ", ".join(c for c in order if c in option.commands)
        assert commands.strip().startswith(listed), option.name
