"""The verdict: finished result folders collected into ``verdict.json`` and a readable ``VERDICT.md``.

    python -m benchmarks.run --verdict DIR1 DIR2 ... [--verdict-out docs/results/verdict]
    python -m benchmarks.runner.verdict DIR1 DIR2 ... [--out docs/results/verdict]

Each folder is one data set's runner output (``runs/*.json``, ``baselines/*.json``). ``verdict.json``::

    {"datasets": {"<name>": {"stl": {"<task>/<metric>": value},
                             "rows": [{"method", "cost", "seeds", "delta_m_mean", "delta_m_ci95", "mr",
                                       "paired_vs_base_mean", "paired_vs_base_ci95", "teleports_per_run",
                                       "trigger_ratio", "time_ratio_vs_base"}]}}}

``cost`` is ``"none"`` or the COST variant; confidence intervals are ``[low, high]`` (95 %, Student t
over seeds); ``trigger_ratio`` is ``{"majority": ..., "any": ...}`` (which rule it counts); undefined
numbers are ``null``. A COST row helps where its paired interval lies below 0 (Delta-m% is lower
with COST, seed for seed), hurts where it lies above 0, is inconclusive otherwise, and never fires
where it made no teleport.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import load_json, write_json
from benchmarks.conflicts import RULES
from benchmarks.runner.stats import summarize

__all__ = ["collect", "verdict_row", "classify", "render_markdown", "write_verdict", "main"]


def _clean(v: Any) -> Any:
    """NaN and infinities as ``None`` (JSON has no NaN), recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def verdict_row(a: dict[str, Any]) -> dict[str, Any]:
    """One row of ``verdict.json`` from an aggregate of :func:`~benchmarks.runner.stats.summarize`."""
    p = a["paired"] or {}
    return _clean({
        "method": a["method"], "cost": a["cost"], "seeds": a["seeds"],
        "delta_m_mean": a["delta_m"][0], "delta_m_ci95": list(a["delta_m_ci95"]), "mr": a["mr"],
        "paired_vs_base_mean": p.get("mean"), "paired_vs_base_ci95": list(p["ci95"]) if p else None,
        "teleports_per_run": a["teleports"][0],
        "trigger_ratio": {rule: a[f"trigger_ratio_{rule}"][0] for rule in RULES},
        "time_ratio_vs_base": p.get("time_ratio"),
    })


def collect(folders: Sequence[str | Path]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``({"datasets": {...}}, {data set: notes})`` from result folders (a data set in two folders: the
    later one wins). The notes say which metrics are undefined (NaN, ``null`` in the JSON) and why."""
    datasets: dict[str, Any] = {}
    notes: dict[str, list[str]] = {}
    for folder in map(Path, folders):
        runs = [r for p in sorted((folder / "runs").glob("*.json")) if (r := load_json(p)) is not None]
        runs.sort(key=lambda r: (r["method"], r["cost"] != "none", r["cost"], r["seed"]))
        bases = [r for p in sorted((folder / "baselines").glob("*.json")) if (r := load_json(p)) is not None]
        if not runs:
            raise FileNotFoundError(f"{folder}: no runs/*.json (not a finished benchmarks.run folder)")
        name = runs[0]["dataset"]
        s = summarize(runs, bases, name)
        datasets[name] = {"stl": _clean(s["baseline"]), "rows": [verdict_row(a) for a in s["agg"]]}
        notes[name] = s["notes"]
    return {"datasets": datasets}, notes


def classify(row: dict[str, Any]) -> str:
    """``"helps"``, ``"hurts"``, ``"inconclusive"`` or ``"never fires"`` for a COST row (``""`` for a base row)."""
    if row["cost"] == "none":
        return ""
    if not row["teleports_per_run"]:
        return "never fires"
    lo, hi = row["paired_vs_base_ci95"] or (None, None)
    if hi is not None and hi < 0:
        return "helps"
    if lo is not None and lo > 0:
        return "hurts"
    return "inconclusive"


def _f(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci(v: Any) -> str:
    return "—" if not v or v[0] is None else f"[{v[0]:.2f}, {v[1]:.2f}]"


def _statement(name: str, rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[str]] = {what: [] for what in ("helps", "hurts", "inconclusive", "never fires")}
    for r in rows:
        if r["cost"] != "none":
            by[classify(r)].append(f"{r['method']} + COST ({r['cost']})")
    parts = [f"{what} for {', '.join(who)}" for what, who in by.items() if who]
    if not parts:
        return f"{name}: no COST row."
    return f"{name}: COST " + "; ".join(parts) + "."


def render_markdown(verdict: dict[str, Any], notes: dict[str, list[str]] | None = None) -> str:
    """``VERDICT.md``: one table and one plain statement per data set, then its notes."""
    lines = ["# Verdict: does COST help?", "",
             "Δm% (eq. 14, lower is better) against single-task baselines; 'paired Δ' is Δm%(+ COST) - Δm%(base) "
             "seed by seed, with its 95 % Student-t interval. COST helps where that interval lies below 0, hurts "
             "where it lies above 0, is inconclusive otherwise, and never fires where no teleport happened.", ""]
    for name, d in verdict["datasets"].items():
        lines += [f"## {name}", "", "| method | COST | seeds | Δm% | Δm% 95% CI | paired Δ | paired 95% CI | MR | "
                  "teleports/run | trigger ratio (majority / any) | time × base | verdict |", "|" + "---|" * 12]
        for r in d["rows"]:
            tr = r["trigger_ratio"]
            lines.append(f"| {r['method']} | {r['cost']} | {len(r['seeds'])} | {_f(r['delta_m_mean'])} | "
                         f"{_ci(r['delta_m_ci95'])} | {_f(r['paired_vs_base_mean'])} | {_ci(r['paired_vs_base_ci95'])} | "
                         f"{_f(r['mr'])} | {_f(r['teleports_per_run'], 1)} | {_f(tr['majority'])} / {_f(tr['any'])} | "
                         f"{_f(r['time_ratio_vs_base'])} | {classify(r)} |")
        lines += ["", _statement(name, d["rows"])] + [f"\nNote: {n}" for n in (notes or {}).get(name, [])] + [""]
    return "\n".join(lines)


def write_verdict(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Collect ``folders`` and write ``<out>/verdict.json`` and ``<out>/VERDICT.md``."""
    verdict, notes = collect(folders)
    out = Path(out)
    write_json(out / "verdict.json", verdict)
    (out / "VERDICT.md").write_text(render_markdown(verdict, notes))
    return verdict


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runner.verdict", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="finished result folders of python -m benchmarks.run")
    p.add_argument("--out", default="docs/results/verdict")
    args = p.parse_args(argv)
    verdict = write_verdict(args.folders, args.out)
    print((Path(args.out) / "VERDICT.md").read_text())
    return verdict


if __name__ == "__main__":
    main()
