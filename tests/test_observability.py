"""A real Prometheus scrapes a real `asyncsync watch` syncing a training that is still writing:
every query of the Grafana dashboard and of the alert rules is evaluated by that Prometheus
and must answer, the values must be the training's, and the exposition must lint clean.

``ASYNCSYNC_DASHBOARD_PNG=docs/dashboard.png`` also renders the dashboard's main panels from
the same queries (matplotlib), the picture README shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import ASYNCSYNC, S3Server, read_object, wait_for
from .deploy.promql import ALERTS, alert_expressions, expressions, substitute
from .prometheus import Prometheus, free_port, needs_prometheus

pytestmark = [pytest.mark.s3, pytest.mark.servers("seaweedfs"), needs_prometheus]

HEADER = ("                  epoch,         train/box_loss,         train/cls_loss,"
          "      metrics/mAP50(B),   metrics/mAP50-95(B),                  time\n")
SECRET = "s3cr3t-token-in-a-flag"


def map50(epoch: int) -> float:
    return 0.8 * epoch / (epoch + 2)


def row(epoch: int) -> str:
    return (f"{epoch:>23},{1.5 / epoch:>23.5f},{1.0 / epoch:>23.5f},{map50(epoch):>23.5f},"
            f"{map50(epoch) / 2:>23.5f},{2.5 * epoch:>23.3f}\n")


def scrape_config(port: int) -> str:
    return f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {ALERTS}
scrape_configs:
  - job_name: asyncsync
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def number(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_prometheus_evaluates_every_dashboard_and_alert_query_of_a_live_daemon(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    run_dir = src / "detect" / "train2"
    run_dir.mkdir(parents=True)
    drawing = bool(os.environ.get("ASYNCSYNC_DASHBOARD_PNG"))
    epochs = 40 if drawing else 8  # the picture wants a longer curve than the test needs
    writer = threading.Thread(target=_train, args=(run_dir, epochs, 0.8), daemon=True)
    metrics_port = free_port()
    log_path = tmp_path / "watch.log"
    env = s3_server.env()
    with open(log_path, "w") as log:
        watch = subprocess.Popen(
            [ASYNCSYNC, "watch", str(src), f"s3://{bucket}/obs", "--state-dir",
             str(tmp_path / "state"), "--interval", "0.5", "--settle", "0.3",
             "--checkpoint-interval", "0", "--run-depth", "2",
             "--metrics-addr", f"127.0.0.1:{metrics_port}", "--exclude", f"*{SECRET}*"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        with Prometheus(scrape_config(metrics_port), tmp_path / "tsdb") as prom:
            started = time.time()
            writer.start()
            # Enough scrapes for every rate() window, and the training well under way.
            wait_for(lambda: prom.query('count_over_time(up{job="asyncsync"}[1m]) >= 8'),
                       60, "eight scrapes")
            wait_for(lambda: prom.query('asyncsync_training_epoch{run="detect/train2"} >= 3'),
                       60, f"the training epochs in Prometheus\n{log_path.read_text()}")

            # Every query of the dashboard answers with data.
            for title, expr in expressions():
                result = prom.query(substitute(expr, rate_interval="15s"))
                assert result, f"dashboard panel {title!r}: no data for {expr}"
            # Every alert expression evaluates (an empty vector: not firing), and the rules
            # Prometheus loaded from alerts.yaml evaluate without error.
            for _alert, expr in alert_expressions():
                prom.query(expr)
            rules = wait_for(lambda: _evaluated_rules(prom), 30, "the rules evaluated")
            assert {r["name"] for r in rules} == {a for a, _ in alert_expressions()}
            for rule in rules:
                assert rule["health"] == "ok", rule
            # Nothing uploads, nothing fails: no alert fires.
            firing = prom.query("ALERTS")
            assert not [a for a in firing if a["metric"]["alertname"] != "AsyncsyncRunNotSynced"]

            writer.join(timeout=120)
            client = s3_server.client()
            expected_csv = (run_dir / "results.csv").read_bytes()
            wait_for(lambda: _object(client, bucket, "obs/detect/train2/results.csv")
                       == expected_csv, 30, "the final results.csv in the bucket")

            # The values are the training's: the epoch count and the last row.
            def final_epoch() -> bool:
                got = prom.query('asyncsync_training_epoch{run="detect/train2"}')
                return bool(got) and number(got[0]) == epochs

            wait_for(final_epoch, 30, "the last epoch scraped")
            last = {s["metric"]["column"]: number(s) for s in
                    prom.query('asyncsync_training_metric{run="detect/train2"}')}
            assert last == pytest.approx({
                "train/box_loss": 1.5 / epochs, "train/cls_loss": 1.0 / epochs,
                "metrics/mAP50(B)": map50(epochs), "metrics/mAP50-95(B)": map50(epochs) / 2,
            }, rel=1e-4)
            duration = prom.query('asyncsync_training_epoch_duration_seconds{run="detect/train2"}')
            assert number(duration[0]) == pytest.approx(2.5)
            assert prom.query('asyncsync_last_successful_sync_timestamp_seconds'
                              '{run="detect/train2"} > 0')
            uploads = prom.query("sum(asyncsync_files_uploaded_total)")
            assert number(uploads[0]) >= 3  # args.yaml, results.csv, last.pt, and again

            exposition = _get(metrics_port, "/metrics")
            lint = subprocess.run(["promtool", "check", "metrics"], input=exposition.encode(),
                                  capture_output=True, timeout=30, check=False)
            assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
            # Nothing secret: not the secret key of the environment, not a flag's value.
            assert env["AWS_SECRET_ACCESS_KEY"] not in exposition
            assert SECRET not in exposition
            assert SECRET not in str(prom.api("series", **{"match[]": '{job="asyncsync"}'}))

            if drawing:
                render_dashboard(prom, started, time.time(),
                                 Path(os.environ["ASYNCSYNC_DASHBOARD_PNG"]))
    finally:
        watch.terminate()
        assert watch.wait(timeout=60) == 0, log_path.read_text()
    assert read_object(s3_server.client(), bucket, "obs/detect/train2/args.yaml")


def _train(run: Path, epochs: int, seconds: float) -> None:
    """A run written the way ultralytics writes it: args.yaml at start, a row of results.csv
    per epoch, weights/last.pt truncated and rewritten in place every epoch."""
    (run / "weights").mkdir(parents=True)
    (run / "args.yaml").write_text(f"epochs: {epochs}\nimgsz: 64\n")
    (run / "results.csv").write_text(HEADER)
    for epoch in range(1, epochs + 1):
        with open(run / "weights" / "last.pt", "r+b" if epoch > 1 else "wb") as f:
            f.truncate(0)
            f.write(os.urandom(200_000 + epoch))
        with open(run / "results.csv", "a") as f:
            f.write(row(epoch))
        time.sleep(seconds)


def _evaluated_rules(prom: Prometheus) -> list[dict[str, Any]]:
    groups = prom.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    if rules and all(rule.get("lastEvaluation", "").startswith("0001") is False
                     for rule in rules):
        return rules
    return []


def _object(client: Any, bucket: str, key: str) -> bytes | None:
    try:
        return read_object(client, bucket, key)
    except client.exceptions.NoSuchKey:
        return None


def _get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


# -- the picture ------------------------------------------------------------------------------

DURABLE = "sum by (le) (rate(asyncsync_time_to_durable_seconds_bucket[15s]))"
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Upload throughput (MB/s)",
     (("", "sum(rate(asyncsync_bytes_uploaded_total[15s])) / 1e6"),)),
    ("Files uploaded per second, by outcome",
     (("", "sum by (outcome) (rate(asyncsync_files_uploaded_total[15s]))"),)),
    ("Queue depth and uploads in flight",
     (("queued", "asyncsync_queue_depth"), ("in flight", "asyncsync_uploads_in_flight"))),
    ("Time to durable (s)",
     (("p50", f"histogram_quantile(0.5, {DURABLE})"),
      ("p99", f"histogram_quantile(0.99, {DURABLE})"))),
    ("Training loss per run", (("", 'asyncsync_training_metric{metric=~".*loss.*"}'),)),
    ("Training mAP per run", (("", 'asyncsync_training_metric{metric=~"metrics_mAP.*"}'),)),
)


def render_dashboard(prom: Prometheus, start: float, end: float, path: Path) -> None:
    """The dashboard's main panels, drawn from this Prometheus's answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 7), constrained_layout=True)
    for ax, (title, queries) in zip(axes.flat, PANELS, strict=True):
        for name, expr in queries:
            for result in prom.query_range(expr, start, end, 1.0):
                labels = [v for k, v in result["metric"].items() if k in ("outcome", "column")]
                times = [float(t) - start for t, _ in result["values"]]
                values = [float(v) for _, v in result["values"]]
                ax.plot(times, values, label=", ".join([name, *labels]).strip(", ") or None)
        ax.set_title(title)
        ax.set_xlabel("seconds")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    figure.suptitle("asyncsync: a watch daemon syncing a training, as Prometheus saw it")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


# -- push's textfile, run's endpoint -------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _lint(text: str) -> None:
    lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30, check=False)
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()


def test_push_textfile_counts_the_tree_and_its_training(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    run_dir = src / "detect" / "train2"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "results.csv").write_text(HEADER + "".join(row(e) for e in range(1, 6)))
    (run_dir / "weights" / "best.pt").write_bytes(os.urandom(300_000))
    (src / "notes.txt").write_text("above the runs\n")
    files = [p for p in src.rglob("*") if p.is_file()]
    textfile = tmp_path / "textfile" / "asyncsync.prom"
    textfile.parent.mkdir()
    env = s3_server.env(ASYNCSYNC_SECRET_SETTING=SECRET)
    done = subprocess.run(
        [ASYNCSYNC, "push", str(src), f"s3://{bucket}/tf", "--state-dir", str(tmp_path / "s"),
         "--run-depth", "2", "--metrics-textfile", str(textfile), "--exclude", f"*{SECRET}*"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = textfile.read_text()
    _lint(text)
    values = _samples(text)
    assert values[("asyncsync_files_uploaded_total", frozenset({("outcome", "new")}))] == len(files)
    assert values[("asyncsync_bytes_uploaded_total", frozenset({("outcome", "new")}))] == sum(
        p.stat().st_size for p in files)
    run = frozenset({("run", "detect/train2")})
    assert values[("asyncsync_training_epoch", run)] == 5
    assert values[("asyncsync_training_metric", run | {("metric", "metrics_mAP50_B"),
                                                        ("column", "metrics/mAP50(B)")})] == \
        pytest.approx(map50(5), rel=1e-4)
    assert values[("asyncsync_exit_code", frozenset())] == 0
    assert env["AWS_SECRET_ACCESS_KEY"] not in text and SECRET not in text
    assert [p.name for p in textfile.parent.iterdir()] == ["asyncsync.prom"]

    # A directory that does not exist is found out before anything is uploaded: exit 2.
    bad = subprocess.run(
        [ASYNCSYNC, "push", str(src), f"s3://{bucket}/tf2", "--state-dir", str(tmp_path / "s"),
         "--metrics-textfile", str(tmp_path / "nowhere" / "x.prom")],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"asyncsync: error: --metrics-textfile {tmp_path / 'nowhere' / 'x.prom'}: the directory "
        "it would be written in does not exist"]


def test_run_serves_metrics_with_the_training_status(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "runs"
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys, time\n"
        f"run = os.path.join({str(src)!r}, 'train')\n"
        "os.makedirs(run, exist_ok=True)\n"
        f"open(os.path.join(run, 'results.csv'), 'w').write({HEADER + row(1)!r})\n"
        "time.sleep(6)\n"
    )
    port = free_port()
    import sys

    child = subprocess.Popen(
        [ASYNCSYNC, "run", str(src), f"s3://{bucket}/run", "--state-dir", str(tmp_path / "s"),
         "--interval", "0.5", "--settle", "0.3", "--metrics-addr", f"127.0.0.1:{port}", "--",
         sys.executable, str(script)],
        env=s3_server.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def running() -> str | None:
            try:
                text = _get(port, "/metrics")
            except OSError:
                return None
            key = ("asyncsync_run_status", frozenset({("run", "train"), ("status", "running")}))
            return text if _samples(text).get(key) == 1 else None

        text = wait_for(running, 30, "the run's status on /metrics")
        _lint(text)
        assert _samples(text)[("asyncsync_training_epoch", frozenset({("run", "train")}))] == 1
    finally:
        out, _ = child.communicate(timeout=60)
    assert child.returncode == 0, out


@pytest.mark.skipif(shutil.which("prometheus-pushgateway") is None,
                    reason="needs prometheus-pushgateway (make test installs Debian's)")
def test_push_sends_its_metrics_to_a_real_pushgateway(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    import socket

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    port = free_port()
    with open(tmp_path / "pushgateway.log", "wb") as log:
        gateway = subprocess.Popen(
            ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}",
             f"--persistence.file={tmp_path / 'pushgateway.data'}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _reachable(port), 30, "the pushgateway")
        done = subprocess.run(
            [ASYNCSYNC, "push", str(src), f"s3://{bucket}/pg", "--state-dir",
             str(tmp_path / "s"), "--pushgateway", f"http://127.0.0.1:{port}"],
            env=s3_server.env(), capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        grouping = {("job", "asyncsync-push"), ("instance", socket.gethostname())}
        values = _samples(_get(port, "/metrics"))
        assert values[("asyncsync_files_uploaded_total",
                       frozenset(grouping | {("outcome", "new")}))] == 1
        assert values[("asyncsync_exit_code", frozenset(grouping))] == 0
    finally:
        gateway.terminate()
        gateway.wait(timeout=20)

    # A gateway that is not there: one error line; what was uploaded stays uploaded (exit 0).
    (src / "b.txt").write_text("more\n")
    done = subprocess.run(
        [ASYNCSYNC, "push", str(src), f"s3://{bucket}/pg", "--state-dir", str(tmp_path / "s"),
         "--pushgateway", f"http://127.0.0.1:{port}"],
        env=s3_server.env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"--pushgateway http://127.0.0.1:{port}: not pushed" in errors[0]


def _reachable(port: int) -> bool:
    try:
        _get(port, "/-/ready")
    except OSError:
        return False
    return True
