#!/usr/bin/env python3
"""Upload a directory to s3://BUCKET/PREFIX with the AWS Common Runtime's S3 client (awscrt),
through s3transfer's CRTTransferManager, the transfer manager boto3 and aws cli v2 use with
`preferred_transfer_client = crt`: run.py's CRT peer.

    .venv/peers/bin/python benchmarks/peers/crt_upload.py SRC s3://BUCKET/PREFIX --workers 32

Keys are PREFIX/relative/path, as every tool of the benchmark writes them. Settings: 8 MiB
parts (and 8 MiB multipart threshold), at most --workers connections over all requests
(`max_request_concurrency`, the CRT's `max_active_connections_override`), the CRT's own
event-loop threads (one per core) and throughput target; each body carries the CRT's default
CRC32 as a trailing checksum (s3transfer's default for uploads, which the server verifies).

The endpoint, credentials and region come from the environment run.py gives every AWS-SDK
tool (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...): the request serializer is a botocore client
with that endpoint and path-style addressing, whose Host header (with its port) the CRT
connects to; TLS is off for an http:// endpoint (create_s3_crt_client's use_ssl), as aws cli
v2 sets it. The CRT has no sync: a cold upload only.

Prints one JSON summary line; exits 1 if any upload failed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from _tree import PART_SIZE, fail, parse_args, summary, walk


def make_manager(workers: int) -> Any:
    import botocore.session
    from botocore.config import Config
    from s3transfer.crt import (
        BotocoreCRTCredentialsWrapper,
        BotocoreCRTRequestSerializer,
        CRTTransferManager,
        create_s3_crt_client,
    )
    from s3transfer.manager import TransferConfig

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise RuntimeError("no credentials in the environment")
    provider = BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider()
    client = create_s3_crt_client(
        region=region,
        crt_credentials_provider=provider,
        part_size=PART_SIZE,
        use_ssl=not endpoint.startswith("http://"),
    )
    serializer = BotocoreCRTRequestSerializer(session, {
        "region_name": region,
        "endpoint_url": endpoint,
        "config": Config(s3={"addressing_style": "path"}),
    })
    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                            max_request_concurrency=workers)
    return CRTTransferManager(client, serializer, config=config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "Upload a directory with the AWS CRT (run.py's CRT peer).")
    files = list(walk(args.src, args.prefix))
    count = total = 0
    errors = 0
    try:
        manager = make_manager(args.workers)
    except Exception as exc:
        return fail("crt", "set-up failed", exc)
    try:
        # The manager keeps at most 128 transfers submitted (upload() blocks beyond that);
        # the CRT client schedules their requests over its connections.
        futures = [(item, manager.upload(item.path, args.bucket, item.key)) for item in files]
        for item, future in futures:
            try:
                future.result()
            except Exception as exc:  # each failure said, all of them counted
                errors += 1
                print(f"crt: {item.key}: {type(exc).__name__}: {exc}", file=sys.stderr)
            else:
                count += 1
                total += item.size
    finally:
        # shutdown() swallows the transfers' errors: they were collected above.
        manager.shutdown(cancel=errors > 0)
    if errors or count != len(files):
        print(f"crt: {count} of {len(files)} files uploaded, {errors} failed", file=sys.stderr)
        return 1
    summary(count, total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
