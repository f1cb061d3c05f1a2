"""The browser's pages, as HTML: the runs table, a run, a comparison, an error.

Everything shown from the bucket goes through `markup.render` (escaped unless it is markup
written here) or `markup.json_script` (the data the page's script draws charts from). Links
to objects are this server's own ``/obj/KEY`` routes, relative to PREFIX: a page never names
the store's endpoint, and never holds a credential or a presigned URL.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlencode

from ...report import human_bytes
from ...stores.protocol import ObjectInfo
from .catalog import Curves
from .markup import Html, escape, join, json_script, render

MAP50_95, MAP50 = "metrics/mAP50-95(B)", "metrics/mAP50(B)"
STATUSES = ("running", "stale", "crashed", "finished", "pushed", "unknown")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
# ultralytics' plots, in the order a reader wants them; the others follow by name.
PLOT_ORDER = ("results", "confusion_matrix_normalized", "confusion_matrix", "PR_curve",
              "BoxPR_curve", "F1_curve", "BoxF1_curve", "P_curve", "BoxP_curve", "R_curve",
              "BoxR_curve", "labels", "labels_correlogram")
# The charts of a run page: a column goes to the first whose test it passes.
CHARTS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("Losses (train)", lambda c: c.startswith("train/") and "loss" in c),
    ("Losses (val)", lambda c: c.startswith("val/") and "loss" in c),
    ("Precision / recall", lambda c: "precision" in c or "recall" in c),
    ("mAP", lambda c: "mAP" in c or c == "fitness"),
    ("Learning rate", lambda c: c.startswith("lr/")),
    ("Other", lambda c: True),
)


def run_href(path: str) -> str:
    return "/run/" + quote(path, safe="/")


def object_href(relative: str) -> str:
    return "/obj/" + quote(relative, safe="/")


def ago(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "-"
    return span(max(0.0, now - seconds)) + " ago"


def span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _time(text: str | None) -> str:
    from ...commands.runs import parse_time

    moment = parse_time(text)
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(moment)) if moment else "-"


def layout(title: str, body: Html, *, scripts: Iterable[str] = (), where: str = "",
           refresh: bool = False) -> Html:
    tags = join(render('<script src="/static/{name}" defer></script>', name=name)
                for name in scripts)
    return render(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>{title} · asyncsync</title>'
        '<link rel="stylesheet" href="/static/uPlot.min.css">'
        '<link rel="stylesheet" href="/static/app.css">{tags}</head>'
        '<body data-refresh="{refresh}"><header><a class="home" href="/">asyncsync runs</a>'
        '<span class="where">{where}</span></header><main>{body}</main></body></html>',
        title=title, tags=tags, body=body, where=where, refresh="1" if refresh else "")


# -- the runs page ---------------------------------------------------------------------------


def _best(run: dict[str, Any], metric: str) -> float | None:
    values = run["metrics"].get(metric) or {}
    best = values.get("best")
    return best if best is not None else values.get("last")


def sync_cell(run: dict[str, Any], now: float) -> Html:
    """In sync / N files pending (live, from the daemon) and the last sync's age."""
    from ...commands.runs import parse_time

    last = parse_time(run["last_sync"])
    live = run.get("live")
    age = render('<span class="age">last sync {age}</span>', age=ago(last, now))
    if live is None:
        return age
    if live["pending"]:
        state = render('<span class="pending">{n} file{s} pending ({size})</span>',
                       n=live["pending"], s="" if live["pending"] == 1 else "s",
                       size=human_bytes(live["pending_bytes"]))
    else:
        state = Html('<span class="insync">in sync</span>')
    failures = (render(' <span class="failures">{n} failed</span>', n=live["failures"])
                if live["failures"] else Html(""))
    return render("{state}{failures}<br>{age}", state=state, failures=failures, age=age)


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def runs_rows(runs: list[dict[str, Any]], now: float) -> Html:
    rows = []
    for run in runs:
        from ...commands.runs import parse_time

        name = run["run"] or "."
        epochs = "-" if run["epochs"] is None else str(run["epochs"])
        if run["epochs_planned"] is not None:
            epochs += f"/{run['epochs_planned']}"
        best, best50 = _best(run, MAP50_95), _best(run, MAP50)
        started = parse_time(run["started"])
        last = parse_time(run["last_sync"])
        rows.append(render(
            '<tr data-run="{name}" data-status="{status}">'
            '<td><input type="checkbox" name="run" value="{path}" form="compare"'
            ' aria-label="compare {name}"></td>'
            '<td data-value="{name}"><a href="{href}">{name}</a></td>'
            '<td data-value="{status}"><span class="status {status}">{status}</span></td>'
            '<td data-value="{last}">{sync}</td>'
            '<td data-value="{host}">{host}</td>'
            '<td data-value="{started}">{started_text}</td>'
            '<td data-value="{duration}">{duration_text}</td>'
            '<td data-value="{epochs_value}">{epochs}</td>'
            '<td data-value="{best}" class="num">{best_text}</td>'
            '<td data-value="{best50}" class="num">{best50_text}</td>'
            '<td data-value="{size}" class="num">{size_text}</td></tr>',
            name=name, path=run["run"], href=run_href(run["run"]), status=run["status"],
            last=last or 0, sync=sync_cell(run, now), host=run["host"] or "-",
            started=started or 0, started_text=_time(run["started"]),
            duration=run["duration"] or 0, duration_text=span(run["duration"]),
            epochs_value=run["epochs"] or 0, epochs=epochs,
            best=best if best is not None else -1, best_text=_number(best),
            best50=best50 if best50 is not None else -1, best50_text=_number(best50),
            size=run["bytes"], size_text=human_bytes(run["bytes"]),
        ))
    return join(rows)


def runs_page(runs: list[dict[str, Any]], where: str, now: float, *, live: bool,
              listed_at: float | None = None) -> Html:
    counts = {status: sum(1 for run in runs if run["status"] == status) for status in STATUSES}
    options = join(render('<option value="{s}">{s} ({n})</option>', s=status, n=count)
                   for status, count in counts.items() if count)
    headers = join(render('<th data-sort="{kind}" tabindex="0">{label}</th>', kind=kind,
                          label=label) for label, kind in (
        ("Run", "text"), ("Status", "text"), ("Sync" + (" (live)" if live else ""), "number"),
        ("Host", "text"), ("Started (UTC)", "number"), ("Duration", "number"),
        ("Epochs", "number"), ("best mAP50-95", "number"), ("best mAP50", "number"),
        ("Size", "number")))
    body = render(
        '<section class="toolbar"><input id="filter" type="search" placeholder="filter runs,'
        ' hosts…" aria-label="filter"><select id="status-filter" aria-label="status">'
        '<option value="">every status ({total})</option>{options}</select>'
        '<form id="compare" action="/compare" method="get"><button type="submit">Compare'
        ' selected</button></form><span class="updated" id="updated">bucket read {now}</span>'
        '</section><table id="runs"><thead><tr><th></th>{headers}</tr></thead>'
        '<tbody>{rows}</tbody></table>{empty}',
        total=len(runs), options=options, headers=headers, rows=runs_rows(runs, now),
        now=time.strftime("%H:%M:%S UTC", time.gmtime(listed_at or now)),
        empty=Html('<p class="empty">No runs under this prefix.</p>') if not runs else Html(""))
    refresh = any(run["status"] in ("running", "stale") for run in runs)
    return layout("Runs", body, scripts=("app.js",), where=where, refresh=refresh)


# -- a run -----------------------------------------------------------------------------------


def chart_groups(curves: Curves) -> list[dict[str, Any]]:
    """The run page's charts: per `CHARTS` group, its series (column name and values)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for column, values in curves.columns.items():
        title = next(title for title, test in CHARTS if test(column))
        groups.setdefault(title, []).append({"label": column, "values": values})
    return [{"title": title, "series": groups[title]} for title, _ in CHARTS if title in groups]


def _plot_rank(info: ObjectInfo) -> tuple[int, str]:
    stem = info.key.rpartition("/")[2].rsplit(".", 1)[0]
    order = PLOT_ORDER.index(stem) if stem in PLOT_ORDER else len(PLOT_ORDER)
    return order, stem


def run_page(run: dict[str, Any], *, curves: Curves | None, objects: list[ObjectInfo],
             base: str, args_yaml: str | None, record: str | None, where: str,
             now: float) -> Html:
    path = run["run"]
    inside = f"{base}{path}/" if path else base
    plots = sorted((info for info in objects if info.key.lower().endswith(IMAGE_SUFFIXES)
                    and "/" not in info.key[len(inside):]), key=_plot_rank)
    weights = [info for info in objects if info.key[len(inside):].startswith("weights/")]
    figures = join(render(
        '<figure><a href="{href}"><img src="{href}" alt="{name}" loading="lazy"></a>'
        '<figcaption>{name}</figcaption></figure>', href=object_href(info.key[len(base):]),
        name=info.key[len(inside):]) for info in plots)
    downloads = join(render('<li><a href="{href}" download>{name}</a> ({size})</li>',
                            href=object_href(info.key[len(base):]),
                            name=info.key[len(inside):], size=human_bytes(info.size))
                     for info in weights)
    local = (path.rpartition("/")[2] or "run") if path else "run"
    pull = f"asyncsync pull {shlex.quote(run['url'])} {shlex.quote('./' + local)}"
    charts = chart_groups(curves) if curves is not None else []
    data = {"epochs": curves.epochs if curves else [], "charts": charts}
    facts = join(render('<dt>{k}</dt><dd>{v}</dd>', k=k, v=v) for k, v in (
        ("status", run["status"]), ("host", run["host"] or "-"),
        ("started", _time(run["started"])), ("ended", _time(run["ended"])),
        ("duration", span(run["duration"])),
        ("epochs", f"{run['epochs'] if run['epochs'] is not None else '-'}"
                   f"/{run['epochs_planned'] if run['epochs_planned'] is not None else '-'}"),
        ("best mAP50-95", _number(_best(run, MAP50_95))),
        ("best mAP50", _number(_best(run, MAP50))), ("size", human_bytes(run["bytes"])),
        ("exit code", "-" if run["exit_code"] is None else str(run["exit_code"]))))
    body = render(
        '<h1>{name} <span class="status {status}">{status}</span></h1>'
        '<section class="facts"><dl>{facts}<dt>sync</dt><dd>{sync}</dd></dl></section>'
        '<section><h2>Restore it</h2><div class="pull"><code id="pull">{pull}</code>'
        '<button type="button" id="copy-pull">copy</button></div>'
        '<ul class="downloads">{downloads}</ul></section>'
        '<section><h2>Training curves</h2><div id="charts"></div>{nocurves}</section>'
        '<section><h2>Plots</h2><div class="plots">{figures}</div>{noplots}</section>'
        '<section><h2>args.yaml</h2><pre id="args">{args}</pre></section>'
        '<section><h2>Run record</h2><pre id="record">{record}</pre></section>{data}',
        name=path or ".", status=run["status"], facts=facts, sync=sync_cell(run, now),
        pull=pull, downloads=downloads, figures=figures,
        nocurves=Html("") if charts else Html('<p class="empty">No results.csv.</p>'),
        noplots=Html("") if plots else Html('<p class="empty">No plots.</p>'),
        args=args_yaml if args_yaml is not None else "-",
        record=record if record is not None else "-", data=json_script("run-data", data))
    return layout(path or ".", body, scripts=("uPlot.iife.min.js", "app.js"), where=where,
                  refresh=run["status"] == "running")


def pretty_record(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except ValueError:
        return text


# -- compare ---------------------------------------------------------------------------------


def compare_page(runs: list[str], metric: str, columns: list[str],
                 curves: dict[str, Curves | None], where: str) -> Html:
    """One metric's curve of each run, over the union of their epochs."""
    epochs = sorted({epoch for found in curves.values() if found for epoch in found.epochs})
    series = []
    for path in runs:
        found = curves.get(path)
        by_epoch = dict(zip(found.epochs, found.columns.get(metric, []), strict=False)) \
            if found else {}
        series.append({"label": path or ".", "values": [by_epoch.get(e) for e in epochs]})
    choices = join(render('<option value="{c}"{sel}>{c}</option>', c=column,
                          sel=Html(" selected") if column == metric else Html(""))
                   for column in columns)
    hidden = join(render('<input type="hidden" name="run" value="{r}">', r=path)
                  for path in runs)
    links = join((render('<a href="{href}">{name}</a>', href=run_href(path), name=path or ".")
                  for path in runs), ", ")
    data = {"epochs": epochs, "charts": [{"title": metric, "series": series}]}
    body = render(
        '<h1>Compare</h1><p>{links}</p><form method="get" action="/compare">{hidden}'
        '<label>metric <select name="metric" id="metric">{choices}</select></label>'
        '<button type="submit">show</button></form><div id="charts"></div>{data}',
        links=links, hidden=hidden, choices=choices, data=json_script("run-data", data))
    return layout("Compare", body, scripts=("uPlot.iife.min.js", "app.js"), where=where)


def compare_link(runs: list[str], metric: str) -> str:
    return "/compare?" + urlencode([("run", run) for run in runs] + [("metric", metric)])


def error_page(status: int, message: str, where: str = "") -> Html:
    return layout(str(status), render('<h1>{status}</h1><p>{message}</p>', status=status,
                                      message=message), where=where)


__all__ = ["compare_page", "error_page", "escape", "run_page", "runs_page"]
