"""Unit tests for asyncsync.report: per-file records and counters."""

from __future__ import annotations

import io
import json

from asyncsync.report import Reporter
from asyncsync.scan import ScannedFile
from asyncsync.transfer import FileOutcome


def test_unchanged_files_in_bulk_print_the_records_outcome_prints() -> None:
    names = ["plain.txt", 'quote"and\\slash.csv', "ünïcode/ファイル.png", "tab\tname", "\x7f\x01"]
    files = [(f"p/{name}", ScannedFile(f"/src/{name}", name, 10 + i, 1, 2))
             for i, name in enumerate(names)]
    bulk_out, one_out = io.StringIO(), io.StringIO()
    bulk = Reporter(json_lines=True, out=bulk_out, err=io.StringIO())
    bulk.unchanged_files(files)
    one = Reporter(json_lines=True, out=one_out, err=io.StringIO())
    for key, item in files:
        one.scanned(item.size)
        one.outcome(FileOutcome(item.relative, key, "unchanged", "unchanged", item.size))
    assert bulk_out.getvalue() == one_out.getvalue()
    assert [json.loads(line)["path"] for line in bulk_out.getvalue().splitlines()] == names
    assert bulk.summary()["skipped"] == one.summary()["skipped"] == len(names)
    assert (bulk.scanned_files, bulk.scanned_bytes, bulk.done_bytes) == (
        one.scanned_files, one.scanned_bytes, one.done_bytes)


def test_unchanged_files_without_json_print_nothing_and_count() -> None:
    out = io.StringIO()
    reporter = Reporter(out=out, err=io.StringIO())
    reporter.unchanged_files([("k", ScannedFile("/src/a", "a", 5, 1, 2))])
    assert out.getvalue() == "" and reporter.unchanged == 1 and reporter.scanned_bytes == 5
