"""Reports of a grid: ``runs.csv``, ``baselines.csv``, ``table.md``, ``summary.png`` and the console tables.

The console prints the summary columns and the per-metric columns as separate tables, each wrapped into
as many tables as it takes to fit the console's width (the row label repeated in each), so a data set
with 14 or more tasks stays readable.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.runner.conflicts import RULES
from benchmarks.runner.stats import EFFECT_KEYS

__all__ = ["row_label", "summary_columns", "metric_columns", "wrap_columns", "print_tables", "write_reports"]


def _ms(ms: tuple[float, float], digits: int = 4, n: int = 1, missing: str = "NaN") -> str:
    """``mean ± std`` (the mean alone for one seed); ``missing`` where the mean is not finite."""
    m, s = ms
    if not math.isfinite(m):
        return missing
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _num(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "—"


def _ci(lo_hi: Sequence[float], digits: int = 2) -> str:
    lo, hi = lo_hi
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(lo) and math.isfinite(hi) else "—"


def row_label(method: str, cost: str, control_of: str | None = None) -> str:
    """``fairgrad``, ``fairgrad + COST (paper)``, or for a matched control ``fairgrad + paper (control: null)``."""
    if control_of:
        return f"{method} + {control_of} (control: {cost})"
    return method if cost == "none" else f"{method} + COST ({cost})"


def summary_columns(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-(method, cost) statistics (no per-metric column)."""
    header = ["Method", "Δm% ↓", "Δm% 95% CI", "paired Δ vs base", "paired 95% CI", "MR ↓", "epochs", "wall s",
              "time × base", "teleports", "‖g0‖ × per teleport", "Δ min cos per teleport",
              *(f"trigger ratio ({rule})" for rule in RULES), "seeds"]
    body = []
    if summary["baseline_rows"]:
        body.append(["STL (single-task)", "0.00", "—", "—", "—", "—", _ms(summary["baseline_epochs"], 1),
                     _ms(summary["baseline_wall"], 1), "—", "—", "—", "—", "—", "—",
                     str(len({r["seed"] for r in summary["baseline_rows"]}))])
    for a in summary["agg"]:
        n, p = a["n"], a["paired"] or {}
        body.append([row_label(a["method"], a["cost"], a.get("control_of")), _ms(a["delta_m"], 2, n), _ci(a["delta_m_ci95"]),
                     _num(p.get("mean", float("nan"))), _ci(p.get("ci95", (float("nan"),) * 2)), _num(a["mr"]),
                     _ms(a["epochs_run"], 1, n), _ms(a["wall_time_s"], 1, n), _num(p.get("time_ratio", float("nan"))),
                     _ms(a["teleports"], 1, n), _ms(a["grad_norm_ratio"], 3, n, "—"),
                     _ms(a["min_cos_change"], 3, n, "—"), *(_ms(a[f"trigger_ratio_{r}"], 2, n, "—") for r in RULES), str(n)])
    return header, body


def metric_columns(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the test metrics (mean ± std over seeds; NaN where undefined)."""
    metrics = summary["metrics"]
    header = ["Method"] + [f"{k} {'↑' if summary['higher_is_better'][k] else '↓'}" for k in metrics]
    body = []
    if summary["baseline_rows"]:
        body.append(["STL (single-task)"] + [_ms((summary["baseline"][k], 0.0)) for k in metrics])
    for a in summary["agg"]:
        body.append([row_label(a["method"], a["cost"], a.get("control_of"))] + [_ms(a[k], 4, a["n"]) for k in metrics])
    return header, body


def wrap_columns(header: list[str], body: list[list[str]], width: int) -> list[list[int]]:
    """Column groups (indices; the first column in each) whose boxed table fits ``width`` characters."""
    widths = [max(len(h), *(len(r[i]) for r in body)) + 3 for i, h in enumerate(header)]  # padding + border
    groups: list[list[int]] = []
    current, used = [0], widths[0] + 1
    for i in range(1, len(header)):
        if used + widths[i] > width and len(current) > 1:
            groups.append(current)
            current, used = [0], widths[0] + 1
        current.append(i)
        used += widths[i]
    groups.append(current)
    return groups


def print_tables(summary: dict[str, Any], console: Any, title: str = "") -> None:
    """The summary and the metric tables, each wrapped to the console's width, then the notes."""
    from rich.table import Table

    for name, (header, body) in (("statistics", summary_columns(summary)), ("test metrics", metric_columns(summary))):
        groups = wrap_columns(header, body, console.width)
        for g, cols in enumerate(groups, 1):
            part = f" ({g}/{len(groups)})" if len(groups) > 1 else ""
            t = Table(title=f"{summary['dataset']}: {name}{part}{title}")
            for i in cols:
                t.add_column(header[i], justify="left" if i == 0 else "right", no_wrap=True)
            for row in body:
                t.add_row(*(row[i] for i in cols))
            console.print(t)
    for note in summary["notes"]:
        console.print(f"note: {note}")


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"## {summary['dataset']}: test metrics (mean ± std over seeds; epoch selected on validation)", ""]
    for header, body in (metric_columns(summary), summary_columns(summary)):
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body] + [""]
    lines += ["Δm% (eq. 14) is relative to the mean of the single-task baselines (STL row); its 95 % CI is a "
              "Student-t interval over seeds. 'paired Δ vs base' is the mean over seeds of Δm%(+ COST) - Δm%(base) "
              "of the same seed, with its t-interval; 'time × base' the mean ratio of their wall times. MR is the "
              "mean rank over the metrics among the multi-task rows. The trigger ratios count, on the steps that "
              "have per-task gradients, the share on which each rule would fire: 'majority' is eq. 4 "
              "(ceil(K/2) tasks with cos(g_i, g_0) < 0), 'any' the authors' rule (one task with cos <= 0). "
              "'‖g0‖ × per teleport' and 'Δ min cos per teleport' are, per run, the median over its teleports "
              "that moved of the mean gradient's norm ratio and the change of the smallest cos(g_i, g_0), "
              "measured on the teleport's own batch before and after (then mean ± std over seeds)."]
    lines += [f"\n- Note: {n}" for n in summary["notes"]]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, cols: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", restval="")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_reports(summary: dict[str, Any], out: Path, console: Any = None) -> None:
    """``runs.csv``, ``baselines.csv``, ``table.md``, ``summary.png``; prints the tables."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = summary["metrics"]
    _write_csv(out / "runs.csv", ["dataset", "method", "cost", "seed", *metrics, "delta_m", "best_epoch", "epochs_run",
                                  "wall_time_s", "teleports", "teleports_before_best",
                                  *(f"trigger_ratio_{r}" for r in RULES), *EFFECT_KEYS], summary["rows"])
    _write_csv(out / "baselines.csv", ["dataset", "task", "seed", *metrics, "best_epoch", "epochs_run", "wall_time_s"],
               summary["baseline_rows"])
    (out / "table.md").write_text(_markdown(summary))
    _plot(summary, out / "summary.png")
    if console is not None:
        print_tables(summary, console, f" -> {out / 'table.md'}")


def _plot(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    methods = list(dict.fromkeys(a["method"] for a in summary["agg"]))
    costs = list(dict.fromkeys(a["cost"] for a in summary["agg"]))
    by = {(a["method"], a["cost"]): a["delta_m"] for a in summary["agg"]}
    fig = Figure(figsize=(max(4.0, 1.2 * len(methods) * max(1, len(costs)) + 1.5), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(1, len(costs))
    x = np.arange(len(methods))
    for j, c in enumerate(costs):
        means = [by.get((m, c), (float("nan"), 0.0))[0] for m in methods]
        stds = [s if math.isfinite(s) else 0.0 for s in (by.get((m, c), (0.0, 0.0))[1] for m in methods)]
        ax.bar(x + (j - (len(costs) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label="no COST" if c == "none" else f"COST ({c})")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, methods)
    ax.set_ylabel("Δm% vs single-task (lower is better)")
    ax.set_title(f"{summary['dataset']}: Δm% per method")
    if costs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
