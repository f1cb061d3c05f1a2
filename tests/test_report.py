"""Unit tests for asyncsync.report: per-file records and counters."""

from __future__ import annotations

import io
import json

from asyncsync.report import Reporter
from asyncsync.transfer import FileOutcome


def test_unchanged_files_in_bulk_print_the_records_outcome_prints() -> None:
    """One directory's unchanged files at once: the same lines, in name order, and the
    same counters as one `outcome` per file."""
    names = ["plain.txt", 'quote"and\\slash.csv', "ünïcode-ファイル.png", "tab\tname", "\x7f\x01"]
    files = [(name, 10 + i, 1, 2) for i, name in enumerate(names)]
    bulk_out, one_out = io.StringIO(), io.StringIO()
    bulk = Reporter(json_lines=True, out=bulk_out, err=io.StringIO())
    bulk.unchanged_files("dir/", "p/dir/", files[::-1])  # in the order the disk lists them
    one = Reporter(json_lines=True, out=one_out, err=io.StringIO())
    for name, size, _, _ in sorted(files):
        one.scanned(size)
        one.outcome(FileOutcome(f"dir/{name}", f"p/dir/{name}", "unchanged", "unchanged", size))
    assert bulk_out.getvalue() == one_out.getvalue()
    lines = [json.loads(line) for line in bulk_out.getvalue().splitlines()]
    assert [line["path"] for line in lines] == [f"dir/{name}" for name in sorted(names)]
    assert lines[0]["key"] == f"p/dir/{sorted(names)[0]}"
    assert bulk.summary()["skipped"] == one.summary()["skipped"] == len(names)
    assert (bulk.scanned_files, bulk.scanned_bytes, bulk.done_bytes) == (
        one.scanned_files, one.scanned_bytes, one.done_bytes)


def test_unchanged_files_without_json_print_nothing_and_count() -> None:
    out = io.StringIO()
    reporter = Reporter(out=out, err=io.StringIO())
    reporter.unchanged_files("", "k/", [("a", 5, 1, 2)])
    assert out.getvalue() == "" and reporter.unchanged == 1 and reporter.scanned_bytes == 5
