"""Unit tests for asyncsync.pipeline.plan: per-file decisions and multipart sizing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from asyncsync.config import (
    DEFAULT_GZIP_SUFFIXES,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    GiB,
    MiB,
    TransferConfig,
)
from asyncsync.pipeline.keys import InvalidKey, PathFilter
from asyncsync.pipeline.manifest import ObjectRecord
from asyncsync.pipeline.mime import valid_media_type
from asyncsync.pipeline.plan import (
    GZIP_MIN_SIZE,
    Action,
    Decision,
    content_type_for,
    history_key,
    history_version_key,
    part_count,
    part_size_for,
    part_window_for,
    plan_file,
    uses_multipart,
    wants_gzip,
)
from asyncsync.pipeline.scan import ScannedFile
from asyncsync.pipeline.source import SourceRoot

TiB = 1024 * GiB

SCANNED = ScannedFile(
    path="/data/run/weights/best.pt",
    relative="weights/best.pt",
    size=12345,
    mtime_ns=1_700_000_000_123_456_789,
    inode=4242,
    device=64769,
    root=SourceRoot("/data/run"),
)


def record_for(scanned: ScannedFile, **changes: object) -> ObjectRecord:
    record = ObjectRecord(
        key=f"prefix/{scanned.relative}",
        source=scanned.path,
        size=scanned.size,
        mtime_ns=scanned.mtime_ns,
        inode=scanned.inode,
        digest="0" * 32,
        etag='"etag"',
        object_size=scanned.size,
        content_encoding=None,
        uploaded_at=1.0,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# -- plan_file -----------------------------------------------------------------------------


def test_no_record_means_upload_new() -> None:
    decision = plan_file(SCANNED, None)
    assert decision == Decision(Action.UPLOAD, "new", None)
    assert decision.record is None


def test_identical_stat_means_skip() -> None:
    record = record_for(SCANNED)
    decision = plan_file(SCANNED, record)
    assert decision.action is Action.SKIP
    assert decision.reason == "unchanged"
    assert decision.record is record


def test_skip_ignores_digest_etag_and_upload_time() -> None:
    record = record_for(SCANNED, digest="f" * 32, etag='"other"', uploaded_at=99.0)
    assert plan_file(SCANNED, record).action is Action.SKIP


@pytest.mark.parametrize(
    "changes",
    [
        {"size": SCANNED.size + 1},
        {"size": 0},
        {"mtime_ns": SCANNED.mtime_ns + 1},  # a nanosecond is enough
        {"mtime_ns": SCANNED.mtime_ns - 1_000_000_000},
        {"inode": SCANNED.inode + 1},
        {"source": "/elsewhere/run/weights/best.pt"},
    ],
)
def test_any_stat_difference_means_verify(changes: dict[str, object]) -> None:
    record = record_for(SCANNED, **changes)
    decision = plan_file(SCANNED, record)
    assert decision.action is Action.VERIFY
    assert decision.reason == "changed"
    assert decision.record is record


# -- history_key ---------------------------------------------------------------------------

CSV = dataclasses.replace(SCANNED, path="/data/run/train/results.csv",
                          relative="train/results.csv", size=400)
HISTORY = PathFilter(include=("*.csv",))


def test_a_results_csv_that_shrank_keeps_its_previous_object() -> None:
    record = record_for(CSV, size=900, uploaded_at=1_700_000_000.0)
    assert history_key(CSV, record, HISTORY, "runs") == (
        "runs/_asyncsync/history/train/results.csv/20231114T221320Z"
    )
    assert history_key(CSV, record, HISTORY, "") == (
        "_asyncsync/history/train/results.csv/20231114T221320Z"
    )


def test_each_version_kept_has_a_key_of_its_own() -> None:
    """Two versions kept within one second, or under a row whose upload time lags the
    bucket, differ by their ETags; the same version kept twice lands on the same key."""
    base = "runs/_asyncsync/history/train/results.csv/20231114T221320Z"
    one = history_version_key(base, '"0cc175b9c0f1b6a831c399e269772661"')
    other = history_version_key(base, '"92eb5ffee6ae2fec3ad71c777531578f-2"')
    assert one == base + "-0cc175b9c0f1" and other == base + "-92eb5ffee6ae"
    assert one != other and history_version_key(base, '"0cc175b9c0f1b6a831c399e269772661"') == one
    with pytest.raises(InvalidKey):
        history_version_key("k" * 1020, '"0cc175b9"')


def test_a_recreated_results_csv_keeps_its_previous_object_even_when_longer() -> None:
    record = record_for(CSV, inode=CSV.inode + 1, size=10)
    assert history_key(CSV, record, HISTORY, "runs") is not None


def test_a_results_csv_rewritten_in_place_and_grown_keeps_its_previous_object() -> None:
    """Same inode and longer, but no longer starting with the object's bytes: an exist_ok
    restart truncated it and wrote past the old length before the look."""
    record = record_for(CSV, size=100)
    asked = []

    def starts_with_object(kept: ObjectRecord) -> bool:
        asked.append(kept)
        return False

    assert history_key(CSV, record, HISTORY, "runs",
                       still_starts_with_object=starts_with_object) is not None
    assert asked == [record]
    assert history_key(CSV, record, HISTORY, "runs",
                       still_starts_with_object=lambda kept: True) is None  # appended to


@pytest.mark.parametrize(
    ("scanned", "record", "history"),
    [
        (CSV, None, HISTORY),  # never uploaded: nothing to keep
        (CSV, record_for(CSV, size=100), HISTORY),  # appended to
        (CSV, record_for(CSV), HISTORY),  # touched only
        (CSV, record_for(CSV, size=900, source="/other/results.csv"), HISTORY),  # not its own
        (CSV, record_for(CSV, size=900), PathFilter()),  # --history-glob matches nothing
        (SCANNED, record_for(SCANNED, size=SCANNED.size * 2), HISTORY),  # not append-only
    ],
)
def test_no_history_copy_when_nothing_is_lost(
    scanned: ScannedFile, record: ObjectRecord | None, history: PathFilter
) -> None:
    assert history_key(scanned, record, history, "runs") is None


def test_a_history_key_too_long_to_exist_is_refused() -> None:
    deep = dataclasses.replace(CSV, relative="d/" * 490 + "results.csv")
    record = record_for(deep, size=900)
    with pytest.raises(InvalidKey):
        history_key(deep, record, HISTORY, "runs")


# -- part_size_for ---------------------------------------------------------------------------

SIZES = [
    0,
    1,
    MIN_PART_SIZE - 1,
    MIN_PART_SIZE,
    MIN_PART_SIZE + 1,
    16 * MiB + 1,
    1 * GiB - 1,
    1 * GiB,
    1 * GiB + 1,
    8 * GiB,
    8 * GiB + 1,
    50 * GiB,
    64 * GiB + 1,
    100 * GiB,
    1 * TiB,
    int(4.9 * TiB),
    5 * TiB - 1,
    5 * TiB,
]


@pytest.mark.parametrize("size", SIZES)
def test_part_size_within_s3_limits(size: int) -> None:
    part = part_size_for(size)
    assert MIN_PART_SIZE <= part <= MAX_PART_SIZE
    assert part % MiB == 0
    assert part_count(size, part) <= MAX_PARTS
    assert math.ceil(size / part) <= MAX_PARTS


def test_part_size_sweep_up_to_5_tib() -> None:
    size = 1
    while size <= MAX_OBJECT_SIZE:
        for candidate in (size - 1, size, size + 1, size * 3 // 2):
            if not 0 <= candidate <= MAX_OBJECT_SIZE:
                continue
            part = part_size_for(candidate)
            assert MIN_PART_SIZE <= part <= MAX_PART_SIZE, candidate
            assert part % MiB == 0, candidate
            assert part_count(candidate, part) <= MAX_PARTS, candidate
        size *= 2


def test_part_size_ladder_grows_with_file_size() -> None:
    assert part_size_for(0) == 8 * MiB
    assert part_size_for(100 * MiB) == 8 * MiB
    assert part_size_for(1 * GiB) == 8 * MiB
    assert part_size_for(1 * GiB + 1) == 16 * MiB
    assert part_size_for(8 * GiB) == 16 * MiB
    assert part_size_for(8 * GiB + 1) == 64 * MiB
    assert part_size_for(64 * GiB) == 64 * MiB
    assert part_size_for(100 * GiB) == 128 * MiB
    sizes = [part_size_for(s) for s in SIZES]
    assert sizes == sorted(sizes)


def test_part_size_for_5_tib_is_raised_to_fit_10000_parts() -> None:
    part = part_size_for(5 * TiB)
    # 5 TiB / 10,000 = 524.288 MiB, rounded up to whole MiB.
    assert part == 525 * MiB
    assert part_count(5 * TiB, part) == 9987


def test_configured_part_size_is_honoured() -> None:
    assert part_size_for(100 * MiB, 32 * MiB) == 32 * MiB
    assert part_size_for(10 * GiB, 6 * MiB) == 6 * MiB
    assert part_size_for(0, 7 * MiB) == 7 * MiB


def test_configured_part_size_respects_minimum_and_whole_mib() -> None:
    assert part_size_for(100 * MiB, 1 * MiB) == MIN_PART_SIZE
    assert part_size_for(100 * MiB, 1) == MIN_PART_SIZE
    assert part_size_for(100 * MiB, 6 * MiB + 1) == 7 * MiB


def test_configured_part_size_is_capped_at_5_gib() -> None:
    assert part_size_for(100 * GiB, 10 * GiB) == MAX_PART_SIZE


def test_configured_part_size_raised_when_10000_parts_would_not_suffice() -> None:
    size = 100 * GiB
    configured = 5 * MiB  # 100 GiB / 5 MiB = 20,480 parts: too many
    part = part_size_for(size, configured)
    assert part > configured
    assert part % MiB == 0
    assert part_count(size, part) <= MAX_PARTS
    # The smallest whole-MiB size that fits: 100 GiB / 10,000 = 10.24 MiB -> 11 MiB.
    assert part == 11 * MiB
    # Exactly 10,000 parts of the configured size is still fine.
    assert part_size_for(10_000 * 8 * MiB, 8 * MiB) == 8 * MiB
    assert part_size_for(10_000 * 8 * MiB + 1, 8 * MiB) == 9 * MiB


# -- part_count ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "part", "expected"),
    [
        (0, 8 * MiB, 1),
        (1, 8 * MiB, 1),
        (8 * MiB, 8 * MiB, 1),
        (8 * MiB + 1, 8 * MiB, 2),
        (16 * MiB, 8 * MiB, 2),
        (100 * MiB, 8 * MiB, 13),
    ],
)
def test_part_count(size: int, part: int, expected: int) -> None:
    assert part_count(size, part) == expected


# -- part_window_for -----------------------------------------------------------------------


def test_part_window_bounded_by_part_count() -> None:
    config = TransferConfig(part_concurrency=8, max_memory=1 * GiB)
    assert part_window_for(20 * MiB, 8 * MiB, config) == 3
    assert part_window_for(0, 8 * MiB, config) == 1


def test_part_window_bounded_by_part_concurrency() -> None:
    config = TransferConfig(part_concurrency=4, max_memory=1 * GiB)
    assert part_window_for(1 * GiB, 8 * MiB, config) == 4


def test_part_window_bounded_by_memory() -> None:
    config = TransferConfig(part_concurrency=8, max_memory=64 * MiB)
    assert part_window_for(1 * GiB, 16 * MiB, config) == 4
    config = TransferConfig(part_concurrency=8, max_memory=63 * MiB)
    assert part_window_for(1 * GiB, 16 * MiB, config) == 3


def test_part_window_is_at_least_one() -> None:
    config = TransferConfig(part_concurrency=8, max_memory=1 * MiB)
    assert part_window_for(1 * GiB, 128 * MiB, config) == 1
    config = TransferConfig(part_concurrency=0, max_memory=1 * GiB)
    assert part_window_for(1 * GiB, 8 * MiB, config) == 1


def test_part_window_default_config() -> None:
    config = TransferConfig()
    # 64 MiB budget / 8 MiB parts = 8, part_concurrency 8, 128 parts.
    assert part_window_for(1 * GiB, 8 * MiB, config) == 8
    assert part_window_for(1 * GiB, 16 * MiB, config) == 4


# -- uses_multipart ------------------------------------------------------------------------


def test_uses_multipart_boundary() -> None:
    config = TransferConfig(multipart_threshold=16 * MiB)
    assert not uses_multipart(0, config)
    assert not uses_multipart(16 * MiB - 1, config)
    assert not uses_multipart(16 * MiB, config)  # == threshold: a single PUT
    assert uses_multipart(16 * MiB + 1, config)
    assert uses_multipart(1 * GiB, config)


def test_uses_multipart_custom_threshold() -> None:
    config = TransferConfig(multipart_threshold=100)
    assert not uses_multipart(100, config)
    assert uses_multipart(101, config)


# -- wants_gzip ----------------------------------------------------------------------------


def test_wants_gzip_not_for_files_under_the_threshold() -> None:
    """gzip's frame outweighs what a tiny file saves (6 bytes would be stored as 26)."""
    config = TransferConfig(gzip=True)
    assert not wants_gzip("run/results.csv", 6, config)
    assert not wants_gzip("run/results.csv", GZIP_MIN_SIZE - 1, config)
    assert wants_gzip("run/results.csv", GZIP_MIN_SIZE, config)


@pytest.mark.parametrize(("name", "expected"), [
    ("exp/results.png", "image/png"),
    ("exp/confusion_matrix.PNG", "image/png"),
    ("exp/val_batch0_pred.jpg", "image/jpeg"),
    ("exp/val_batch0_pred.jpeg", "image/jpeg"),
    ("exp/results.csv", "text/csv"),
    ("exp/args.yaml", "application/yaml"),
    ("data.yml", "application/yaml"),
    ("exp/weights/best.pt", "application/octet-stream"),
    ("exp/weights/last.pth", "application/octet-stream"),
    ("model.onnx", "application/octet-stream"),
    ("model.safetensors", "application/octet-stream"),
    ("metrics.json", "application/json"),
    ("events.jsonl", "application/jsonl"),
    ("train.log", "text/plain"),
    ("notes.txt", "text/plain"),
    ("plot.svg", "image/svg+xml"),
    ("report.html", "text/html"),
    ("events.out.tfevents.1700000000.host", "application/octet-stream"),
    ("backup.tar.gz", "application/octet-stream"),  # gzip data as stored, not a tar
    ("Makefile", "application/octet-stream"),
])
def test_content_type_from_the_file_name(name: str, expected: str) -> None:
    assert content_type_for(name, TransferConfig()) == expected


def test_content_type_option_wins_over_the_guess() -> None:
    config = TransferConfig(content_type="text/plain; charset=utf-8")
    assert content_type_for("exp/results.png", config) == "text/plain; charset=utf-8"


@pytest.mark.parametrize("text", ["image/png", "text/plain; charset=utf-8",
                                  "application/vnd.ms-excel", "application/x-yaml"])
def test_valid_media_types(text: str) -> None:
    assert valid_media_type(text)


@pytest.mark.parametrize("text", ["png", "image/", "/png", "text/plain\r\nX-Evil: 1",
                                  "image/png; charset", ""])
def test_invalid_media_types(text: str) -> None:
    assert not valid_media_type(text)


def test_wants_gzip_off_by_default() -> None:
    config = TransferConfig()
    assert config.gzip is False
    for name in ("results.csv", "args.yaml", "log.txt"):
        assert not wants_gzip(name, 4096, config)


@pytest.mark.parametrize("suffix", DEFAULT_GZIP_SUFFIXES)
def test_wants_gzip_for_listed_suffixes(suffix: str) -> None:
    config = TransferConfig(gzip=True)
    assert wants_gzip(f"run/file{suffix}", 4096, config)
    assert wants_gzip(f"file{suffix.upper()}", 4096, config)


@pytest.mark.parametrize(
    "name",
    ["weights/best.pt", "img.jpg", "data.csv.gz", "csv", "notes.txt.bak", "file.Csvx", "a.parquet"],
)
def test_wants_gzip_not_for_other_suffixes(name: str) -> None:
    assert not wants_gzip(name, 4096, TransferConfig(gzip=True))


def test_wants_gzip_case_insensitive_and_custom_suffixes() -> None:
    config = TransferConfig(gzip=True, gzip_suffixes=(".md",))
    assert wants_gzip("README.MD", 4096, config)
    assert wants_gzip("docs/Notes.Md", 4096, config)
    assert not wants_gzip("results.csv", 4096, config)
