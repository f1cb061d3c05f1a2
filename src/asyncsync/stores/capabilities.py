"""What one store (endpoint and bucket) was seen to do, remembered between runs.

S3-compatible stores differ in what they check and what they answer: AWS verifies a
Content-MD5 and echoes a part's CRC32; moto stores whatever arrives and echoes nothing;
s3rver has no ListParts. asyncsync learns each from the store's own answers as it goes (the
first upload that asks for CRC32 part checksums, the first resume that lists parts) and the
pipeline keeps what it learned in the manifest, so the next run decides at once instead of
paying for the discovery again (a part sent twice, an empty upload aborted). `asyncsync
doctor` probes the rest on purpose.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping


class Capability(enum.StrEnum):
    """One behaviour of a store; the value is its name in the manifest and in `doctor`."""

    # Parts sent with a CRC32 are checked and the checksum echoed in the answer.
    CRC32_ECHO = "crc32-echo"
    # ListParts works (a killed multipart upload can be resumed, not only restarted).
    LIST_PARTS = "list-parts"
    # AbortMultipartUpload works (a failed upload leaves no parts behind to pay for).
    ABORT_MULTIPART = "abort-multipart"
    # The ETag of a PUT and of a part is the MD5 of what the store kept: the client can
    # check it, whether or not the store checked the Content-MD5 it was sent.
    ETAG_IS_MD5 = "etag-is-md5"
    # A body whose Content-MD5 is wrong is refused (BadDigest) - only `doctor` probes it.
    VERIFIES_MD5 = "verifies-md5"
    # PUT with If-None-Match: * refuses to overwrite (412) - only `doctor` probes it.
    CONDITIONAL_WRITES = "conditional-writes"


Learned = Callable[[Capability, bool], None]


class Capabilities:
    """Known behaviours of one store: True, False, or None while nothing has shown it.

    ``on_learn`` is called with every change (the pipeline writes it to the manifest). It
    runs on the event loop's thread, where the store's answers are read.
    """

    def __init__(self, known: Mapping[str, bool] | None = None,
                 on_learn: Learned | None = None) -> None:
        self._values: dict[Capability, bool] = {}
        for name, value in (known or {}).items():
            try:
                self._values[Capability(name)] = bool(value)
            except ValueError:
                continue  # written by a newer asyncsync: not ours to interpret
        self._on_learn = on_learn

    def __getitem__(self, capability: Capability) -> bool | None:
        return self._values.get(capability)

    def learn(self, capability: Capability, value: bool) -> bool:
        """Record what the store just showed; True if that is news."""
        if self._values.get(capability) is value:
            return False
        self._values[capability] = value
        if self._on_learn is not None:
            self._on_learn(capability, value)
        return True

    def as_dict(self) -> dict[str, bool]:
        return {capability.value: value for capability, value in self._values.items()}
