#!/usr/bin/env python3
"""Upload a directory to s3://BUCKET/PREFIX with obstore (Python bindings to Rust's
`object_store`): run.py's obstore peer.

    .venv/peers/bin/python benchmarks/peers/obstore_upload.py SRC s3://BUCKET/PREFIX --workers 32

Keys are PREFIX/relative/path, as every tool of the benchmark writes them. Settings: at most
--workers requests in flight over all files (a file that goes multipart holds one slot per
part it may send at once), 8 MiB parts and 8 parts in flight per large file,
`unsigned_payload=True` (no SHA-256 of the body in the signature) and no checksum of the
body (obstore's default: no `checksum_algorithm`). The store's endpoint, credentials and
region come from the environment run.py gives every AWS-SDK tool (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION); plain HTTP is allowed when
the endpoint is http://. obstore has no sync: a cold upload only.

Prints one JSON summary line; exits 1 on the first failure (after the uploads in flight end).
Exits with os._exit, past interpreter finalization: see the end of this file for why.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from _tree import (
    PART_SIZE,
    RequestBudget,
    Upload,
    fail,
    parse_args,
    parts_in_flight,
    summary,
    walk,
)

PARTS_IN_FLIGHT = 8  # per multipart file (obstore's max_concurrency)


def make_store(bucket: str) -> Any:
    from obstore.store import S3Store

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    return S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        virtual_hosted_style_request=False,
        unsigned_payload=True,
        client_options={"allow_http": endpoint.startswith("http://")},
    )


async def upload_all(store: Any, files: list[Upload], workers: int) -> tuple[int, int]:
    import obstore

    budget = RequestBudget(workers)
    failures: list[Exception] = []
    done = [0, 0]
    tasks: set[asyncio.Task[None]] = set()

    async def one(item: Upload, slots: int) -> None:
        try:
            await obstore.put_async(store, item.key, Path(item.path), chunk_size=PART_SIZE,
                                    max_concurrency=PARTS_IN_FLIGHT)
            done[0] += 1
            done[1] += item.size
        except Exception as exc:  # reported here; the exit code says it too
            failures.append(exc)
            print(f"obstore: {item.key}: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            await budget.release(slots)

    for item in files:
        if failures:
            break
        slots = parts_in_flight(item.size, PART_SIZE, PARTS_IN_FLIGHT)
        await budget.acquire(slots)
        task = asyncio.create_task(one(item, slots))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    if failures:
        raise failures[0]
    return done[0], done[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "Upload a directory with obstore (run.py's obstore peer).")
    files = list(walk(args.src, args.prefix))
    try:
        store = make_store(args.bucket)
        count, total = asyncio.run(upload_all(store, files, args.workers))
    except Exception as exc:
        return fail("obstore", "upload failed", exc)
    if count != len(files):
        print(f"obstore: {count} of {len(files)} files uploaded", file=sys.stderr)
        return 1
    summary(count, total)
    return 0


if __name__ == "__main__":
    code = main()
    # No interpreter finalization: about 1 exit in 6 here aborted (SIGABRT, after the summary
    # was printed) when a tokio thread, still inside pyo3-async-runtimes' set_result (the
    # loop's wake-up write of call_soon_threadsafe), took the GIL back after finalization had
    # begun; CPython 3.11 then pthread_exit()s that thread, and unwinding through Rust frames
    # aborts. Every upload has completed by then (and run.py checks the bucket); _exit skips
    # the race, and the few milliseconds of finalization with it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
