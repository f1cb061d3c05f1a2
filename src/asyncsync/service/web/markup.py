"""HTML built so that nothing from the bucket can become markup.

`Html` marks text that is markup already (written here, or built by `render`); every other
value given to `render` or `join` is escaped, after `names.printable` has made control and
bidi characters visible. A run named ``<img src=x onerror=alert(1)>`` is shown as those
characters, never parsed. `json_script` embeds data for the page's script the same way: no
``<``, ``>`` or ``&`` survives, so the data cannot close its ``<script>`` element.
"""

from __future__ import annotations

import functools
import html
import json
import re
import string
from collections.abc import Iterable
from typing import Any

from ...names import printable


class Html(str):
    """Text that is already HTML (a literal of this package, or `render`'s result)."""

    __slots__ = ()


def escape(value: object) -> Html:
    """``value`` as HTML text: markup as it is, anything else printable and escaped."""
    if isinstance(value, Html):
        return value
    if isinstance(value, int | float):
        return Html(str(value))
    text = "" if value is None else str(value)
    if text.isascii() and text.isprintable() and not _SPECIAL.search(text):
        return Html(text)  # the common case, without the work below (a page of 1,000 rows)
    # Line breaks stay (args.yaml, a record, shown in <pre>); every other control is shown.
    shown = "\n".join(printable(line) for line in text.split("\n"))
    return Html(html.escape(shown, quote=True))


_SPECIAL = re.compile(r"[&<>\"']")


@functools.cache
def _parsed(template: str) -> tuple[tuple[str, str | None, str], ...]:
    return tuple((literal, field, spec or "")
                 for literal, field, spec, _ in string.Formatter().parse(template))


def render(template: str, /, **values: Any) -> Html:
    """``template`` (markup written here) with ``{name}`` fields filled, each escaped unless
    it is `Html`."""
    parts: list[str] = []
    for literal, field, spec in _parsed(template):
        parts.append(literal)
        if field is not None:
            value = values[field]
            parts.append(escape(format(value, spec) if spec else value))
    return Html("".join(parts))


def join(parts: Iterable[object], separator: str = "") -> Html:
    return Html(separator.join(escape(part) for part in parts))


def json_script(element_id: str, data: object) -> Html:
    """``data`` as a ``<script type="application/json">`` element (not run: the page's
    script reads it with JSON.parse)."""
    text = (json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    opening = render('<script type="application/json" id="{id}">', id=element_id)
    return Html(f"{opening}{text}</script>")
