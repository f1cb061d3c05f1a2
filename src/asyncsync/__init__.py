"""asyncsync: keep ML training run directories mirrored in S3-compatible object storage."""

__version__ = "0.1.0"
