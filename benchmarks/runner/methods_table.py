"""``docs/results/methods/METHODS.md``: every registered method on each data set, from the grid's cached
runs (Delta-m%, MR) and the step-time benchmark (:mod:`benchmarks.perf.methods`, time and memory over LS).

Run (it also rewrites ``methods_perf.md`` from ``methods_perf.json``)::

    python -m benchmarks.runner.methods_table [--out docs/results/methods] [--datasets yeast birds tox21 multimnist]

Reads ``<out>/<data set>/runs/*__cost-none__*.json`` and ``<out>/<data set>/baselines/*.json`` (what
``python -m benchmarks.run --config benchmarks/configs/methods/<data set>.yaml`` caches) and
``<out>/methods_perf.json``; a data set or method not run yet is left out, or shows ``-``, and the table
says how many seeds each row has. Delta-m% (eq. 14) and MR are :func:`benchmarks.runner.stats.summarize`'s:
MR is the mean rank over the data set's metrics among the methods that have runs there.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import finite_mean, fmt, load_json

__all__ = ["DATASETS", "md_table", "perf_markdown", "load_summary", "dataset_table", "overall_mr", "methods_markdown",
           "main"]

DATASETS = ("yeast", "birds", "tox21", "multimnist")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table's lines (cells through :func:`~benchmarks.common.fmt`)."""
    cells = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in cells)]


def _machine_line(perf: dict[str, Any] | None) -> str:
    if not perf:
        return "Machine: no step-time benchmark yet (run `python -m benchmarks.perf.methods`)."
    m = perf["machine"]
    load = m.get("load_avg_start", [float("nan")])[0]
    busy = (f" Load average {load:.1f} at the start, {m.get('load_avg_end', [load])[0]:.1f} at the end, on "
            f"{m['cores']} cores: the machine was shared, so absolute times are inflated; the ratios are the result.") \
        if load >= 1.0 else ""
    note = f" {perf['note']}" if perf.get("note") else ""
    return (f"Machine: {m['cpu']}, {m['cores']} cores, 1 torch thread per process, torch {m['torch']}, "
            f"Python {m['python']}.{busy}{note}")


def _perf_cells(row: dict[str, Any] | None) -> list[Any]:
    if not row or "error" in row:
        return ["-", "-", "-", "-"]
    return [1e3 * row["step_s"], row["time_ratio_vs_ls"], f"{row['peak_rss_mib']:.0f}", f"{row['rss_diff_mib_vs_ls']:+.0f}"]


def perf_markdown(perf: dict[str, Any]) -> str:
    """``methods_perf.md``: one table per setup and the ratio table, with the command and the machine."""
    lines = ["# Time per training step and peak memory of every method, over LS", "",
             f"Made by `{perf['command']}`. {_machine_line(perf)}", "",
             f"Each (setup, method) in a fresh process: {perf['warmup']} warm-up steps, then the median of "
             f"{perf['steps']} timed steps through a Lightning Trainer (no validation). x LS: over the mean of the "
             "LS runs just before and after it (LS runs interleaved, drift = last LS / first LS). Peak RSS: the "
             "child's `ru_maxrss` at its end (imports, data, model, solver): the peak of the process's life, so where "
             "loading the data peaks higher than training does (MultiMNIST), a method's extra memory is hidden "
             "(+0).", ""]
    for r in perf["setups"]:
        lines += [f"## {r['setup']}", "", "LS runs (ms): " + ", ".join(f"{1e3 * s:.1f}" for s in r["ls_runs_s"])
                  + f"; drift {r['ls_drift']:.2f}", ""]
        lines += md_table(["method", "step ms", "time x LS", "peak RSS MiB", "MiB vs LS"],
                          [[m, *_perf_cells(row)] for m, row in r["methods"].items()]) + [""]
    names = [r["setup"] for r in perf["setups"]]
    methods = list(dict.fromkeys(m for r in perf["setups"] for m in r["methods"]))
    lines += ["## Time per step over LS, all setups", ""]
    lines += md_table(["method", *names], [[m, *(r["methods"].get(m, {}).get("time_ratio_vs_ls") for r in perf["setups"])]
                                          for m in methods])
    errors = [f"- {r['setup']} {m}: {row['error'].splitlines()[-1]}" for r in perf["setups"]
              for m, row in r["methods"].items() if "error" in row]
    return "\n".join(lines + ([""] + ["Failed runs:"] + errors if errors else [])) + "\n"


def load_summary(folder: Path) -> dict[str, Any] | None:
    """:func:`~benchmarks.runner.stats.summarize` of a data set's cached runs without COST (``None``: no run yet)."""
    from benchmarks.runner.stats import summarize

    runs = [r for p in sorted((folder / "runs").glob("*__cost-none__seed*.json")) if (r := load_json(p))]
    bases = [b for p in sorted((folder / "baselines").glob("*.json")) if (b := load_json(p))]
    if not runs:
        return None
    return summarize(runs, bases, runs[0].get("dataset", folder.name))


def _perf_rows(perf: dict[str, Any] | None, setup: str) -> dict[str, Any]:
    found = [r for r in (perf or {}).get("setups", []) if r["setup"] == setup]
    return found[0]["methods"] if found else {}


def dataset_table(summary: dict[str, Any], perf_rows: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """One data set's rows, in registry order: Delta-m% mean ± std (seeds), MR, time and memory over LS."""
    agg = {a["method"]: a for a in summary["agg"] if a["cost"] == "none"}
    rows = []
    for m in methods:
        a, p = agg.get(m), perf_rows.get(m)
        if a is None and p is None:
            continue
        dm = f"{a['delta_m'][0]:.2f} ± {a['delta_m'][1]:.2f}" if a and math.isfinite(a["delta_m"][0]) else "-"
        mr = a["mr"] if a else None
        cells = _perf_cells(p)
        rows.append([m, dm, str(a["n"]) if a else "0", mr, cells[1], cells[3]])
    return md_table(["method", "Δm% (mean ± std)", "seeds", "MR", "time/step x LS", "peak RSS vs LS (MiB)"], rows)


def overall_mr(per_dataset: dict[str, dict[str, float]]) -> list[tuple[str, float, int]]:
    """``(method, mean of its per-data-set MR, how many data sets)``, best first (finite MRs only)."""
    methods = list(dict.fromkeys(m for ranks in per_dataset.values() for m in ranks))
    out = []
    for m in methods:
        vals = [ranks[m] for ranks in per_dataset.values() if m in ranks and math.isfinite(ranks[m])]
        if vals:
            out.append((m, finite_mean(vals), len(vals)))
    return sorted(out, key=lambda t: (t[1], t[0]))


def _dataset_section(name: str, summary: dict[str, Any] | None, perf: dict[str, Any] | None,
                     methods: Sequence[str]) -> list[str]:
    grid = f"python -m benchmarks.run --config benchmarks/configs/methods/{name}.yaml --workers 1"
    head = [f"## {name}", "", f"Grid: `{grid}`; time and memory: `python -m benchmarks.perf.methods "
            f"--datasets {name}` (details in methods_perf.md). {_machine_line(perf)}", ""]
    if summary is None:
        return head + ["No grid run cached yet: run the grid command above (finished runs are reused).", ""]
    k = len(summary["higher_is_better"])  # one test metric per task on these benchmarks
    ran = {a["method"] for a in summary["agg"] if a["cost"] == "none"}
    missing = [f"- Not run: {m}: {why_not_run(m, k)}" for m in methods if m not in ran]
    return (head + dataset_table(summary, _perf_rows(perf, name), methods) + [""]
            + [f"- Note: {n}" for n in summary["notes"]] + missing + [""])


def why_not_run(method: str, k: int) -> str:
    """Why a method has no finished run: the error it raises on a random ``K x 8`` Jacobian if it is undefined
    at this ``K``, else a pointer to the runner's log (a failure during training)."""
    import torch

    from lightning_cost.aggregators import aggregator_class
    from lightning_cost.aggregators.base import Aggregator

    cls = aggregator_class(method)
    if issubclass(cls, Aggregator):
        agg = cls(**({"num_tasks": k} if "num_tasks" in inspect.signature(cls).parameters else {}))
        try:
            if agg.uses_losses:
                agg.observe_losses(torch.ones(k))
            agg.aggregate(torch.randn(k, 8, generator=torch.Generator().manual_seed(0)))
        except ValueError as err:
            return f"undefined at K = {k} with its defaults ({err})"
    return "no run finished (the runner's log gives each failed run's error)"


def methods_markdown(summaries: dict[str, dict[str, Any] | None], perf: dict[str, Any] | None,
                     methods: Sequence[str], min_methods: int = 30) -> str:
    """``METHODS.md``: one table per data set, the fingerprint MLP's ratios, and the overall MR table."""
    lines = ["# Every registered method: Δm%, mean rank, time per step and memory over LS", "",
             "Made by `python -m benchmarks.runner.methods_table --out docs/results/methods` from the cached grid "
             "runs and methods_perf.json. Δm% (eq. 14, lower is better) is against the single-task baselines; "
             "MR is the mean rank over the data set's test metrics among the methods with runs there (lower is "
             "better). Time per step and peak RSS are over LS in the same benchmark, one process per method.", ""]
    for name, summary in summaries.items():
        lines += _dataset_section(name, summary, perf, methods)
    fp = _perf_rows(perf, "fingerprint_mlp")
    if fp:
        lines += ["## Fingerprint MLP (ECFP4 2048 -> 512 -> 256, K = 12, batch 128; benchmarks.perf.bench)", "",
                  "`python -m benchmarks.perf.methods --datasets fingerprint_mlp`.", ""]
        lines += md_table(["method", "step ms", "time x LS", "peak RSS MiB", "MiB vs LS"],
                          [[m, *_perf_cells(fp.get(m))] for m in methods if m in fp]) + [""]
    ranks = {n: {a["method"]: a["mr"] for a in s["agg"] if a["cost"] == "none"} for n, s in summaries.items() if s}
    counted = {n: r for n, r in ranks.items() if len(r) >= min_methods}
    left = [f"{n} ({len(r)} methods)" for n, r in ranks.items() if n not in counted]
    lines += ["## Overall mean rank", "", "The mean over data sets of each method's MR there (data sets: "
              + (", ".join(f"{n} ({len(r)} methods ranked)" for n, r in counted.items()) or "none yet") + "). "
              f"A data set counts once at least {min_methods} methods have runs there (an MR among a few methods "
              "is on another scale)" + (f"; left out: {', '.join(left)}." if left else "."), ""]
    lines += md_table(["method", "mean MR", "data sets"], [[m, v, str(n)] for m, v, n in overall_mr(counted)])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    from lightning_cost.aggregators import REGISTERED

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/results/methods"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--min-methods", type=int, default=30, help="methods with runs a data set needs to count in the overall MR")
    args = p.parse_args(argv)
    summaries = {d: load_summary(args.out / d) for d in args.datasets}
    perf = load_json(args.out / "methods_perf.json")
    text = methods_markdown(summaries, perf, REGISTERED, args.min_methods)
    args.out.mkdir(parents=True, exist_ok=True)
    if perf:  # the perf tables too, so that a change of this layout needs no new measurement
        (args.out / "methods_perf.md").write_text(perf_markdown(perf))
    (args.out / "METHODS.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
