"""The plain-text results table of a sweep's summary (:func:`results_table`)."""

from __future__ import annotations

from typing import Any

from benchmarks.toy.problem import init_key
from benchmarks.toy.settings import LABELS


def results_table(summary: dict[str, Any]) -> str:
    """A compact plain-text table: per method and flag, each init's first step on the Pareto set
    (``ok@step``) or its final distance to it (``no d=...``), the number of inits that reached it, the
    accepted teleports and the optimizer steps the training core skipped (failed aggregation), summed
    over the inits."""
    cfg = summary["config"]
    inits = [init_key(i) for i in cfg["inits"]]
    head = (f"{'method':<16}" + "".join(f"{k:>14}" for k in inits)
            + f"{'reached':>9}{'teleports':>11}{'skipped':>9}")
    lines = [head, "-" * len(head)]
    for method, by_flag in summary["results"].items():
        for flag in ("baseline", "cost"):
            if flag not in by_flag:
                continue
            cells, tele, skipped = [], 0, 0
            for k in inits:
                r = by_flag[flag].get(k)
                if r is None:
                    cells.append("-")
                    continue
                tele += r["teleports"]
                skipped += r["skipped_steps"]
                cells.append(f"ok@{r['first_pareto_step']}" if r["reached_pareto"]
                             else f"no d={r['final_pareto_distance']:.2f}")
            name = LABELS.get(method, method) + (" +COST" if flag == "cost" else "")
            n = sum(1 for k in inits if k in by_flag[flag])
            lines.append(f"{name:<16}" + "".join(f"{c:>14}" for c in cells)
                         + f"{summary['counts'][method][flag]:>6}/{n}" + f"{tele if flag == 'cost' else '':>11}"
                         + f"{skipped:>9}")
    return "\n".join(lines)
