"""File names and keys are data: `printable` makes one safe to put in a log line or on a
terminal.

A file name may hold any byte but '/' and NUL. Written raw, a newline in a name starts a
line of its own (``a\\nasyncsync: error: forged`` would read as a diagnostic of ours), a
carriage return overwrites what came before, an ESC sequence recolours or rewrites the
terminal, and a bidi override (U+202E) makes ``gpj.exe`` read as ``exe.jpg``. `printable`
escapes exactly those characters; everything else, unicode included, stays as it is.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# What must never reach a log line or a terminal raw: C0 controls, DEL, C1 controls (0x9b
# is a one-byte CSI on some terminals), the unicode line and paragraph separators (line
# breaks to some log viewers), the bidi embeddings, overrides, isolates and marks (they
# reorder what follows them), and lone surrogates (undecodable bytes under surrogateescape;
# they cannot be encoded on the way out). Other format characters (the zero-width joiner in
# emoji, the soft hyphen) and every unicode space stay: they do not rewrite the line.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control, line-breaking and bidi characters escaped Python-style
    (``\\n``, ``\\x1b``, ``\\u202e``), for logs and the terminal; other text unchanged.

    Backslashes are not doubled, so escaping twice changes nothing (a formatter may escape
    a message whose names were escaped already); the cost is that a name holding a literal
    backslash-n reads like one holding a newline, which is harmless in a log line. JSON output
    does not need this: json.dumps escapes control characters itself, exactly.
    """
    # The common case (every character printable) costs one pass in C.
    if text.isprintable():
        return text
    return _UNSAFE.sub(_escape, text)


class PrintableFormatter(logging.Formatter):
    """A log formatter that escapes every message with `printable`, whatever logged it:
    file names, keys and messages quoting them are data, and a newline in one must not start
    a line that reads as a diagnostic of ours. One place catches every call site."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        # A traceback keeps its lines; controls within a line are escaped.
        return "\n".join(printable(line) for line in super().formatException(ei).split("\n"))
