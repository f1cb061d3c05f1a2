"""The run browser over 1,000 runs: what a first load and a reload of the runs page cost.

1,000 runs (a finished run record, a results.csv of 50 epochs and an args.yaml each) are
written to an embedded SeaweedFS; `asyncsync serve` (the real CLI) serves them on loopback.
Measured: the server time (request sent to last byte, on loopback) and bytes of the first
load of ``/`` (one listing and 3,000 GETs), of reloads (the summaries cached, revalidated
by ETag from a listing made in the background, no GET), of a reload after the listing went
stale (the listing made first), and the time to interactive of the page in headless Chromium
(Playwright, Debian's chromium). Target: a reload under 200 ms. Results go to
benchmarks/serve-results.json and benchmarks/SERVE.md.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asyncsync.embedded_s3 import SeaweedFS
from asyncsync.service.web.catalog import STALE_FOR

HERE = Path(__file__).resolve().parent
ASYNCSYNC = str(Path(sys.executable).parent / "asyncsync")
RUNS = int(os.environ.get("SERVE_BENCH_RUNS", "1000"))
EPOCHS = 50
RELOADS = 10
CHROMIUM = "/usr/bin/chromium"


def results_csv(seed: int) -> str:
    lines = ["epoch,time,train/box_loss,metrics/precision(B),metrics/recall(B),"
             "metrics/mAP50(B),metrics/mAP50-95(B),lr/pg0"]
    for epoch in range(1, EPOCHS + 1):
        m = (1 - 1 / (epoch + 1)) * (0.5 + (seed % 17) / 40)
        lines.append(f"{epoch},{epoch * 30},{1.5 / epoch:.4f},{m:.4f},{m * 0.9:.4f},"
                     f"{m * 1.1:.4f},{m * 0.7:.4f},{0.01 / epoch:.5f}")
    return "\n".join(lines) + "\n"


def fill(server: SeaweedFS, bucket: str) -> None:
    client = server.client()
    client.create_bucket(Bucket=bucket)

    def one(index: int) -> None:
        run = f"team/{index // 100:02d}/train{index:04d}"
        record = {"status": "finished", "host": f"gpu-{index % 16}", "run": "train",
                  "started": "2026-01-01T10:00:00Z", "ended": "2026-01-01T10:25:00Z",
                  "epochs_planned": EPOCHS, "exit_code": 0}
        client.put_object(Bucket=bucket, Key=f"{run}/_asyncsync/run.json",
                          Body=json.dumps(record).encode())
        client.put_object(Bucket=bucket, Key=f"{run}/results.csv",
                          Body=results_csv(index).encode())
        client.put_object(Bucket=bucket, Key=f"{run}/args.yaml",
                          Body=f"task: detect\nepochs: {EPOCHS}\n".encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(RUNS)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed_get(port: int, path: str) -> tuple[float, int]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request("GET", path)
    answer = connection.getresponse()
    body = answer.read()
    elapsed = time.perf_counter() - started
    connection.close()
    assert answer.status == 200, answer.status
    return elapsed, len(body)


def time_to_interactive(port: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        samples = []
        for _ in range(3):
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            timing = page.evaluate("""() => { const n = performance.getEntriesByType(
                'navigation')[0]; return {interactive: n.domInteractive, ttfb: n.responseStart,
                load: n.loadEventEnd}; }""")
            rows = page.locator("#runs tbody tr").count()
            assert rows == RUNS, rows
            samples.append(timing)
        browser.close()
    return {key: statistics.median(s[key] for s in samples) / 1000 for key in samples[0]}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, SeaweedFS(data_dir=Path(tmp) / "weed") as server:
        bucket = "serve-bench"
        began = time.perf_counter()
        fill(server, bucket)
        filled = time.perf_counter() - began
        port = free_port()
        load_before = load_average()
        serving = subprocess.Popen([ASYNCSYNC, "serve", f"s3://{bucket}/team", "--addr",
                                    f"127.0.0.1:{port}", "--run-depth", "2"],
                                   env=server.env(), stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    timed_get(port, "/healthz")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            first, first_bytes = timed_get(port, "/")
            reloads = [timed_get(port, "/") for _ in range(RELOADS)]
            api = [timed_get(port, "/api/runs") for _ in range(3)]
            # Past the catalog's STALE_FOR the listing is made again before the page.
            time.sleep(STALE_FOR + 1)
            revalidated, _ = timed_get(port, "/")
            browser = time_to_interactive(port)
        finally:
            serving.send_signal(signal.SIGTERM)
            serving.wait(timeout=30)
        results = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "load_average_before": load_before, "load_average_after": load_average(),
            "runs": RUNS, "objects": RUNS * 3, "fill_seconds": round(filled, 1),
            "first_load_s": round(first, 4), "first_load_bytes": first_bytes,
            "reload_median_s": round(statistics.median(t for t, _ in reloads), 4),
            "reload_max_s": round(max(t for t, _ in reloads), 4),
            "reload_bytes": reloads[0][1],
            "revalidating_reload_s": round(revalidated, 4),
            "api_runs_median_s": round(statistics.median(t for t, _ in api), 4),
            "api_runs_bytes": api[0][1],
            "browser_ttfb_s": round(browser["ttfb"], 4),
            "browser_interactive_s": round(browser["interactive"], 4),
            "browser_load_s": round(browser["load"], 4),
        }
    (HERE / "serve-results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "SERVE.md").write_text(render(results))
    print(json.dumps(results, indent=2))


def render(r: dict[str, object]) -> str:
    target = "met" if float(str(r["reload_median_s"])) < 0.2 else "NOT met"
    table = "\n".join([
        "| what | server time | bytes |", "|---|---|---|",
        f"| first load of `/` (one listing, 3 GETs per run) | {r['first_load_s']} s"
        f" | {r['first_load_bytes']} |",
        f"| reload of `/` (median of {RELOADS}; the cached summaries, revalidated by a listing"
        f" in the background, no GET) | {r['reload_median_s']} s (max {r['reload_max_s']} s)"
        f" | {r['reload_bytes']} |",
        f"| reload after {STALE_FOR:g} s idle (the listing made first, no GET) | "
        f"{r['revalidating_reload_s']} s | {r['reload_bytes']} |",
        f"| `/api/runs` (median of 3) | {r['api_runs_median_s']} s | {r['api_runs_bytes']} |",
    ])
    return f"""# The run browser over {r['runs']} runs (`make bench-serve`)

{r['date']}, {r['machine']}; load average {r['load_average_before']} before,
{r['load_average_after']} after (the machine is shared with other work: the numbers are
upper bounds). One embedded SeaweedFS on loopback holding {r['runs']} finished runs
({r['objects']} objects: a run record, a {EPOCHS}-epoch results.csv and an args.yaml each),
served by `asyncsync serve` (the real CLI) on loopback. Server time: request sent to last
byte read, measured by the client on the same machine.

{table}

Chromium (headless, Debian's, through Playwright), median of 3 loads of `/` with every row
rendered: first byte {r['browser_ttfb_s']} s, DOM interactive {r['browser_interactive_s']} s,
load event {r['browser_load_s']} s.

Target, a reload under 200 ms server time: **{target}**.
"""


if __name__ == "__main__":
    main()
