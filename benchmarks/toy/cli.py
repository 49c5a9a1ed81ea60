"""The command line, ``python -m benchmarks.toy`` (:func:`main`): the sweep's options, or ``--replot``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.toy.plot import plot_results
from benchmarks.toy.problem import INITS, PARETO_TOL
from benchmarks.toy.settings import DEFAULT_LR, DEFAULT_STEPS, METHODS, PAPER_BETAS, PAPER_LR, rescaled_betas
from benchmarks.toy.sweep import _summarise, run_sweep
from benchmarks.toy.table import results_table

#: The ``--help`` description: the first line of the package's docstring.
_DESCRIPTION = ("The 2-task, 2-parameter toy problem (CAGrad / Nash-MTL / FAMO; the COST paper's Fig. 6) "
                "in Lightning.")


def _parse_init(s: str) -> tuple[float, float]:
    if "," in s:
        a, b = s.strip("()").split(",")
        return float(a), float(b)
    return INITS[int(s)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy", description=_DESCRIPTION)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per run ({DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate ({DEFAULT_LR:g})")
    p.add_argument("--betas", type=float, nargs=2, default=None,
                   help="Adam betas (default: rescaled to lr, see rescaled_betas; (0.9, 0.999) at lr 1e-3)")
    p.add_argument("--out", type=Path, default=Path("toy_out"), help="output folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"registry names ({' '.join(METHODS)})")
    p.add_argument("--inits", nargs="+", default=None,
                   help="indices into INITS (0-4) or 'x1,x2' (default: all five)")
    p.add_argument("--flags", choices=("both", "baseline", "cost"), default="both", help="with/without COST")
    p.add_argument("--l1-scale", default="paper",
                   help="'paper' (0.1 for nashmtl and famo, 1 for the others) or one number for every method")
    p.add_argument("--record-every", type=int, default=10, help="record x every N steps (10)")
    p.add_argument("--tol", type=float, default=PARETO_TOL, help=f"Pareto-set distance tolerance ({PARETO_TOL})")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one process each (2)")
    p.add_argument("--replot", action="store_true", help="only redraw toy.png and the table from DIR")
    a = p.parse_args(argv)
    if a.replot:
        data = json.loads((a.out / "toy_trajectories.json").read_text())
        plot_results(data["runs"], a.out / "toy.png")
        summary = _summarise(data["config"], data["runs"])
        print(results_table(summary))
        return summary
    inits = INITS if a.inits is None else tuple(_parse_init(s) for s in a.inits)
    flags = {"both": (False, True), "baseline": (False,), "cost": (True,)}[a.flags]
    l1 = None if a.l1_scale == "paper" else float(a.l1_scale)
    betas = rescaled_betas(a.lr) if a.betas is None else tuple(a.betas)
    equiv = a.steps * a.lr / PAPER_LR
    setting = ("the papers' setting" if a.lr == PAPER_LR and tuple(betas) == PAPER_BETAS else
               f"time-rescaled: ~{equiv:,.0f} steps of the papers' lr 1e-3 / betas (0.9, 0.999); the papers ran "
               f"35k-100k" if a.betas is None else "custom betas")
    print(f"Toy (COST paper Fig. 6) through Lightning: {len(a.methods)} methods x {len(flags)} flag(s) x "
          f"{len(inits)} init(s); Adam {a.steps} steps, lr {a.lr:g}, betas ({betas[0]:g}, {betas[1]:g}) "
          f"[{setting}]; l1_scale {a.l1_scale}; Pareto tolerance {a.tol:g}; jobs {a.jobs}", flush=True)
    # The toy runs on the CPU; with no GPU visible torch skips an NVML probe that Adam's step makes each time.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    summary = run_sweep(a.out, a.methods, inits, a.steps, a.lr, betas, l1, flags, a.record_every, a.tol, a.jobs)
    print(results_table(summary))
    print(f"wall time {summary['config']['wall_seconds']:.1f}s; wrote {a.out / 'toy_summary.json'}, "
          f"{a.out / 'toy_trajectories.json'}, {a.out / 'toy.png'}")
    return summary
