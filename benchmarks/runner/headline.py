"""The verdict's headline table: per data set and method, each COST variant's outcome and paired effect.

One row per (data set, method with COST rows), one column per variant (controls are not columns: each
variant's cell already rests on its control); a cell is the outcome and the paired Δm% vs the base run
and vs the matched control. ``HEADLINE.md`` is written next to ``VERDICT.md``; :func:`update_readme`
puts the same table between two marker lines of a README, so the README always shows the last verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["BEGIN", "END", "VARIANTS", "headline_markdown", "update_readme"]

#: the verdict's variants, always shown (a data set where one has not run says so); others follow
VARIANTS = ("paper", "authors", "rescale", "flatness")
BEGIN = "<!-- verdict headline: begin (python -m benchmarks.run --verdict ... --readme README.md) -->"
END = "<!-- verdict headline: end -->"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row["outcome"] == "never acted":
        return "never acted"
    return f"{row['outcome']} ({_signed(row['paired_vs_base_mean'])} / {_signed(row['paired_vs_control_mean'])})"


def headline_markdown(verdict: dict[str, Any]) -> str:
    """The table (markdown) and a line saying how to read it."""
    variants = list(VARIANTS)
    for d in verdict["datasets"].values():
        for r in d["rows"]:
            if r["outcome"] is not None and r["cost"] not in variants:
                variants.append(r["cost"])
    lines = ["| data set | method | margin δ | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for name, d in verdict["datasets"].items():
        by = {(r["method"], r["cost"]): r for r in d["rows"] if r["outcome"] is not None}
        margin = d.get("margin")
        for method in sorted({m for m, _ in by}):
            cells = [_cell(by.get((method, v))) for v in variants]
            lines.append(f"| {name} | {method} | {margin['delta']:g} |" if margin else f"| {name} | {method} | none |")
            lines[-1] += " " + " | ".join(cells) + " |"
    lines += ["", "Each cell: the outcome, then the paired Δm% (lower is better) of the COST run against its base run "
              "and against its matched control (the same steps and state change, no move), mean over paired seeds; "
              "the rule and the intervals are in `docs/results/verdict/VERDICT.md`."]
    return "\n".join(lines)


def update_readme(readme: str | Path, table: str) -> None:
    """Replace what lies between :data:`BEGIN` and :data:`END` in ``readme`` with ``table``."""
    path = Path(readme)
    text = path.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{path} has no '{BEGIN}' ... '{END}' block to write the headline into")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
