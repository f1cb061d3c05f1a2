"""What a training's results.csv says, as numbers a time-series database can hold.

Ultralytics appends one row per epoch to ``results.csv``: an ``epoch`` column, the losses,
the validation metrics (``metrics/mAP50(B)``...), the learning rates, and in recent versions
``time``, the seconds since the training began. Names and values are padded with spaces.
The live gauges of `metrics.py` and the OpenMetrics backfill of ``asyncsync metrics export``
both read it through here, so a column gets the same metric name in both.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass

EPOCH_COLUMN = "epoch"
TIME_COLUMN = "time"  # seconds since the training began (ultralytics >= 8.3)
_INVALID = re.compile(r"[^A-Za-z0-9_]+")


def parse_results(text: str) -> list[dict[str, str]]:
    """results.csv's rows, names and values stripped (ultralytics pads them with spaces)."""
    rows = csv.DictReader(io.StringIO(text))
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k} for row in rows]


def number(text: object) -> float | None:
    """A finite float, or None (an empty cell, "nan", a word)."""
    try:
        value = float(str(text))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def metric_name(column: str) -> str:
    """A column as a Prometheus label value that is also a valid metric-name part:
    ``metrics/mAP50-95(B)`` → ``metrics_mAP50_95_B``, ``train/box_loss`` → ``train_box_loss``.
    The original name is kept beside it (the ``column`` label), since two columns may
    sanitise alike."""
    name = _INVALID.sub("_", column).strip("_")
    if not name:
        return "_"
    return f"_{name}" if name[0].isdigit() else name


@dataclass(frozen=True, slots=True)
class Epoch:
    """One row of results.csv: its epoch number, its numeric columns (by original name,
    ``epoch`` and ``time`` left out), and the seconds since the training began if known."""

    epoch: int
    values: dict[str, float]
    elapsed: float | None


def epochs_of(text: str) -> list[Epoch]:
    """Every row of results.csv with a numeric epoch, in file order. Epochs are numbered
    from 1 (ultralytics writes ``epoch`` 1-based); a row without one counts as the next."""
    epochs: list[Epoch] = []
    for row in parse_results(text):
        raw = number(row.get(EPOCH_COLUMN))
        epoch = int(raw) if raw is not None else (epochs[-1].epoch + 1 if epochs else 1)
        values = {
            column: value
            for column, cell in row.items()
            if column not in (EPOCH_COLUMN, TIME_COLUMN) and (value := number(cell)) is not None
        }
        epochs.append(Epoch(epoch, values, number(row.get(TIME_COLUMN))))
    return epochs


def epoch_seconds(epochs: list[Epoch]) -> float | None:
    """The wall time of the last epoch, from the ``time`` column: the difference of the
    last two rows (the first row's own ``time`` when there is only one)."""
    if not epochs or epochs[-1].elapsed is None:
        return None
    if len(epochs) == 1:
        return epochs[-1].elapsed
    before = epochs[-2].elapsed
    return None if before is None else max(0.0, epochs[-1].elapsed - before)


def epoch_durations(epochs: list[Epoch]) -> list[float | None]:
    """Each epoch's wall time from the ``time`` column: its elapsed less the row before's
    (the first row's own elapsed), None where either is unknown. A difference below zero
    (the count restarted, as a resumed training's does) is kept: the caller decides."""
    durations: list[float | None] = []
    before: float | None = 0.0
    for epoch in epochs:
        now = epoch.elapsed
        durations.append(None if now is None or before is None else now - before)
        before = now
    return durations
