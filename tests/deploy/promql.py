"""The PromQL of deploy/'s dashboard and alerts, for tests that check it or evaluate it.

`expressions` reads the committed dashboard JSON (what users import, not the generator), and
`alert_expressions` the alert rules; `substitute` turns the dashboard's Grafana variables into
values Prometheus accepts, so either can be sent to a real Prometheus as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "asyncsync.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
GENERATOR = ROOT / "deploy" / "grafana" / "dashboard.py"


def load_yaml(path: Path) -> Any:
    """PyYAML's parse of ``path``. Imported here, not at the top: it is no dependency of
    asyncsync's (it comes with the ultralytics extra), so importing this module needs none."""
    yaml: Any = importlib.import_module("yaml")
    return yaml.safe_load(path.read_text())


def load_generator() -> ModuleType:
    """deploy/grafana/dashboard.py, the dashboard's generator, as a module."""
    spec = importlib.util.spec_from_file_location("asyncsync_grafana_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, those inside collapsed rows included, the rows left out
    (the generator's own walk)."""
    found: list[dict[str, Any]] = load_generator().panels(board)
    return found


def expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables) of every target of every panel."""
    board = json.loads(path.read_text())
    return [(panel["title"], target["expr"])
            for panel in panels(board) for target in panel.get("targets", [])]


def alert_expressions(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(alert name, PromQL) of every alerting rule of a rule file."""
    return [(rule["alert"], rule["expr"].strip())
            for group in load_yaml(path)["groups"]
            for rule in group["rules"] if "alert" in rule]


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def substitute(expr: str, rate_interval: str = "1m", *, instance: str = ".*", run: str = ".*",
               datasource: str = "prometheus") -> str:
    """``expr`` with the dashboard's variables replaced: the rate windows by
    ``rate_interval`` (make it at least 4 scrape intervals, as Grafana does), ``$instance``
    and ``$run`` by regexes (``.*``: the dashboard's All). An unknown variable raises
    ValueError rather than reaching Prometheus as a syntax error."""
    values = {"__rate_interval": rate_interval, "__interval": rate_interval,
              "instance": instance, "run": run, "datasource": datasource}

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise ValueError(f"unknown Grafana variable {match.group(0)} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
                       "by", "without", "on", "ignoring", "group_left", "group_right"})


def metric_names(expr: str) -> set[str]:
    """The metric names an expression (without Grafana variables) selects. Not a parser: it
    drops strings, label matchers, ranges and grouping labels, then keeps the identifiers that
    are neither keywords nor called (functions, aggregations)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end():].lstrip()
        if match.group(0) in _KEYWORDS or rest.startswith("("):
            continue
        names.add(match.group(0))
    return names
