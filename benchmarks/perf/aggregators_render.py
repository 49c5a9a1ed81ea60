"""The aggregator microbenchmark's tables: the rows (``aggregators.txt``) and the before/after ratios
(``compare.txt``)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt, text_table

# --------------------------------------------------------------------------- output


def fmt_ms(row: dict[str, Any], who: str) -> str:
    r = row.get(who)
    if r is None:
        return "-"
    if "error" in r:
        return "err"
    v = r["median_ms"]
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def render(rows: list[dict[str, Any]]) -> str:
    header = ["method", "K", "P", "reps", "ours ms", "torchjd", "ours/tjd", "cos", "libmtl", "ours/lib", "cos",
              "floor", "ours/floor", "mixin chk"]
    cells = [[r["method"], str(r["K"]), f"{r['P']:.0e}", str(r["reps"]), fmt_ms(r, "ours"), fmt_ms(r, "torchjd"),
              fmt(r.get("ratio_torchjd")), fmt(r.get("cos_torchjd"), 3), fmt_ms(r, "libmtl"), fmt(r.get("ratio_libmtl")),
              fmt(r.get("cos_libmtl"), 3), fmt_ms(r, "floor"), fmt(r.get("ratio_floor"), 1), fmt_ms(r, "mixin_check")]
             for r in rows]
    out = text_table("", header, cells).splitlines()
    errors = [f"  {r['method']} K={r['K']} P={r['P']:.0e} {who}: {r[who]['error']}"
              for r in rows for who in ("ours", "torchjd", "libmtl") if isinstance(r.get(who), dict) and "error" in r[who]]
    if errors:
        out += ["", "errors:", *errors]
    notes = sorted({(r["method"], peer, text) for r in rows for peer, text in r.get("notes", {}).items()})
    if notes:
        out += ["", "what the peers compute differently:", *(f"  {m} / {p}: {t}" for m, p, t in notes)]
    return "\n".join(out)


def _pair(row: dict[str, Any], peer: str) -> str:
    """``ratio (paired)`` of one row and peer."""
    r, q = row.get(f"ratio_{peer}"), row.get(f"paired_ratio_{peer}")
    return "-" if r is None else f"{r:.2f} ({q:.2f})"


def render_compare(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """Before/after table of the ratios ours/peer: ratio of the medians (median of the paired ratios)."""
    key = lambda r: (r["method"], r["K"], r["P"])  # noqa: E731
    before = {key(r): r for r in old}
    header = ["method", "K", "P", "/tjd before", "/tjd after", "/lib before", "/lib after", "ours ms before", "after"]
    cells = []
    for r in new:
        b = before.get(key(r), {})
        cells.append([r["method"], str(r["K"]), f"{r['P']:.0e}", _pair(b, "torchjd"), _pair(r, "torchjd"),
                      _pair(b, "libmtl"), _pair(r, "libmtl"), fmt_ms(b, "ours") if b else "-", fmt_ms(r, "ours")])
    return text_table("", header, cells)
