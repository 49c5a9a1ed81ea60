"""Statistics of a grid: Delta-m% per run (eq. 14), mean and 95 % confidence interval over seeds, mean
rank, and the paired difference "+ COST" minus base, seed by seed.

A metric that is undefined (NaN: a ROC-AUC on a split whose labels hold one class) is kept in every
row as NaN, left out of Delta-m% and of the mean rank, and named in the summary's ``notes``; nothing
is dropped without a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.common import finite_mean, finite_median
from benchmarks.runner.conflicts import RULES

__all__ = ["t_interval", "mean_std", "run_delta_m", "paired_difference", "teleport_effect", "teleports_before_best",
           "summarize"]


def t_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``xs`` (finite values): ``mean -+ t s / sqrt(n)``
    with ``t`` the ``(1 + level) / 2`` quantile of ``t(n - 1)``. NaNs with fewer than 2 values."""
    from scipy import stats

    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if a.size < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return float(a.mean() - half), float(a.mean() + half)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std 0 for one value)."""
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def run_delta_m(values: dict[str, float], baseline: dict[str, float], hib: dict[str, bool]) -> float:
    """eq. 14 over the metrics finite in both the run and the single-task reference (NaN if none)."""
    from lightning_cost.metrics import delta_m

    keys = [k for k in baseline if k in values and math.isfinite(values[k]) and math.isfinite(baseline[k])
            and baseline[k] != 0]
    if not keys:
        return float("nan")
    return delta_m({k: values[k] for k in keys}, {k: baseline[k] for k in keys}, {k: hib[k] for k in keys})


def paired_difference(rows: list[dict[str, Any]], base: list[dict[str, Any]], key: str = "delta_m"
                      ) -> dict[str, Any]:
    """``rows[key] - base[key]`` for every seed both have: the differences, their mean and its 95 %
    t-interval, and the mean wall-time ratio (total time, seed by seed)."""
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in rows if r["seed"] in by_seed]
    diffs = [a[key] - b[key] for a, b in pairs]
    ratios = [a["wall_time_s"] / b["wall_time_s"] for a, b in pairs if b["wall_time_s"] > 0]
    return {"seeds": [a["seed"] for a, _ in pairs], "diffs": diffs, "mean": finite_mean(diffs),
            "ci95": t_interval(diffs), "time_ratio": finite_mean(ratios)}


def _directions(runs: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> dict[str, bool]:
    hib: dict[str, bool] = {}
    for r in runs + baselines:
        hib.update(r["higher_is_better"])
    return hib


def teleport_effect(history: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over a run's teleports that moved of what each did on its own batches (the records'
    before/after statistics): ``||g_0'|| / ||g_0||``, the change of the smallest ``cos(g_i, g_0)``
    and the largest relative task-loss drift; NaN where nothing moved."""
    moved = [h for h in history if h.get("accepted") and h.get("moved") and h.get("before") and h.get("after")]
    return {
        "grad_norm_ratio": finite_median([h["after"]["mean_norm"] / h["before"]["mean_norm"] for h in moved
                                          if h["before"]["mean_norm"] > 0]),
        "min_cos_change": finite_median([h["after"]["min_cos"] - h["before"]["min_cos"] for h in moved]),
        "loss_drift": finite_median([h.get("loss_drift", float("nan")) for h in moved]),
    }


def teleports_before_best(history: list[dict[str, Any]], best_epoch: int | None, teleports: int = 0) -> int | None:
    """Accepted teleports applied before the selected checkpoint: those of the best validation epoch
    or earlier (validation, and so the checkpoint, ends an epoch; a record's ``epoch`` is the epoch it
    was applied in). ``None`` where it cannot be told: no best epoch, or ``teleports`` acts that left
    no records (a control) or records without their epoch."""
    if best_epoch is None or best_epoch < 0 or (teleports and not history) or any("epoch" not in h for h in history):
        return None
    return sum(1 for h in history if h.get("accepted") and h["epoch"] <= best_epoch)


def _run_row(r: dict[str, Any], metrics: list[str], base: dict[str, float], hib: dict[str, bool],
             has_baselines: bool) -> dict[str, Any]:
    row = {"dataset": r["dataset"], "method": r["method"], "cost": r["cost"], "seed": r["seed"]}
    row.update({k: r["test"].get(k, float("nan")) for k in metrics})
    row.update({
        "delta_m": run_delta_m(r["test"], base, hib) if has_baselines else float("nan"),
        "best_epoch": r.get("best_epoch"), "epochs_run": r.get("epochs_run"), "wall_time_s": r["wall_time_s"],
        "teleports": r["teleports"], "control_of": _control_of(r),
        "teleports_before_best": r["teleports_before_best"] if "teleports_before_best" in r else
        teleports_before_best(r.get("teleport_history") or [], r.get("best_epoch"), r["teleports"]),
        **{f"trigger_ratio_{rule}": r.get(f"trigger_ratio_{rule}") for rule in RULES},
        **teleport_effect(r.get("teleport_history") or []),
    })
    return row


def _control_of(r: dict[str, Any]) -> str | None:
    """The variant a run's COST variant is the matched control of (older records: from its cache key)."""
    if "control_of" in r:
        return r["control_of"]
    return ((r.get("config") or {}).get("cost_spec") or {}).get("control_of")


EFFECT_KEYS = ("grad_norm_ratio", "min_cos_change", "loss_drift")
_AGG_KEYS = ("delta_m", "wall_time_s", "teleports", "teleports_before_best", "epochs_run", *(f"trigger_ratio_{rule}" for rule in RULES),
             *EFFECT_KEYS)


def _aggregate(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["cost"]), []).append(row)
    agg = []
    for (m, c), rs in groups.items():
        a: dict[str, Any] = {"method": m, "cost": c, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                             "control_of": rs[0]["control_of"]}
        for k in metrics + list(_AGG_KEYS):
            a[k] = mean_std([x[k] for x in rs])
        known = [x["teleports_before_best"] for x in rs if x["teleports_before_best"] is not None]
        a["teleports_before_best_known"], a["runs_acted_before_best"] = len(known), sum(1 for t in known if t > 0)
        a["delta_m_ci95"] = t_interval([x["delta_m"] for x in rs])
        base = groups.get((m, "none")) if c != "none" else None
        a["paired"] = paired_difference(rs, base) if base else None
        agg.append(a)
    return agg


def _mean_ranks(agg: list[dict[str, Any]], metrics: list[str], hib: dict[str, bool]) -> list[str]:
    """Sets ``mr`` on every row from the metrics finite in every row; returns the metrics left out."""
    from lightning_cost.metrics import mean_rank

    ok = [k for k in metrics if all(math.isfinite(a[k][0]) for a in agg)]
    ranks = mean_rank({f"{a['method']}|{a['cost']}": {k: a[k][0] for k in ok} for a in agg},
                      {k: hib[k] for k in ok}) if agg and ok else {}
    for a in agg:
        a["mr"] = ranks.get(f"{a['method']}|{a['cost']}", float("nan"))
    return [k for k in metrics if k not in ok]


def _notes(dataset: str, metrics: list[str], base: dict[str, float], rows: list[dict[str, Any]],
           runs: list[dict[str, Any]], left_out_of_mr: list[str]) -> list[str]:
    notes = []
    undefined: dict[str, set[str]] = {}
    for r in runs:
        for split, tasks in (r.get("undefined_auroc") or {}).items():
            undefined.setdefault(split, set()).update(tasks)
    for split in ("test", "val", "train"):
        if split in undefined:
            notes.append(f"{dataset}: ROC-AUC undefined in the {split} split (its labels there hold one class) for "
                         f"{', '.join(sorted(undefined[split]))}: reported as NaN"
                         + (", left out of Δm% and MR." if split == "test" else "; val/score averages the others."))
    for r in runs:
        if r.get("stopped"):
            notes.append(f"{dataset}: {r['method']} cost={r['cost']} seed {r['seed']} stopped before its last epoch "
                         f"({r['stopped'].split(';')[0]}); tested at its best validated epoch like every run.")
    nan_base = [k for k in metrics if not math.isfinite(base.get(k, float("nan")))] if any(
        math.isfinite(v) for v in base.values()) else []  # no baseline at all: Delta-m% is not computed
    nan_all = [k for k in metrics if rows and all(not math.isfinite(r[k]) for r in rows)]
    if nan_base:
        notes.append(f"{dataset}: no finite single-task value for {', '.join(nan_base)}: left out of Δm%.")
    if nan_all:
        notes.append(f"{dataset}: NaN in every multi-task run: {', '.join(nan_all)}.")
    if left_out_of_mr:
        notes.append(f"{dataset}: left out of the mean rank (not finite in every row): {', '.join(left_out_of_mr)}.")
    return notes


def summarize(runs: list[dict[str, Any]], baselines: list[dict[str, Any]], dataset: str) -> dict[str, Any]:
    """Per-run rows (Delta-m% against the mean single-task result), per (method, cost) aggregates with
    95 % t-intervals and the paired difference to the base method, mean ranks and notes."""
    hib = _directions(runs, baselines)
    metrics = list(hib)
    base = {k: finite_mean([b["test"].get(k) for b in baselines]) for k in metrics}
    base_rows = [{"dataset": dataset, "task": b["task"], "seed": b["seed"], **b["test"],
                  "best_epoch": b.get("best_epoch"), "epochs_run": b.get("epochs_run"),
                  "wall_time_s": b["wall_time_s"]} for b in baselines]
    rows = [_run_row(r, metrics, base, hib, bool(baselines)) for r in runs]
    agg = _aggregate(rows, metrics)
    left_out = _mean_ranks(agg, metrics, hib)
    return {"dataset": dataset, "metrics": metrics, "higher_is_better": hib, "baseline": base,
            "baseline_rows": base_rows, "rows": rows, "agg": agg,
            "baseline_wall": mean_std([b["wall_time_s"] for b in baselines]),
            "baseline_epochs": mean_std([b.get("epochs_run") for b in baselines]),
            "notes": _notes(dataset, metrics, base, rows, runs, left_out)}
