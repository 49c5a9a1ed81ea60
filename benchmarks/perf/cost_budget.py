"""What COST costs: FairGrad + COST vs FairGrad on a short MultiMNIST run, over the teleport budget.

    python -m benchmarks.perf.cost_budget [--quick] [--out DIR] [--seeds 0] [--repeats 1]
        [--budgets 0 1 2 4 8] [--inner-steps 10 3@3e-3 1@1e-2 1@1e-2:nohtr]
        [--sections budget levers agreement]

Sections (``--sections``, default ``budget``):

* ``budget``: the end-to-end training time (``trainer.fit``: training + the per-epoch validation) of
  FairGrad + COST against FairGrad on the settings of ``benchmarks/configs/cost_budget.yaml`` (
  8000 training composites, 2 epochs, batch 256, Adam lr 1e-3, FairGrad alpha 2), with Delta-m%
  (eq. 14, against single-task baselines trained the same way) beside it. The ceil(K/2) trigger never
  fires on MultiMNIST (K = 2) at these settings, so the budget axis *forces* teleports:
  schedule ``max_per_epoch = b`` and ``every = steps_per_epoch // b`` (evenly spaced, the
  callback's own option), for ``b`` in ``--budgets`` teleports per epoch, and one curve per
  ``--inner-steps`` value (``T[@LR][:nohtr]``: one inner loop of T steps at inner lr LR, without the LoRA
  teleporter's gain search, optionally without HTR). ``cost-default`` is COST exactly as cost_budget.yaml configures it (trigger-driven); ``cost-b0``
  checks the trigger and never teleports. Runs reuse :func:`benchmarks.runner.train.train_one` (the runner's
  module, callbacks, epoch selection and test). Each repeat runs every point once, in a shuffled
  order, and every time ratio divides by the FairGrad run *of the same repeat*; the table gives the
  median over repeats and seeds, and, less noisy, FairGrad's median time plus the run's own
  measured teleport seconds over FairGrad's. Delta-m% comes from the first repeat (training is
  deterministic per seed).
* ``levers``: COST's speed levers: (2a) inner steps x inner learning rate: seconds per teleport,
  loss drift, displacement, gradient-norm ratio, ``L_t``/``L_g`` over the inner loop; (2b) the step
  time of FairGrad + COST's trigger vs FairGrad (both use the one Jacobian), and of LS with the exact
  trigger and with the representation trigger, on MultiMNIST and Yeast.
* ``agreement``: how often the representation trigger (``trigger={"on": "representation"}``, both
  reductions) agrees with the exact one, step by step, on MultiMNIST (FairGrad, the budget's settings),
  Yeast (FairGrad, K = 14) and a synthetic regression problem where conflicts are frequent (LS, K = 4).

Writes ``DIR/cost_budget.json`` (everything, raw runs included), ``DIR/cost_budget.txt`` (the
tables) and ``DIR/cost_budget.png`` (time ratio and Delta-m% against the budget). Single-task
baselines are trained once and cached in ``DIR/baselines`` (``--baselines-from`` reads a runner's
``baselines/`` folder instead). One torch thread (``--threads``): the machines are shared, read ratios.

This module is the command line and the run; the sizes and the runner's configuration live in
:mod:`benchmarks.perf.cost_budget_config`, the ``budget`` section in :mod:`benchmarks.perf.cost_budget_curve`,
``levers`` in :mod:`benchmarks.perf.levers`, ``agreement`` in :mod:`benchmarks.perf.agreement`, the plot and
the tables in :mod:`benchmarks.perf.cost_budget_report`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_json
from benchmarks.perf.cost_budget_config import BUDGET_CONFIG, make_config, runner_config
from benchmarks.perf.cost_budget_curve import TARGET_RATIO, bench_budget
from benchmarks.perf.cost_budget_report import plot_budget, render

__all__ = ["BUDGET_CONFIG", "TARGET_RATIO", "build_parser", "main", "make_config", "run", "runner_config"]


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = make_config(args.quick)
    res: dict[str, Any] = {"meta": {
        "quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(), "sections": list(args.sections),
        "command": "python -m benchmarks.perf.cost_budget " + " ".join(args.argv)}}
    start = time.perf_counter()
    if "budget" in args.sections:
        log("1. budget curve ...")
        res["budget"] = bench_budget(args, sizes, out, log)
        plot_budget(res["budget"], out / "cost_budget.png")
    cfg = runner_config(args.quick, args.threads)
    if "levers" in args.sections:
        from benchmarks.perf.levers import lever_inner_steps, lever_step_costs

        log("2. levers ...")
        res["levers"] = {"inner_steps": lever_inner_steps(sizes, cfg, log), "step_costs": lever_step_costs(sizes, cfg)}
    if "agreement" in args.sections:
        from benchmarks.perf.agreement import bench_agreement

        log("3. agreement ...")
        res["agreement"] = bench_agreement(sizes, cfg, log)
    res["meta"]["seconds"] = time.perf_counter() - start
    text = render(res)
    (out / "cost_budget.txt").write_text(text + "\n")
    write_json(out / "cost_budget.json", res)
    log("\n" + text)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.cost_budget", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data; not a measurement)")
    p.add_argument("--out", default="results/cost_budget")
    p.add_argument("--sections", nargs="+", default=["budget"], choices=["budget", "levers", "agreement"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (each runs every point once)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="forced teleports per epoch")
    p.add_argument("--inner-steps", nargs="+", default=None,
                   help="one budget curve per value: T[@LR][:nohtr] (T inner steps, inner lr LR (default: the "
                        "outer lr), ':nohtr' without HTR), e.g. 10 3@3e-3 1@1e-2:nohtr")
    p.add_argument("--baselines-from", type=Path, default=None,
                   help="read the single-task baselines from a runner's baselines/ folder instead of training them")
    p.add_argument("--rerun", action="store_true", help="ignore cached runs in --out")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    main()
