"""Overhead of :class:`~lightning_cost.ConflictMonitor` on a real data set, and its summary there.

Run::

    python -m benchmarks.perf.monitor_overhead [--dataset yeast] [--method ls] [--steps 100] [--reps 10]
        [--summary-steps 500] [--batch-size 64] [--out docs/results/perf]

Trains the benchmark model of ``--dataset`` (the registry's default, e.g. the multi-label MLP on Yeast)
with ``--method`` for ``--steps`` optimizer steps, in one process, one torch thread, three ways:
``plain`` (no monitor), ``every_1`` (``ConflictMonitor(every_n_steps=1)``), ``every_10``, and ``jacobian_only`` (no monitor, the
per-task Jacobian requested on every step: ``every_1`` minus the monitor's own work). Each
repeat runs the four in turn, in a rotated order (interleaved, so a slow stretch of a shared machine
slows all of them), from the same seed and weights. Timed: ``on_train_start`` to ``on_train_end`` (the plot is written
after, outside the timing). Reported: the median over repeats of each run's time, and the median of
the per-repeat ratios monitor / plain. With a loss weighting (``ls``) the core computes no per-task
gradients, so the monitor's cost is mostly the Jacobian it requests on monitored steps
(``jacobian_only`` / ``plain``); with a gradient aggregator, which computes it anyway, the monitor
adds only its own work (``every_1`` / ``jacobian_only``: ``G``, the cosines, the logging).

The monitor's summary on the data set comes from one more, untimed run of ``--summary-steps`` steps
with ``every_n_steps=1``. Written to ``--out``: ``monitor_overhead.json``, ``monitor_overhead.md``
(tables, the command, the summary) and ``monitor_overhead.png`` (that run's plot).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import quiet, quiet_trainer, text_table
from lightning_cost import ConflictMonitor

#: run name -> the monitor's every_n_steps (None: no monitor); ``jacobian_only``: no monitor, but the
#: per-task Jacobian requested on every step (what ``every_1`` costs without the monitor's own work)
VARIANTS: dict[str, int | None] = {"plain": None, "every_1": 1, "every_10": 10, "jacobian_only": None}
DEFAULT_OUT = Path("docs/results/perf")


class TrainTimer(L.Callback):
    """Wall time from ``on_train_start`` to ``on_train_end`` (put it first: it stops before the others end)."""

    def __init__(self) -> None:
        self.seconds = float("nan")
        self._t = 0.0

    def on_train_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_end(self, *args: Any) -> None:
        self.seconds = time.perf_counter() - self._t


def build(dataset: str, batch_size: int, seed: int) -> Any:
    from benchmarks.registry import make_datamodule

    dm = make_datamodule(dataset, batch_size=batch_size, seed=seed)
    dm.setup("fit")
    return dm


def run_once(dm: Any, method: str, steps: int, seed: int, every: int | None,
             jacobian: bool = False) -> tuple[float, ConflictMonitor | None]:
    """One training run; its time in seconds and its monitor (``None`` without one)."""
    from benchmarks.registry import make_model, module_classes

    L.seed_everything(seed, verbose=False)
    mtl_cls, _ = module_classes(dm)
    model = mtl_cls(make_model(dm), dm.task_specs, method=method)
    if jacobian:
        model.request_jacobian(True)
    timer = TrainTimer()
    monitor = ConflictMonitor(every_n_steps=every, plot=False) if every is not None else None
    trainer = quiet_trainer([timer, *([monitor] if monitor else [])], max_steps=steps, max_epochs=-1)
    trainer.fit(model, dm.train_dataloader())
    if trainer.global_step != steps:
        raise RuntimeError(f"expected {steps} optimizer steps, trained {trainer.global_step}")
    return timer.seconds, monitor


def measure(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    dm = build(args.dataset, args.batch_size, args.seed)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    with quiet(everything=True):
        run_once(dm, args.method, min(args.steps, 5), args.seed, 1)  # warm-up: imports, vmap, allocator
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                times[name].append(run_once(dm, args.method, args.steps, args.seed, VARIANTS[name],
                                            jacobian=name == "jacobian_only")[0])
            log(f"repeat {rep + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in VARIANTS))
        _, last = run_once(dm, args.method, args.summary_steps, args.seed, 1)
    assert last is not None
    plain = times["plain"]
    rows = {name: {"median_s": statistics.median(ts), "ms_per_step": 1e3 * statistics.median(ts) / args.steps,
                   "times_s": ts,
                   "ratio_median": statistics.median(t / p for t, p in zip(ts, plain, strict=True)),
                   "ratio_min": min(t / p for t, p in zip(ts, plain, strict=True)),
                   "ratio_max": max(t / p for t, p in zip(ts, plain, strict=True))}
            for name, ts in times.items()}
    own = [a / b for a, b in zip(times["every_1"], times["jacobian_only"], strict=True)]
    return {"dataset": args.dataset, "num_tasks": len(dm.task_specs), "method": args.method, "steps": args.steps,
            "batch_size": args.batch_size, "reps": args.reps, "seed": args.seed, "threads": torch.get_num_threads(),
            "summary_steps": args.summary_steps, "variants": rows,
            "own_work_ratio": {"median": statistics.median(own), "min": min(own), "max": max(own)}, "summary_every_1": last.summary(), "_monitor": last}


def report(results: dict[str, Any], command: str) -> str:
    rows = [(name, r["median_s"], r["ms_per_step"], r["ratio_median"], r["ratio_min"], r["ratio_max"])
            for name, r in results["variants"].items()]
    table = text_table("", ["run", "median s", "ms/step", "ratio vs plain", "min", "max"], rows, digits=3)
    s = results["summary_every_1"]
    min_cos = ", ".join(f"{t}: {'-' if c is None else f'{c:.3f}'}" for t, c in s["min_cos"].items())
    return "\n".join([
        "# ConflictMonitor overhead",
        "",
        f"Made by `{command}` ({results['threads']} torch thread, CPU).",
        "",
        f"{results['dataset']} (K={results['num_tasks']}), method `{results['method']}`, {results['steps']} optimizer "
        f"steps of batch {results['batch_size']}, {results['reps']} interleaved repeats; time from on_train_start to "
        "on_train_end; ratio = the median of the per-repeat ratios monitor / plain.",
        "",
        "```", table, "```",
        "",
        f"The monitor's own work (G, cosines, trigger rules, logging) on top of the per-task Jacobian, "
        f"every_1 / jacobian_only: x{results['own_work_ratio']['median']:.3f} (min {results['own_work_ratio']['min']:.3f}, "
        f"max {results['own_work_ratio']['max']:.3f}); with a gradient aggregator (which computes the Jacobian "
        "anyway) that is the monitor's whole cost.",
        "",
        f"## Monitor summary on {results['dataset']} (every_n_steps=1, {results['summary_steps']} steps, "
        f"method `{results['method']}`)",
        "",
        f"- steps monitored: {s['steps_monitored']} (unavailable: {s['steps_unavailable']})",
        f"- share of steps on which the majority rule (eq. 4, >= ceil(K/2) tasks with cos < 0) fires: "
        f"{s['share_majority']:.3f} ({s['steps_majority']} steps)",
        f"- share of steps on which the any rule (one task with cos <= 0) fires: {s['share_any']:.3f} "
        f"({s['steps_any']} steps)",
        f"- min cos(g_i, g0) per task: {min_cos}",
        "",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="yeast", help="a registered benchmark data set (default: yeast)")
    parser.add_argument("--method", default="ls", help="the multi-task method (default: ls)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per timed run")
    parser.add_argument("--reps", type=int, default=10, help="interleaved repeats")
    parser.add_argument("--summary-steps", type=int, default=500, help="steps of the (untimed) summary run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="write monitor_overhead.{json,md,png} here")
    args = parser.parse_args(argv)
    for name in ("steps", "reps", "batch_size", "summary_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(1)
    command = "python -m benchmarks.perf.monitor_overhead " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = measure(args)
    monitor = results.pop("_monitor")
    results["command"] = command.strip()
    text = report(results, results["command"])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "monitor_overhead.json").write_text(json.dumps(results, indent=1))
    (args.out / "monitor_overhead.md").write_text(text)
    try:
        monitor.write_plot(args.out / "monitor_overhead.png")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return results


if __name__ == "__main__":
    main()
