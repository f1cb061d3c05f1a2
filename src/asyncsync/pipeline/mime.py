"""The Content-Type an object gets, from its file's name.

S3 stores what the client says (and `binary/octet-stream` when it says nothing), and web
consoles and browsers go by it: a PNG plot stored without it downloads instead of showing.
The table is Python's built-in one (`mimetypes.MimeTypes` without the machine's
/etc/mime.types, so every host names a file alike, as the aws cli's guess does on most),
with the run files' own types made sure: checkpoints and arrays are opaque bytes, YAML and
logs are text.
"""

from __future__ import annotations

import functools
import posixpath
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mimetypes

DEFAULT_TYPE = "application/octet-stream"
# What a training run writes that the built-in table does not know, or names differently.
_RUN_TYPES = {
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".log": "text/plain",
    ".jsonl": "application/jsonl",
    ".md": "text/markdown",
    ".pt": DEFAULT_TYPE,
    ".pth": DEFAULT_TYPE,
    ".ckpt": DEFAULT_TYPE,
    ".onnx": DEFAULT_TYPE,
    ".safetensors": DEFAULT_TYPE,
    ".npy": DEFAULT_TYPE,
    ".npz": DEFAULT_TYPE,
    ".engine": DEFAULT_TYPE,
    ".tflite": DEFAULT_TYPE,
}
# type/subtype with optional parameters: what a Content-Type header may hold.
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
    r"(\s*;\s*[A-Za-z0-9!#$&^_.+-]+=(\"[^\"\r\n]*\"|[A-Za-z0-9!#$&^_.+-]+))*"
)


@functools.cache
def _table() -> mimetypes.MimeTypes:
    # Built on the first upload, not at import: building it costs some 5 ms, which a no-op
    # re-sync (nothing to upload) would pay on every run.
    import mimetypes

    return mimetypes.MimeTypes(filenames=())


def guess_content_type(relative: str) -> str:
    """The media type of a file named ``relative`` (its name alone: the body is not read)."""
    extension = posixpath.splitext(relative)[1].lower()
    if extension in _RUN_TYPES:
        return _RUN_TYPES[extension]
    guessed, encoding = _table().guess_type("x" + extension, strict=False)
    # A name like events.tar.gz is gzip data as stored: the encoding is not ours to declare.
    if guessed is None or encoding is not None:
        return DEFAULT_TYPE
    return guessed


def valid_media_type(text: str) -> bool:
    return _MEDIA_TYPE.fullmatch(text.strip()) is not None
