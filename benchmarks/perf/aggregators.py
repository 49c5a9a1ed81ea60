"""Microbenchmark: every method of lightning_cost against the same method in TorchJD and LibMTL,
on identical Jacobians ``J`` of shape ``[K, P]``.

Run::

    python -m benchmarks.perf.aggregators [--out results/perf_aggregators] [--quick]
        [--methods imtl,mgda] [--ks 2,3,10,40] [--ps 10000,1000000] [--budget 2.0]
        [--compare OLD.json]

What is timed is the work the training core does with ``J`` for that method:

* an :class:`~lightning_cost.aggregators.Aggregator`: ``method.aggregate(J)``, the call
  :meth:`MultiTaskMixin._mtl_aggregate` makes (after its own zero-row check, which is timed
  separately as ``mixin_check``: it is the mixin's cost, not the method's);
* a :class:`~lightning_cost.aggregators.LossWeighting`: what the mixin does when it has ``J``:
  ``w = method.loss_weights(losses)``, ``d = w @ J``, ``method.observe(losses)`` (and, for UW,
  the backward of ``method(losses)`` into its log-variances).

Peers, on the same ``J`` (float32, the dtype of a float32 model's gradients):

* TorchJD: ``aggregator(J)``.
* LibMTL: ``weighting.backward(losses, **kwargs)`` with its gradient computation replaced by
  ``J`` itself (no copy; none of these weightings writes into it) and its ``.grad`` write-back
  replaced by capturing the update. LibMTL's loss weightings (EW, DWA, RLW, UW) back-propagate
  their weighted loss: here the losses are ``L = J theta + L0`` with a leaf ``theta`` (built
  untimed before every call), so the timed backward computes ``J^T w`` into ``theta.grad``.

``floor`` is one ``w @ J`` (a single pass over ``J``): no method can be much faster than that.

Method: ``torch.set_num_threads(1)``; per cell (method, K, P) two warm-up calls each, then
repetitions in which the contestants run back to back in a rotating order (so that load drift
on the shared machine hits all of them alike); the reported time is the median, and
``ours/peer`` is the ratio of the medians (``paired`` in the JSON: the median of the per-
repetition ratios). The number of repetitions adapts to a time budget per cell (at least
``--min-reps``). ``agree`` is the cosine between our update and the peer's (1 = same
direction; random methods and methods with other defaults differ by design, see ``note``).

This module is the command line and the run; the contestants live in
:mod:`benchmarks.perf.aggregators_contestants`, one cell's timing in :mod:`benchmarks.perf.aggregators_timing`,
the tables in :mod:`benchmarks.perf.aggregators_render`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.perf.aggregators_render import fmt_ms, render, render_compare
from benchmarks.perf.aggregators_timing import bench_cell
from lightning_cost.aggregators import AVAILABLE

__all__ = ["KS", "PS", "main", "render", "render_compare", "run"]

KS = (2, 3, 10, 40)
PS = (10_000, 1_000_000)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    for name in ("torchjd", "LibMTL", "cvxpy", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run(methods: tuple[str, ...] = AVAILABLE, ks: tuple[int, ...] = KS, ps: tuple[int, ...] = PS,
        budget_s: float = 2.0, min_reps: int = 7, max_reps: int = 200, out_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None, clock: str = "wall") -> dict[str, Any]:
    torch.set_num_threads(1)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    rows = []
    with warnings.catch_warnings(), contextlib.suppress(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        for p in ps:
            for k in ks:
                for name in methods:
                    row = bench_cell(name, k, p, budget_s, min_reps, max_reps, clock)
                    rows.append(row)
                    log(f"  {name} K={k} P={p:.0e}: ours {fmt_ms(row, 'ours')} ms, torchjd {fmt_ms(row, 'torchjd')}, "
                        f"libmtl {fmt_ms(row, 'libmtl')} ({row['reps']} reps)")
                gc.collect()
    res = {"meta": {"threads": torch.get_num_threads(), "budget_s": budget_s, "min_reps": min_reps, "clock": clock,
                    "versions": _versions(), "seconds": time.perf_counter() - t0,
                    "timed": "ours: aggregate(J) / loss_weights + w @ J + observe; torchjd: agg(J); "
                             "libmtl: weighting.backward with J injected"},
           "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "aggregators.json").write_text(json.dumps(res, indent=1))
        (out / "aggregators.txt").write_text(render(rows) + "\n")
    return res


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in s.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf_aggregators", help="folder for aggregators.json / .txt")
    ap.add_argument("--methods", default=",".join(AVAILABLE))
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--ps", default=",".join(map(str, PS)))
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed repetitions per cell (approx.)")
    ap.add_argument("--min-reps", type=int, default=7)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="K in (2, 10), P = 1e4, short budget")
    ap.add_argument("--compare", help="an earlier aggregators.json: print the ratios before/after")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what the medians and ratios are of: wall time (default) or this thread's CPU time "
                         "(less sensitive to other processes; the other clock is kept in the JSON)")
    args = ap.parse_args(argv)
    ks, ps, budget = _ints(args.ks), _ints(args.ps), args.budget
    if args.quick:
        ks, ps, budget = (2, 10), (10_000,), min(budget, 0.3)
    methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
    res = run(methods, ks, ps, budget, args.min_reps, args.max_reps, args.out, clock=args.clock)
    print(render(res["rows"]))
    if args.compare:
        old = json.loads(Path(args.compare).read_text())["rows"]
        print("\nratios ours/peer (< 1: ours faster), before = " + args.compare)
        print(render_compare(old, res["rows"]))
        Path(args.out, "compare.txt").write_text(render_compare(old, res["rows"]) + "\n")
    print(f"\nwrote {Path(args.out) / 'aggregators.json'} in {res['meta']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
