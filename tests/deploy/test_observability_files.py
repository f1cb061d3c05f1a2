"""deploy/'s Grafana dashboard, Prometheus alerts and scrape config: generated, consistent with
the metric catalogue, and accepted by promtool (Grafana itself cannot run here)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .promql import (
    ALERTS,
    DASHBOARD,
    ROOT,
    alert_expressions,
    expressions,
    load_generator,
    load_yaml,
    metric_names,
    panels,
    substitute,
)

ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
SCRAPE = ROOT / "deploy" / "prometheus" / "scrape.yaml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The metric catalogue (every name the daemon exports); a name outside it in a panel or an
# alert is a typo, or a metric that was renamed under it.
COUNTERS = {
    "asyncsync_files_uploaded_total", "asyncsync_bytes_uploaded_total",
    "asyncsync_bytes_sent_total", "asyncsync_files_unchanged_total",
    "asyncsync_upload_failures_total", "asyncsync_retries_total",
    "asyncsync_parts_uploaded_total", "asyncsync_parts_resumed_total",
    "asyncsync_torn_reads_total", "asyncsync_history_copies_total",
    "asyncsync_files_deleted_total", "asyncsync_cleanup_failures_total",
    "asyncsync_metrics_dropped_total",
}
GAUGES = {
    "asyncsync_queue_depth", "asyncsync_uploads_in_flight", "asyncsync_bytes_in_flight",
    "asyncsync_budget_used_bytes", "asyncsync_budget_limit_bytes", "asyncsync_manifest_rows",
    "asyncsync_scan_duration_seconds", "asyncsync_last_scan_timestamp_seconds",
    "asyncsync_store_up", "asyncsync_last_store_success_timestamp_seconds",
    "asyncsync_last_successful_sync_timestamp_seconds", "asyncsync_run_files_pending",
    "asyncsync_run_bytes_pending", "asyncsync_run_status", "asyncsync_training_metric",
    "asyncsync_training_epoch", "asyncsync_training_epoch_duration_seconds",
    "asyncsync_build_info", "asyncsync_completion_timestamp_seconds", "asyncsync_exit_code",
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
}
HISTOGRAMS = {
    "asyncsync_upload_duration_seconds", "asyncsync_upload_size_bytes",
    "asyncsync_time_to_durable_seconds",
}
CATALOGUE = COUNTERS | GAUGES | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
} | {"up"}  # Prometheus's own, for job="asyncsync"
RUN_METRICS = {
    "asyncsync_last_successful_sync_timestamp_seconds", "asyncsync_run_files_pending",
    "asyncsync_run_bytes_pending", "asyncsync_run_status", "asyncsync_training_metric",
    "asyncsync_training_epoch", "asyncsync_training_epoch_duration_seconds",
}


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool (from Prometheus) is not on PATH: `make system-deps` installs "
                    "Debian's prometheus package")
    return found


def run_promtool(promtool: str, *args: str | Path, cwd: Path | None = None) -> None:
    done = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def needs_yaml() -> None:
    pytest.importorskip("yaml", reason="PyYAML is not installed (the ultralytics extra brings "
                                       "it): cannot read the rule files")


# -- the dashboard ------------------------------------------------------------------------------

def test_committed_dashboard_is_the_generators_output() -> None:
    assert DASHBOARD.read_text() == load_generator().render(), (
        "deploy/grafana/asyncsync.json is stale: run `python deploy/grafana/dashboard.py`")


def test_generator_lists_the_expressions_of_the_committed_dashboard() -> None:
    assert load_generator().expressions() == expressions()


def test_dashboard_is_importable_with_a_prometheus_datasource(board: dict[str, Any]) -> None:
    assert board["schemaVersion"] >= 36
    inputs = {item["name"]: item for item in board["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert board["uid"] and board["title"]


def test_every_panel_and_target_queries_the_datasource_variable(board: dict[str, Any]) -> None:
    rows = [panel for panel in board["panels"] if panel["type"] == "row"]
    assert any(row["collapsed"] and row["panels"] for row in rows)  # nesting is exercised
    found = panels(board)
    assert len(found) >= 10
    for panel in found:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["type"] == "timeseries", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    ids = [panel["id"] for panel in rows + found]
    assert len(ids) == len(set(ids))


def test_template_variables(board: dict[str, Any]) -> None:
    variables = {item["name"]: item for item in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance, run = variables["instance"], variables["run"]
    assert instance["query"] == "label_values(asyncsync_build_info, instance)"
    assert run["query"] == ('label_values(asyncsync_last_successful_sync_timestamp_seconds'
                            '{instance=~"$instance"}, run)')
    for variable in (instance, run):
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["multi"] and variable["includeAll"]


def test_dashboard_selects_by_the_variables_and_rates_over_rate_interval() -> None:
    for title, expr in expressions():
        windows = re.findall(r"\[([^\]]*)\]", expr)
        assert all(window == "$__rate_interval" for window in windows), (title, expr)
        for selector in re.findall(r"\{([^}]*)\}", expr):
            assert 'instance=~"$instance"' in selector, (title, expr)
        if metric_names(substitute(expr)) & RUN_METRICS:
            assert 'run=~"$run"' in expr, (title, expr)


def test_dashboard_has_the_panels_operators_look_for() -> None:
    exprs = "\n".join(expr for _, expr in expressions())
    for needed in (
        "rate(asyncsync_bytes_uploaded_total",
        "rate(asyncsync_files_uploaded_total",
        "rate(asyncsync_upload_failures_total",
        "rate(asyncsync_retries_total",
        "asyncsync_queue_depth", "asyncsync_uploads_in_flight", "asyncsync_bytes_in_flight",
        "histogram_quantile(0.5, sum by (instance, le) (rate(asyncsync_time_to_durable_seconds",
        "histogram_quantile(0.99, sum by (instance, le) (rate(asyncsync_time_to_durable_seconds",
        "time() - asyncsync_last_successful_sync_timestamp_seconds",
        'metric=~".*loss.*"', 'metric=~"metrics_mAP.*"', "asyncsync_training_epoch{",
        "rate(process_cpu_seconds_total", "process_resident_memory_bytes", "asyncsync_store_up",
    ):
        assert needed in exprs, needed


def test_every_metric_is_in_the_catalogue(board: dict[str, Any]) -> None:
    queries = [(title, substitute(expr)) for title, expr in expressions()]
    for item in board["templating"]["list"]:
        if item["type"] == "query":
            series = re.fullmatch(r"label_values\((.+), *\w+\)", item["query"])
            assert series, item["query"]
            queries.append((item["name"], substitute(series.group(1))))
    if importlib.util.find_spec("yaml") is not None:
        queries += alert_expressions()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, (where, expr)
        assert names <= CATALOGUE, (where, names - CATALOGUE)


def test_dashboard_expressions_pass_promtool(promtool: str, tmp_path: Path) -> None:
    # promtool 2.42 has no `check expr`: a recording rule per expression gets them parsed.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(expressions()):
        lines += [f"      - record: asyncsync_dashboard:expression_{i}",
                  f"        expr: {json.dumps(substitute(expr, rate_interval='5m'))}"]
    rules = tmp_path / "dashboard_rules.yaml"
    rules.write_text("\n".join(lines) + "\n")
    run_promtool(promtool, "check", "rules", rules)


def test_substitute_replaces_grafana_variables() -> None:
    expr = 'rate(x{instance=~"$instance", run=~"${run}"}[$__rate_interval])'
    assert substitute(expr) == 'rate(x{instance=~".*", run=~".*"}[1m])'
    assert substitute(expr, "5m", instance="node-1:9464") == (
        'rate(x{instance=~"node-1:9464", run=~".*"}[5m])')
    with pytest.raises(ValueError, match=r"\$node"):
        substitute('x{instance=~"$node"}')


# -- the alerts ---------------------------------------------------------------------------------

def test_alert_rules_pass_promtool(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", ALERTS)


def test_alert_unit_tests_pass(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)


EXPECTED_ALERTS = {
    "AsyncsyncUploadsStalled", "AsyncsyncFailureRatioHigh", "AsyncsyncRunNotSynced",
    "AsyncsyncStoreDown", "AsyncsyncDaemonDown", "AsyncsyncDaemonAbsent",
    "AsyncsyncCleanupFailing",
}


def test_every_alert_is_documented_for_whoever_gets_paged() -> None:
    needs_yaml()
    (group,) = load_yaml(ALERTS)["groups"]
    assert group["name"] == "asyncsync"
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert set(rules) == EXPECTED_ALERTS
    for name, rule in rules.items():
        assert rule["for"], name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        for annotation in ("summary", "description"):
            assert "$labels." in rule["annotations"][annotation], (name, annotation)


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    needs_yaml()
    alerts = {name for name, _ in alert_expressions()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        assert case["input_series"], case["name"]
        for check in case["alert_rule_test"]:
            assert "exp_alerts" in check, case["name"]  # spelled out, even when []
            expected = check["exp_alerts"]
            (firing if expected else quiet).add(check["alertname"])
            for alert in expected:
                assert alert["exp_labels"]["severity"], case["name"]
                assert alert["exp_annotations"]["summary"], case["name"]
                assert alert["exp_annotations"]["description"], case["name"]
    assert alerts - firing == set(), "alerts without a case where they fire"
    assert alerts - quiet == set(), "alerts without a case where they stay quiet"
    assert (firing | quiet) <= alerts


# -- the scrape config --------------------------------------------------------------------------

KUBERNETES_SD = re.compile(r"^(?P<indent> *)kubernetes_sd_configs:\n(?P=indent) *- role: pod\n",
                           re.MULTILINE)


def prometheus_yml(tmp_path: Path, scrape: str) -> Path:
    """A whole prometheus.yml: scrape.yaml's scrape_configs and the alert rules."""
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n"
                      f"rule_files:\n  - {json.dumps(str(ALERTS))}\n" + scrape)
    return config


def knows_kubernetes_discovery(promtool: str, tmp_path: Path) -> bool:
    # Debian builds Prometheus without Kubernetes (or Consul) discovery: its promtool rejects
    # the field itself.
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: probe\n"
                     "    kubernetes_sd_configs:\n      - role: pod\n")
    done = subprocess.run([promtool, "check", "config", str(probe)], capture_output=True,
                          text=True, timeout=60)
    return "field kubernetes_sd_configs not found" not in done.stdout + done.stderr


def test_scrape_config_and_rules_pass_promtool(promtool: str, tmp_path: Path) -> None:
    if not knows_kubernetes_discovery(promtool, tmp_path):
        pytest.skip("this promtool was built without Kubernetes discovery (Debian's is); "
                    "the other test checks the config with that block left out")
    run_promtool(promtool, "check", "config", prometheus_yml(tmp_path, SCRAPE.read_text()))


def test_scrape_config_passes_promtool_without_kubernetes_discovery(
    promtool: str, tmp_path: Path
) -> None:
    # Everything but the discovery block itself (relabelling, the static job, the rule file)
    # is still checked by a promtool that lacks it.
    scrape, replaced = KUBERNETES_SD.subn(r"\g<indent>static_configs: []\n", SCRAPE.read_text())
    assert replaced == 1
    run_promtool(promtool, "check", "config", prometheus_yml(tmp_path, scrape))


def test_scrape_config_has_the_static_and_the_kubernetes_jobs() -> None:
    text = SCRAPE.read_text()
    assert re.search(r"^  - job_name: asyncsync\n", text, re.MULTILINE)
    assert "localhost:9464" in text
    for needed in ("__meta_kubernetes_pod_annotation_prometheus_io_scrape",
                   "__meta_kubernetes_pod_annotation_prometheus_io_port",
                   "__meta_kubernetes_pod_annotation_prometheus_io_path",
                   "target_label: pod", "target_label: namespace", "target_label: node"):
        assert needed in text, needed
