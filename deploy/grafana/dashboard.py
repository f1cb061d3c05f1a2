"""Generate deploy/grafana/asyncsync.json, the Grafana dashboard of asyncsync's metrics.

The JSON is generated rather than edited by hand so that every panel keeps the same datasource,
selectors and layout, and so that the tests can list every PromQL expression it holds (see
`expressions`). Regenerate after a change here with::

    python deploy/grafana/dashboard.py

Plain Python on purpose (no grafanalib, no jsonnet): the dashboard must not add a dependency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().with_name("asyncsync.json")

SCHEMA_VERSION = 39  # Grafana 10.4 / 11.0
GRAFANA_VERSION = "10.4.0"

# Every panel, target and query variable goes through the `datasource` variable rather than a
# fixed uid, so one imported copy serves whichever Prometheus the viewer picks.
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}

RATE = "$__rate_interval"
INSTANCE = 'instance=~"$instance"'
RUN = f'{INSTANCE}, run=~"$run"'
# process_* comes from every Python or Go exporter on a host; job keeps other exporters'
# processes off these panels when `instance` is All.
PROCESS = f'job="asyncsync", {INSTANCE}'

GRID_WIDTH = 24
PANEL_HEIGHT = 8

Target = tuple[str, str]  # (PromQL, legend)
Panel = dict[str, Any]


def rate(metric: str, selector: str = INSTANCE) -> str:
    return f"rate({metric}{{{selector}}}[{RATE}])"


def quantile(q: float, histogram: str) -> str:
    buckets = f"sum by (instance, le) ({rate(histogram + '_bucket')})"
    return f"histogram_quantile({q}, {buckets})"


def timeseries(
    title: str,
    unit: str,
    targets: list[Target],
    description: str,
    *,
    axis_label: str = "",
    minimum: float | None = 0,
    maximum: float | None = None,
    threshold: float | None = None,
    steps: bool = False,
    decimals: int | None = None,
) -> Panel:
    defaults: dict[str, Any] = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "axisLabel": axis_label,
            "axisPlacement": "auto",
            "drawStyle": "line",
            "fillOpacity": 10,
            "lineInterpolation": "stepAfter" if steps else "linear",
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "none"},
            "thresholdsStyle": {"mode": "off" if threshold is None else "line"},
        },
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}]
            + ([] if threshold is None else [{"color": "red", "value": threshold}]),
        },
        "unit": unit,
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"calcs": [], "displayMode": "list", "placement": "bottom",
                       "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": expr,
                "legendFormat": legend,
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def rows() -> list[tuple[str, bool, list[Panel]]]:
    """(title, collapsed, panels) of each row, top to bottom."""
    uploads = [
        timeseries(
            "Upload throughput",
            "Bps",
            [
                (f"sum by (instance) ({rate('asyncsync_bytes_uploaded_total')})",
                 "{{instance}} uploaded"),
                (f"sum by (instance) ({rate('asyncsync_bytes_sent_total')})",
                 "{{instance}} sent, retries included"),
            ],
            "File-content bytes of the files uploaded per second. Bytes sent count every "
            "attempt, so the gap between the two lines is what retries cost.",
        ),
        timeseries(
            "Files uploaded",
            "cps",
            [
                (f"sum by (instance, outcome) ({rate('asyncsync_files_uploaded_total')})",
                 "{{instance}} {{outcome}}"),
                (f"sum by (instance) ({rate('asyncsync_files_unchanged_total')})",
                 "{{instance}} unchanged, not sent"),
            ],
            "Files uploaded per second by outcome (new, changed, resumed), and files found "
            "identical to the stored object and skipped.",
            axis_label="files/s",
        ),
    ]
    failures = [
        timeseries(
            "Upload failures by reason",
            "cps",
            [(f"sum by (instance, reason) ({rate('asyncsync_upload_failures_total')})",
              "{{instance}} {{reason}}")],
            "Files whose upload failed per second, by reason. The file stays queued for "
            "the next scan; the AsyncsyncFailureRatioHigh alert watches the ratio.",
            axis_label="files/s",
        ),
        timeseries(
            "Retries by reason",
            "reqps",
            [(f"sum by (instance, reason) ({rate('asyncsync_retries_total')})",
              "{{instance}} {{reason}}")],
            "Store requests retried per second. Throttling and server errors here without "
            "failures beside them are the store pushing back, absorbed by the retries.",
            axis_label="requests/s",
        ),
    ]
    store_and_queue = [
        timeseries(
            "Queue depth and uploads in flight",
            "short",
            [(f"asyncsync_queue_depth{{{INSTANCE}}}", "{{instance}} queued"),
             (f"asyncsync_uploads_in_flight{{{INSTANCE}}}", "{{instance}} in flight")],
            "Files waiting to be uploaded and files being uploaded now. A queue that "
            "grows while nothing is in flight is a stalled daemon.",
            axis_label="files",
            decimals=0,
        ),
        timeseries(
            "Bytes in flight",
            "bytes",
            [(f"asyncsync_bytes_in_flight{{{INSTANCE}}}", "{{instance}} in flight"),
             (f"asyncsync_budget_limit_bytes{{{INSTANCE}}}", "{{instance}} budget limit")],
            "Bytes of the files being uploaded now, against the byte budget that bounds "
            "the memory held for bodies.",
        ),
        timeseries(
            "Store and daemon up",
            "bool_yes_no",
            [(f"asyncsync_store_up{{{INSTANCE}}}", "{{instance}} store answered"),
             (f'up{{{PROCESS}}}', "{{instance}} scraped")],
            "Whether the daemon's last store request succeeded, and whether Prometheus "
            "could scrape the daemon at all.",
            maximum=1,
            steps=True,
        ),
    ]
    durability = [
        timeseries(
            "Time to durable p50 / p99",
            "s",
            [(quantile(0.5, "asyncsync_time_to_durable_seconds"), "{{instance}} p50"),
             (quantile(0.99, "asyncsync_time_to_durable_seconds"), "{{instance}} p99")],
            "From the moment a file settled (its last modification) to the store's "
            "acknowledgement of its object: how long a checkpoint exists only on the node.",
        ),
        timeseries(
            "Seconds since last sync per run",
            "s",
            [(f"time() - asyncsync_last_successful_sync_timestamp_seconds{{{RUN}}}",
              "{{instance}} {{run}}")],
            "Since the last successful upload of a file of each run. The red line is the "
            "AsyncsyncRunNotSynced threshold (for runs still running).",
            threshold=1800,
        ),
    ]
    training = [
        timeseries(
            "Training loss per run",
            "none",
            [(f'asyncsync_training_metric{{{RUN}, metric=~".*loss.*"}}',
              "{{run}} {{metric}}")],
            "The loss columns of each run's results.csv, latest row. The x axis is wall "
            "time; the epoch panel maps it to epochs.",
            minimum=None,
        ),
        timeseries(
            "Training mAP per run",
            "percentunit",
            [(f'asyncsync_training_metric{{{RUN}, metric=~"metrics_mAP.*"}}',
              "{{run}} {{metric}}")],
            "The mAP columns of each run's results.csv (metrics/mAP50(B), "
            "metrics/mAP50-95(B), ...), latest row.",
            maximum=1,
        ),
        timeseries(
            "Training epoch per run",
            "none",
            [(f"asyncsync_training_epoch{{{RUN}}}", "{{run}}")],
            "Epochs done: the epoch of the last row of each run's results.csv.",
            decimals=0,
            steps=True,
        ),
    ]
    process = [
        timeseries(
            "Daemon CPU",
            "percentunit",
            [(f"rate(process_cpu_seconds_total{{{PROCESS}}}[{RATE}])", "{{instance}}")],
            "CPU time of the daemon per second of wall time (100% is one core): what it "
            "takes from the training job beside it.",
        ),
        timeseries(
            "Daemon memory",
            "bytes",
            [(f"process_resident_memory_bytes{{{PROCESS}}}", "{{instance}} RSS"),
             (f"asyncsync_budget_used_bytes{{{INSTANCE}}}", "{{instance}} budget used")],
            "Resident memory of the daemon, beside the part of the byte budget in use "
            "(bodies held in memory).",
        ),
    ]
    return [
        ("Uploads", False, uploads),
        ("Failures and retries", False, failures),
        ("Store and queue", False, store_and_queue),
        ("Durability", False, durability),
        ("Training", False, training),
        # Collapsed: a look at the daemon's own cost, not part of the daily view.
        ("Daemon process", True, process),
    ]


def layout() -> list[Panel]:
    """The panels as Grafana stores them: an expanded row's panels follow it at the top
    level, a collapsed row holds its panels; ids and grid positions assigned in order."""
    panels: list[Panel] = []
    next_id = 1
    y = 0
    for title, collapsed, members in rows():
        row: Panel = {"type": "row", "title": title, "collapsed": collapsed, "id": next_id,
                      "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []}
        next_id += 1
        y += 1
        panels.append(row)
        width = GRID_WIDTH // len(members)
        for i, panel in enumerate(members):
            panel["id"] = next_id
            next_id += 1
            panel["gridPos"] = {"h": PANEL_HEIGHT, "w": width, "x": i * width, "y": y}
            (row["panels"] if collapsed else panels).append(panel)
        if not collapsed:
            y += PANEL_HEIGHT
    return panels


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,
        "multi": True,
        "includeAll": True,
        # A regex rather than the list of every value: shorter queries, and a run that
        # appears after the page loaded is already included.
        "allValue": ".*",
        "current": {},
        "options": [],
        "refresh": 2,  # on time range change: runs come and go
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


def dashboard() -> dict[str, Any]:
    return {
        "__inputs": [{
            "name": "DS_PROMETHEUS",
            "label": "Prometheus",
            "description": "The Prometheus that scrapes asyncsync (job=\"asyncsync\")",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_VERSION},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "annotations": {"list": [{
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "description": "asyncsync: uploads of training run directories to S3, and the "
                       "training progress it reads from results.csv",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,  # shared crosshair: line a stall up with the queue and the store
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": layout(),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["asyncsync", "s3", "training"],
        "templating": {"list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                # The import dialog replaces ${DS_PROMETHEUS} with the datasource picked.
                "current": {"selected": False, "text": "${DS_PROMETHEUS}",
                            "value": "${DS_PROMETHEUS}"},
                "hide": 0,
                "includeAll": False,
                "multi": False,
                "options": [],
                "refresh": 1,
                "regex": "",
                "skipUrlSync": False,
            },
            query_variable("instance", "Instance",
                           "label_values(asyncsync_build_info, instance)"),
            query_variable(
                "run", "Run",
                f"label_values(asyncsync_last_successful_sync_timestamp_seconds{{{INSTANCE}}}, "
                "run)"),
        ]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "asyncsync",
        "uid": "asyncsync",
        "version": 1,
        "weekStart": "",
    }


def panels(board: dict[str, Any]) -> list[Panel]:
    """Every panel of a dashboard, rows' nested panels included, rows left out."""
    found: list[Panel] = []
    for panel in board["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, in dashboard order."""
    return [(panel["title"], target["expr"])
            for panel in panels(dashboard()) for target in panel["targets"]]


def render() -> str:
    return json.dumps(dashboard(), sort_keys=True, indent=2) + "\n"


def main() -> None:
    OUTPUT.write_text(render())


if __name__ == "__main__":
    main()
