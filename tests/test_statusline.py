"""watch's status line: what reaches the terminal, whatever the file names hold."""

from __future__ import annotations

import io

from asyncsync.service.daemon import Snapshot
from asyncsync.service.statusline import StatusLine, describe

# A name that, written raw, would end the status line, print a line reading as one of our
# diagnostics, and turn the terminal red.
FORGED = "a\nasyncsync: error: forged\x1b[31m\r.txt"


def snapshot(*, store_up: bool | None = True, store_problem: str = "") -> Snapshot:
    return Snapshot(runs={}, in_flight=0, store_up=store_up, store_problem=store_problem,
                    manifest_open=True)


def test_a_forged_name_in_the_last_upload_stays_on_one_escaped_line() -> None:
    line = describe(snapshot(), (f"train/{FORGED}", 100.0), 0, now=112.0)
    assert not {"\n", "\r", "\x1b"} & set(line), repr(line)
    assert line == ("watching: 0 queued, 0 in flight, last upload "
                    "train/a\\nasyncsync: error: forged\\x1b[31m\\r.txt 12s ago")


def test_the_store_problem_is_escaped_too() -> None:
    line = describe(snapshot(store_up=False, store_problem=f"bucket {FORGED} refused"),
                    None, 0)
    assert not {"\n", "\r", "\x1b"} & set(line), repr(line)
    assert "store unreachable: bucket a\\nasyncsync: error: forged\\x1b[31m" in line


def test_the_terminal_gets_only_the_redraw_controls() -> None:
    """What is written: one carriage return before the line and one erase after it, and
    nothing of the name's own controls, even for text that did not come from describe."""
    stream = io.StringIO()  # no terminal size: the usual 80 columns
    status = StatusLine(stream)
    status.show(f"watching: last upload {FORGED}")
    written = stream.getvalue()
    assert written.startswith("\r") and written.endswith("\x1b[K")
    body = written[1:-len("\x1b[K")]
    assert not {"\n", "\r", "\x1b"} & set(body), repr(written)
    assert body == "watching: last upload a\\nasyncsync: error: forged\\x1b[31m\\r.txt"
