"""Mapping local relative paths to object keys, and the include/exclude filter.

Pure functions: no I/O, so they are unit-tested in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

# S3 keys are at most 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024


class InvalidKey(ValueError):
    """A relative path that cannot become an object key (the reason is the message)."""


def object_key(prefix: str, relative_posix_path: str) -> str:
    """PREFIX + '/' + the relative path, never with empty, '.' or '..' segments.

    ``prefix`` comes already normalised from `config.parse_destination`. The relative path
    comes from the scanner, which never yields '.' or '..', but keys are what lands in someone
    else's bucket, so they are checked here once more.
    """
    # Substring tests instead of a split: this runs once per file of every scan.
    wrapped = f"/{relative_posix_path}/"
    if "//" in wrapped or "/./" in wrapped or "/../" in wrapped:
        raise InvalidKey(f"path {relative_posix_path!r} has an empty, '.' or '..' segment")
    key = f"{prefix}/{relative_posix_path}" if prefix else relative_posix_path
    if key.isascii():
        size = len(key)
    else:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidKey("file name is not valid UTF-8") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidKey(f"key is longer than {MAX_KEY_BYTES} bytes")
    return key


@dataclass(frozen=True)
class PathFilter:
    """--include / --exclude globs; exclude wins; no include means include everything.

    A pattern without '/' matches the file name in any directory (``*.jpg``); a pattern with
    '/' matches the whole relative path, and ``*`` in it crosses directories
    (``weights/*.pt``, ``*/weights/*``).
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def accepts(self, relative_posix_path: str) -> bool:
        name = relative_posix_path.rsplit("/", 1)[-1]
        if any(_matches(p, relative_posix_path, name) for p in self.exclude):
            return False
        if not self.include:
            return True
        return any(_matches(p, relative_posix_path, name) for p in self.include)


def _matches(pattern: str, path: str, name: str) -> bool:
    if "/" in pattern:
        return fnmatchcase(path, pattern.lstrip("/"))
    return fnmatchcase(name, pattern)
