"""Unit tests for asyncsync.report: per-file records and counters."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asyncsync.cli import configure_logging
from asyncsync.names import printable
from asyncsync.pipeline.events import FileOutcome, Status
from asyncsync.pipeline.scan import ScanIssue
from asyncsync.report import Reporter

from .conftest import S3Server, read_object, run_cli


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
        one.outcome(FileOutcome(f"dir/{name}", f"p/dir/{name}", Status.UNCHANGED, "unchanged",
                                size))
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


# -- names are data: escaped in logs and on the terminal, exact in JSON ---------------------

FORGED = "a\nasyncsync: error: forged"
ESCAPE = "\x1b[31mred\x1b[0m.txt"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("plain/ünïcode ファイル +#%&=.txt", "plain/ünïcode ファイル +#%&=.txt"),
        ("emoji 👩\u200d💻 nbsp\u00a0x", "emoji 👩\u200d💻 nbsp\u00a0x"),
        (FORGED, "a\\nasyncsync: error: forged"),
        ("cr\rtab\tnul\x00", "cr\\rtab\\tnul\\x00"),
        (ESCAPE, "\\x1b[31mred\\x1b[0m.txt"),
        ("del\x7f c1\x85\x9b", "del\\x7f c1\\x85\\x9b"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
        ("gpj.\u202eexe \u2066iso\u2069 \u200f", "gpj.\\u202eexe \\u2066iso\\u2069 \\u200f"),
        ("undecodable \udcff", "undecodable \\udcff"),
    ],
)
def test_printable_escapes_controls_and_keeps_the_rest(name: str, shown: str) -> None:
    assert printable(name) == shown
    assert printable(shown) == shown  # escaping twice changes nothing
    assert shown.isprintable() or "\u00a0" in shown or "\u200d" in shown


@pytest.fixture
def text_log() -> Iterator[Callable[[], str]]:
    """The CLI's text logging at -v; returns what it wrote. Restored afterwards."""
    yield from _cli_logging("text")


@pytest.fixture
def json_log() -> Iterator[Callable[[], str]]:
    yield from _cli_logging("json")


def _cli_logging(log_format: str) -> Iterator[Callable[[], str]]:
    logger = logging.getLogger("asyncsync")
    saved = logger.handlers[:], logger.level, logger.propagate
    configure_logging(1, False, log_format)
    stream = io.StringIO()
    handler = logger.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        yield stream.getvalue
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def outcomes(reporter: Reporter) -> None:
    reporter.outcome(FileOutcome(FORGED, f"p/{FORGED}", Status.UPLOADED, "new", 3, bytes_sent=3))
    reporter.outcome(FileOutcome(ESCAPE, f"p/{ESCAPE}", Status.FAILED, "error", 3,
                                 error=f"{ESCAPE}: cannot read: Permission denied"))
    reporter.issue(ScanIssue(FORGED, "is a FIFO; skipped", failed=False))


def test_a_newline_in_a_name_forges_no_log_line(text_log: Callable[[], str]) -> None:
    outcomes(Reporter(err=io.StringIO()))
    logging.getLogger("asyncsync.elsewhere").warning("%s: gone", FORGED)  # any call site
    err = text_log()
    assert err.splitlines() == [
        "asyncsync: info: uploaded a\\nasyncsync: error: forged -> "
        "p/a\\nasyncsync: error: forged (3 B, new)",
        "asyncsync: error: \\x1b[31mred\\x1b[0m.txt: \\x1b[31mred\\x1b[0m.txt: cannot read: "
        "Permission denied",
        "asyncsync: warning: a\\nasyncsync: error: forged: is a FIFO; skipped",
        "asyncsync: warning: a\\nasyncsync: error: forged: gone",
    ]
    assert "\x1b" not in err


def test_a_traceback_keeps_its_lines_with_controls_escaped(
    text_log: Callable[[], str]
) -> None:
    try:
        raise ValueError(f"bad {ESCAPE}")
    except ValueError:
        logging.getLogger("asyncsync").error("internal error", exc_info=True)
    err = text_log()
    lines = err.splitlines()
    assert lines[0] == "asyncsync: error: internal error"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad \\x1b[31mred\\x1b[0m.txt"
    assert "\x1b" not in err


def test_json_logs_escape_the_message_too(json_log: Callable[[], str]) -> None:
    outcomes(Reporter(err=io.StringIO()))
    logging.getLogger("asyncsync").warning("%s", "x\u2028y\u202ez\x85")
    lines = json_log().split("\n")[:-1]  # split on "\n" only: U+2028 must not be in a line
    entries = [json.loads(line) for line in lines]
    assert [entry["message"] for entry in entries] == [
        "uploaded a\\nasyncsync: error: forged -> p/a\\nasyncsync: error: forged (3 B, new)",
        "\\x1b[31mred\\x1b[0m.txt: \\x1b[31mred\\x1b[0m.txt: cannot read: Permission denied",
        "a\\nasyncsync: error: forged: is a FIFO; skipped",
        "x\\u2028y\\u202ez\\x85",
    ]
    assert all(line.isprintable() for line in lines)


def test_json_output_keeps_names_exact() -> None:
    out = io.StringIO()
    outcomes(Reporter(json_lines=True, out=out, err=io.StringIO()))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [record["path"] for record in records] == [FORGED, ESCAPE, FORGED]
    assert records[0]["key"] == f"p/{FORGED}"
    assert records[1]["error"] == f"{ESCAPE}: cannot read: Permission denied"


@pytest.mark.s3
# moto answers 404 to a key with a newline in it; s3rver cannot list such keys back.
@pytest.mark.servers("seaweedfs")
def test_push_of_hostile_names_escapes_them_on_stderr_and_keeps_them_in_the_bucket(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / FORGED).write_bytes(b"forged\n")
    (src / ESCAPE).write_bytes(b"red\n")
    result = run_cli("push", src, f"s3://{bucket}/names", "--state-dir", tmp_path / "state",
                     "-v", env=s3_server.env())
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if line.startswith("asyncsync: error:")], result.stderr
    assert "\x1b" not in result.stderr
    assert "uploaded a\\nasyncsync: error: forged -> names/a\\nasyncsync: error: forged" in (
        result.stderr)
    assert "uploaded \\x1b[31mred\\x1b[0m.txt -> names/\\x1b[31mred\\x1b[0m.txt" in (
        result.stderr)
    client = s3_server.client()
    assert read_object(client, bucket, f"names/{FORGED}") == b"forged\n"
    assert read_object(client, bucket, f"names/{ESCAPE}") == b"red\n"
    # --json output names the files exactly as they are.
    again = run_cli("push", src, f"s3://{bucket}/names", "--state-dir", tmp_path / "state",
                    "--json", "-vv", env=s3_server.env())
    assert again.returncode == 0, again.stderr
    assert again.files("unchanged") == sorted([FORGED, ESCAPE])
    assert "\x1b" not in again.stderr


MB = 1_000_000


def test_the_progress_line_shows_the_whole_job_and_a_falling_eta() -> None:
    """The report's case: 200 of 201 files done, the last 230 MB of a 340 MB push under
    way. The percent must move and the ETA fall as its parts go up."""
    reporter = Reporter(progress=True, err=io.StringIO())
    for i in range(200):
        reporter.scanned(550_000)
        reporter.sent(550_000)  # the store counts each body it sent
        reporter.outcome(FileOutcome(f"f{i}", f"f{i}", Status.UPLOADED, "new", 550_000,
                                     bytes_sent=550_000))
    reporter.scanned(230 * MB)
    reporter.scan_finished()
    line = reporter.progress_line(0.0, 200)
    assert line.startswith("200/201 files  110.0 MB/340.0 MB  32%"), line
    etas = []
    for second in range(1, 12):
        reporter.sent(20 * MB)  # a part every second: 20 MB/s
        line = reporter.progress_line(float(second), 200)
        etas.append(line.rsplit("ETA ", 1)[1])
    assert "330.0 MB/340.0 MB  97%" in line and "20.0 MB/s" in line, line
    # From 10 s for the 210 MB left down to nothing: a second less per 20 MB sent.
    assert etas[0] == "0:10" and etas[5] == "0:05" and etas[-1] == "0:00", etas


def test_the_progress_line_fits_any_width_and_says_when_the_total_is_unknown() -> None:
    reporter = Reporter(progress=True, err=io.StringIO())
    reporter.scanned(5 * MB)
    line = reporter.progress_line(0.0, 200)
    assert line.startswith("0 of 1+ files"), line  # still scanning: no percent, no ETA
    assert "%" not in line and "ETA" not in line
    reporter.scan_finished()
    for width in (1, 10, 30, 80, 300):
        assert len(reporter.progress_line(1.0, width)) <= width - 1 or width == 1


@pytest.mark.parametrize("columns", [44, 160])
def test_push_draws_its_progress_in_a_terminal_of_any_width(tmp_path: Path, columns: int) -> None:
    """A real push with stderr on a pseudo-terminal: every redraw fits the width (no wrap),
    the line reaches the whole job's percent, and the summary line ends it."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    from .conftest import ASYNCSYNC, read_terminal

    src, dest = tmp_path / "src", tmp_path / "bucket"
    (src / "weights").mkdir(parents=True)
    (src / "weights" / "last.pt").write_bytes(os.urandom(30_000_000))
    (src / "args.yaml").write_text("epochs: 1\n")
    dest.mkdir()
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        [ASYNCSYNC, "push", str(src), f"file://{dest}", "--state-dir", str(tmp_path / "s"),
         "--max-bandwidth", "15MB/s"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal, env=env,
    )
    os.close(terminal)
    chunks: list[bytes] = []
    read_terminal(main, chunks)
    output = b"".join(chunks)
    os.close(main)
    assert process.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    redraws = [part.replace("\x1b[K", "") for line in text.split("\n")
               for part in line.split("\r")]
    drawn = [r for r in redraws if "files" in r]
    assert drawn, text
    assert all(len(r) <= columns - 1 for r in drawn), [r for r in drawn if len(r) >= columns]
    assert any("%" in r for r in drawn), drawn
    if columns > 100:
        assert any("ETA" in r for r in drawn), drawn
    assert "asyncsync: 2 uploaded, 0 unchanged, 0 failed" in text
