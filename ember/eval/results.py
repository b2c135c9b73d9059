"""Evaluation results: metric rows, the printed table and the results JSON file.

Every row carries what makes a number reusable on its own: task, metric, value, stderr, n
(items it averages over), model, config (the run's settings) and date (UTC, ISO 8601). The
file is {"results": [rows...], "samples": [per-item records...]}, written atomically.

    ember eval ... --out results.json        # python: write_results(path, task_result, model, config)
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.atomic import atomic_write_json


@dataclass
class Metric:
    task: str
    metric: str
    value: float
    stderr: float | None
    n: int


@dataclass
class TaskResult:
    """What a task returns: its metric rows and one record per evaluated item."""

    metrics: list[Metric]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def value(self, metric: str) -> float:
        """The value of a metric by name (for tests and scripts)."""
        for m in self.metrics:
            if m.metric == metric:
                return m.value
        raise KeyError(f"no metric {metric!r}; have {', '.join(m.metric for m in self.metrics)}")


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def format_table(rows: Sequence[Metric], first_header: str = "task") -> str:
    """A plain-text table: task | metric | value | ± stderr | n (n shown as "-" when 0)."""
    head = [first_header, "metric", "value", "± stderr", "n"]
    body = [[m.task, m.metric, _fmt(m.value), _fmt(m.stderr), str(m.n) if m.n else "-"] for m in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


def result_rows(result: TaskResult, model: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for m in result.metrics:
        row = asdict(m)
        if isinstance(row["value"], float) and math.isnan(row["value"]):
            row["value"] = None  # e.g. a mean over zero judged items; JSON has no NaN
        rows.append({**row, "model": model, "config": config, "date": date})
    return rows


def write_results(path: str | Path, result: TaskResult, model: str, config: dict[str, Any]) -> None:
    atomic_write_json(path, {"results": result_rows(result, model, config), "samples": result.samples})
