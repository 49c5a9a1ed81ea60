"""The verdict: finished result folders collected into ``verdict.json`` and a readable ``VERDICT.md``.

    python -m benchmarks.run --verdict DIR1 DIR2 ... [--verdict-out docs/results/verdict]
    python -m benchmarks.runner.verdict DIR1 DIR2 ... [--out docs/results/verdict]
    python -m benchmarks.runner.verdict --propose-margin DIR1 ...   # print a margin per folder, write nothing

Each folder is one data set's runner output (``runs/*.json``, ``baselines/*.json``, and
``verdict_config.json`` with the config's ``verdict_margin``). ``verdict.json``::

    {"datasets": {"<name>": {"stl": {"<task>/<metric>": value}, "margin": {"delta", "why"} or null,
                             "rows": [{"method", "cost", "control_of", "seeds", "delta_m_mean", "delta_m_ci95",
                                       "mr", "paired_vs_base_mean", "paired_vs_base_ci95",
                                       "paired_vs_control_mean", "paired_vs_control_ci95", "margin",
                                       "teleports_per_run", "teleports_before_best", "trigger_ratio",
                                       "time_ratio_vs_base", "outcome", "code"}],
                             "code": {"versions": {"<fingerprint>": runs}, "unrecorded": runs}}}}

``cost`` is ``"none"`` or the COST variant; ``control_of`` the variant a control row is the matched
control of (``null`` for the others); ``seeds`` the number of runs; confidence intervals are
``[low, high]`` (95 %, Student t over the paired seeds); ``margin`` the data set's delta;
``teleports_before_best`` is ``{"mean", "runs_with_any", "runs"}``: accepted teleports applied before
the selected checkpoint, mean per run, how many runs had at least one, and of how many runs it is
known; ``trigger_ratio`` is ``{"majority": ..., "any": ...}`` (which rule it counts); undefined
numbers are ``null``; ``code`` counts the code versions
(:mod:`benchmarks.runner.provenance`) of the folder's runs, and per row of the runs its paired
differences read (its own, its base's, its control's).

**Outcome** of a COST row (Delta-m%: lower is better; "paired" is Delta-m%(+ COST) - Delta-m%(other)
seed by seed, with its 95 % interval). The first that holds:

1. ``never acted``: in every run no accepted teleport came before the selected checkpoint, and the
   runs equal their base (every paired difference is 0). A run that stopped at a checkpoint before its
   first teleport can still differ from its base: when the teleport spoiled the epochs after it, the
   run keeps an earlier checkpoint than its base did. That is COST acting, so such a row takes the
   rules below.
2. ``no effect``: the data set has a margin delta and the interval against the base lies inside
   ``[-delta, +delta]``; a difference smaller than the margin does not count, significant or not.
3. ``hurts``: the interval against the base lies above 0.
4. ``helps``: the interval against the base lies below 0 *and* the interval against the matched
   control lies below 0. A row with no matched control yet cannot be ``helps``.
5. ``inconclusive``: anything else (a row below its base without a matched control, or not below its
   control, says so in the statement).

Base rows (``cost: none``) and control rows get no outcome (``null``). A matched control of variant
``V`` is the variant whose preset has ``control_of: V`` (recorded in each run's JSON); it is paired
with the COST row of the same method, seed by seed.

**Choosing the margin.** Without a margin "no effect" is never concluded. The margin is set from the
base runs only, before the verdict is read, and written into the config with its justification
(``verdict_margin: {delta: ..., why: ...}``): delta = ``MARGIN_MULTIPLE`` (0.5) times the pooled
across-seed standard deviation of Delta-m% of the base methods that have COST rows (their ``none``
runs). A change smaller than half of what re-seeding the base method moves one run's Delta-m% is
taken as no practical effect. :func:`propose_margin` computes it from a finished folder.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import load_json, write_json
from benchmarks.runner.conflicts import RULES
from benchmarks.runner.provenance import code_versions
from benchmarks.runner.report import row_label
from benchmarks.runner.stats import mean_std, paired_difference, summarize

__all__ = ["MARGIN_MULTIPLE", "OUTCOMES", "collect", "verdict_row", "outcome", "propose_margin",
           "render_markdown", "write_verdict", "main"]

#: the margin is this many pooled across-seed standard deviations of the base methods' Delta-m%
MARGIN_MULTIPLE = 0.5
OUTCOMES = ("helps", "hurts", "no effect", "never acted", "inconclusive")


def _clean(v: Any) -> Any:
    """NaN and infinities as ``None`` (JSON has no NaN), recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _before_best(a: dict[str, Any]) -> dict[str, Any] | None:
    known = a["teleports_before_best_known"]
    if not known:
        return None
    return {"mean": a["teleports_before_best"][0], "runs_with_any": a["runs_acted_before_best"], "runs": known}


def verdict_row(a: dict[str, Any], margin: float | None = None, control: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """One row of ``verdict.json`` from an aggregate of :func:`~benchmarks.runner.stats.summarize`,
    the data set's margin and the paired difference to the matched control (``None``: none yet)."""
    p, c = a["paired"] or {}, control or {}
    row = _clean({
        "method": a["method"], "cost": a["cost"], "control_of": a.get("control_of"), "seeds": a["n"],
        "delta_m_mean": a["delta_m"][0], "delta_m_ci95": list(a["delta_m_ci95"]), "mr": a["mr"],
        "paired_vs_base_mean": p.get("mean"), "paired_vs_base_ci95": list(p["ci95"]) if p else None,
        "paired_vs_control_mean": c.get("mean"), "paired_vs_control_ci95": list(c["ci95"]) if c else None,
        "margin": margin if a["cost"] != "none" and not a.get("control_of") else None,
        "teleports_per_run": a["teleports"][0], "teleports_before_best": _before_best(a),
        "trigger_ratio": {rule: a[f"trigger_ratio_{rule}"][0] for rule in RULES},
        "time_ratio_vs_base": p.get("time_ratio"),
    })
    row["outcome"] = outcome(row)
    return row


def _interval(v: Any) -> tuple[float, float] | None:
    return (v[0], v[1]) if v and v[0] is not None and v[1] is not None else None


def outcome(row: dict[str, Any]) -> str | None:
    """The outcome of a COST row by the rule of the module docstring (``None``: a base or control row)."""
    if row["cost"] == "none" or row.get("control_of"):
        return None
    tb = row.get("teleports_before_best")
    silent = (tb and tb["runs"] == row["seeds"] and tb["runs_with_any"] == 0) or not row["teleports_per_run"]
    if silent and _same_as_base(row):
        return "never acted"
    base, ctrl, delta = _interval(row["paired_vs_base_ci95"]), _interval(row["paired_vs_control_ci95"]), row["margin"]
    if base and delta is not None and -delta <= base[0] and base[1] <= delta:
        return "no effect"
    if base and base[0] > 0:
        return "hurts"
    if base and base[1] < 0 and ctrl and ctrl[1] < 0:
        return "helps"
    return "inconclusive"


def _same_as_base(row: dict[str, Any]) -> bool:
    """Whether the paired differences against the base are all exactly 0 (or unknown); rule 1 of the
    module docstring says why a silent row must also pass this."""
    mean, ci = row.get("paired_vs_base_mean"), row.get("paired_vs_base_ci95")
    return mean in (None, 0.0) and (ci is None or list(ci) == [0.0, 0.0])


def _controls(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(method, variant): the per-run rows of its matched control}``."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("control_of"):
            out.setdefault((r["method"], r["control_of"]), []).append(r)
    return out


def _margin(folder: Path) -> dict[str, Any] | None:
    settings = load_json(folder / "verdict_config.json") or {}
    return settings.get("verdict_margin")


def _load(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    runs = [r for p in sorted((folder / "runs").glob("*.json")) if (r := load_json(p)) is not None]
    runs.sort(key=lambda r: (r["method"], r["cost"] != "none", r["cost"], r["seed"]))
    bases = [r for p in sorted((folder / "baselines").glob("*.json")) if (r := load_json(p)) is not None]
    if not runs:
        raise FileNotFoundError(f"{folder}: no runs/*.json (not a finished benchmarks.run folder)")
    return runs, bases


def _add_code_versions(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    """Sets each row's ``code``: the code versions of the runs its paired differences read (its own,
    its base's and its matched control's; :func:`~benchmarks.runner.provenance.code_versions`)."""
    for row in rows:
        wanted = {(row["method"], row["cost"]), (row["method"], "none")}
        if row["cost"] != "none" and not row.get("control_of"):
            wanted |= {(r["method"], r["cost"]) for r in runs
                       if r["method"] == row["method"] and (r.get("control_of") or "") == row["cost"]}
        row["code"] = code_versions(r for r in runs if (r["method"], r["cost"]) in wanted)


def _code_notes(name: str, code: dict[str, Any]) -> list[str]:
    """A note when a folder's runs were trained by more than one code version, or by unrecorded code."""
    n, unrecorded = len(code["versions"]), code["unrecorded"]
    if n + (unrecorded > 0) <= 1:
        return []
    parts = [f"{fp} ({k} runs)" for fp, k in code["versions"].items()]
    if unrecorded:
        parts.append(f"unrecorded ({unrecorded} runs, trained before records named their code)")
    return [f"{name}: the runs were trained by more than one code version: {', '.join(parts)}. A paired "
            "difference between runs of two versions holds the code change's effect too "
            "(`python -m benchmarks.runner.reproduce` retrains cached runs and compares them)."]


def collect(folders: Sequence[str | Path]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``({"datasets": {...}}, {data set: notes})`` from result folders (a data set in two folders: the
    later one wins). The notes say which metrics are undefined (NaN, ``null`` in the JSON) and why."""
    datasets: dict[str, Any] = {}
    notes: dict[str, list[str]] = {}
    for folder in map(Path, folders):
        runs, bases = _load(folder)
        name = runs[0]["dataset"]
        s, margin = summarize(runs, bases, name), _margin(folder)
        controls = _controls(s["rows"])
        rows = []
        for a in s["agg"]:
            own = [r for r in s["rows"] if (r["method"], r["cost"]) == (a["method"], a["cost"])]
            ctrl = controls.get((a["method"], a["cost"]))
            rows.append(verdict_row(a, margin["delta"] if margin else None,
                                    paired_difference(own, ctrl) if ctrl and not a.get("control_of") else None))
        _add_code_versions(rows, runs)
        datasets[name] = {"stl": _clean(s["baseline"]), "margin": margin, "rows": rows,
                          "code": code_versions([*runs, *bases])}
        notes[name] = s["notes"] + _code_notes(name, datasets[name]["code"])
    return {"datasets": datasets}, notes


def propose_margin(runs: list[dict[str, Any]], baselines: list[dict[str, Any]], dataset: str,
                   multiple: float = MARGIN_MULTIPLE, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """A margin by the rule of the module docstring: ``multiple`` times the pooled across-seed std of
    Delta-m% over the base (``none``) runs of the methods that have COST rows (controls aside; or
    ``methods``, the config's ``cost_methods``, before any COST row has run, which is when a margin
    should be fixed), with a draft ``why``. For a human to check and write into the config; nothing
    reads it from here."""
    s = summarize(runs, baselines, dataset)
    with_cost = set(methods) if methods else \
        {a["method"] for a in s["agg"] if a["cost"] != "none" and not a.get("control_of")}
    spread = {}
    for m in sorted(with_cost):
        xs = [r["delta_m"] for r in s["rows"] if (r["method"], r["cost"]) == (m, "none") and math.isfinite(r["delta_m"])]
        if len(xs) >= 2:
            spread[m] = (mean_std(xs)[1], len(xs))
    if not spread:
        raise ValueError(f"{dataset}: no base method of a COST row has 2 or more finite Delta-m% runs")
    pooled = math.sqrt(sum((n - 1) * sd**2 for sd, n in spread.values()) / sum(n - 1 for _, n in spread.values()))
    delta = round(multiple * pooled, 2)
    parts = ", ".join(f"{m} {sd:.2f} over {n} seeds" for m, (sd, n) in spread.items())
    why = (f"{multiple:g} x the pooled across-seed std ({pooled:.2f}) of Delta-m% of the base runs of the "
           f"methods with COST rows ({parts}), from the cached runs")
    return {"delta": delta, "multiple": multiple, "pooled_std": pooled,
            "std": {m: sd for m, (sd, _) in spread.items()}, "why": why}


def _f(v: Any, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci(v: Any) -> str:
    return "—" if not v or v[0] is None else f"[{v[0]:.2f}, {v[1]:.2f}]"


def _label(r: dict[str, Any]) -> str:
    return row_label(r["method"], r["cost"], r.get("control_of"))


def _before(r: dict[str, Any]) -> str:
    tb = r["teleports_before_best"]
    if r["cost"] == "none":
        return "—"
    return "unknown" if tb is None else f"{tb['mean']:.1f} ({tb['runs_with_any']}/{tb['runs']} runs)"


def _why(r: dict[str, Any]) -> str:
    """What a row's outcome rests on, for the plain statement."""
    base, ctrl = _interval(r["paired_vs_base_ci95"]), _interval(r["paired_vs_control_ci95"])
    if r["outcome"] == "never acted":
        return f" (in none of its {r['seeds']} runs)"
    if r["outcome"] == "inconclusive" and base and base[1] < 0:
        return " (below its base, but no matched control yet)" if ctrl is None else " (below its base, not its control)"
    return ""


def _statement(name: str, rows: list[dict[str, Any]], margin: dict[str, Any] | None) -> str:
    by: dict[str, list[str]] = {what: [] for what in OUTCOMES}
    for r in rows:
        if r["outcome"]:
            by[r["outcome"]].append(_label(r) + _why(r))
    parts = [f"{what} for {', '.join(who)}" for what, who in by.items() if who]
    if not parts:
        return f"{name}: no COST row."
    tail = "" if margin else " No margin is set, so 'no effect' cannot be concluded here."
    if by["never acted"]:
        tail += " Never acted: no accepted teleport came before the selected checkpoint, and the runs equal their base."
    return f"{name}: COST " + "; ".join(parts) + "." + tail


_HEADER = ("| row | seeds | Δm% | Δm% 95% CI | paired Δ vs base | 95% CI | paired Δ vs control | 95% CI | MR | "
           "teleports/run | before best (runs ≥ 1) | trigger ratio (majority / any) | time × base | outcome |")


def _table_row(r: dict[str, Any]) -> str:
    tr = r["trigger_ratio"]
    return (f"| {_label(r)} | {r['seeds']} | {_f(r['delta_m_mean'])} | {_ci(r['delta_m_ci95'])} | "
            f"{_f(r['paired_vs_base_mean'])} | {_ci(r['paired_vs_base_ci95'])} | {_f(r['paired_vs_control_mean'])} | "
            f"{_ci(r['paired_vs_control_ci95'])} | {_f(r['mr'])} | {_f(r['teleports_per_run'], 1)} | {_before(r)} | "
            f"{_f(tr['majority'])} / {_f(tr['any'])} | {_f(r['time_ratio_vs_base'])} | {r['outcome'] or ''} |")


_RULE = ("Δm% (eq. 14, lower is better) against single-task baselines; 'paired Δ' is Δm%(+ COST) - Δm%(base or "
         "matched control) seed by seed, with its 95 % Student-t interval; 'before best' is the accepted teleports "
         "applied before the selected checkpoint (mean per run; runs with at least one). Outcome, the first that "
         "holds: **never acted** (no teleport before the selected checkpoint in any run); **no effect** (the "
         "interval vs base inside ±δ, the data set's margin; no margin: never concluded); **hurts** (interval vs "
         "base above 0); **helps** (interval vs base *and* vs the matched control below 0; no control yet: never "
         "concluded); **inconclusive** otherwise. Controls and base rows get no outcome.")


def render_markdown(verdict: dict[str, Any], notes: dict[str, list[str]] | None = None) -> str:
    """``VERDICT.md``: the rule, then one table, its margin and one plain statement per data set, then its notes."""
    lines = ["# Verdict: does COST help?", "", _RULE, ""]
    for name, d in verdict["datasets"].items():
        m = d.get("margin")
        lines += [f"## {name}", "", f"Margin: δ = {m['delta']:g} Δm% points ({m['why']})." if m else
                  "Margin: none set, so 'no effect' cannot be concluded for this data set.", "",
                  _HEADER, "|" + "---|" * 14]
        lines += [_table_row(r) for r in d["rows"]]
        lines += ["", _statement(name, d["rows"], m)] + [f"\nNote: {n}" for n in (notes or {}).get(name, [])] + [""]
    return "\n".join(lines)


def write_verdict(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Collect ``folders`` and write ``<out>/verdict.json``, ``<out>/VERDICT.md`` and ``<out>/HEADLINE.md``
    (:mod:`benchmarks.runner.headline`)."""
    from benchmarks.runner.headline import headline_markdown

    verdict, notes = collect(folders)
    out = Path(out)
    write_json(out / "verdict.json", verdict)
    (out / "VERDICT.md").write_text(render_markdown(verdict, notes))
    (out / "HEADLINE.md").write_text(headline_markdown(verdict) + "\n")
    return verdict


def _print_proposals(folders: Sequence[str | Path], multiple: float, methods: Sequence[str] | None) -> dict[str, Any]:
    out = {}
    for folder in map(Path, folders):
        runs, bases = _load(folder)
        name = runs[0]["dataset"]
        out[name] = prop = propose_margin(runs, bases, name, multiple, methods)
        print(f"# {name}\nverdict_margin: {{delta: {prop['delta']}, why: \"{prop['why']} in {folder}\"}}")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runner.verdict", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="finished result folders of python -m benchmarks.run")
    p.add_argument("--out", default="docs/results/verdict")
    p.add_argument("--propose-margin", action="store_true", help="print a verdict_margin per folder; write nothing")
    p.add_argument("--margin-multiple", type=float, default=MARGIN_MULTIPLE,
                   help="the margin in pooled across-seed stds of the base methods' Delta-m%%")
    p.add_argument("--methods", nargs="+", default=None,
                   help="with --propose-margin: the methods with COST rows (default: those that have run)")
    args = p.parse_args(argv)
    if args.propose_margin:
        return _print_proposals(args.folders, args.margin_multiple, args.methods)
    verdict = write_verdict(args.folders, args.out)
    print((Path(args.out) / "VERDICT.md").read_text())
    return verdict


if __name__ == "__main__":
    main()
