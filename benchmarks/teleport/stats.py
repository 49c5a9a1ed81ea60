"""Teleport statistics: the paper's Fig. 5a (trigger ratio per epoch) and Fig. 8 (gradient norm and
conflict before vs after each teleport), plus teleport time and loss drift, on any benchmark.

    python -m benchmarks.teleport.stats [--datasets multimnist yeast tox21 qm8] [--method fairgrad]
        [--epochs 2] [--force-every 25] [--out DIR]

For every data set it trains ``--method`` with :class:`~lightning_cost.SymmetryTeleportCallback` under
both trigger rules (the paper's ``ceil(K/2)`` of eq. 4 and the authors' any-task rule) and records, on
every optimizer step, how many tasks have ``cos(g_i, g0) < 0`` (the distribution of that count explains
a silent trigger). Output in ``DIR``: ``teleport_stats.json``, ``fig5a_trigger_ratio.png`` (trigger
ratio per epoch, one panel per data set), ``fig8_before_after.png`` (per accepted teleport: total
gradient norm and smallest ``cos(g_i, g0)`` before vs after), and one printed table per data set.

Where the trigger is silent, ``--force-every N`` also forces a teleport every N steps (a measurement
aid, not the method) so that Fig. 8 has points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import finite_mean, quiet_trainer
from benchmarks.registry import make_datamodule, make_model, module_classes
from benchmarks.runner.conflicts import ConflictCounter
from benchmarks.runner.variants import build_teleport, deep_merge, teleport_records
from lightning_cost.teleport.trigger import ConflictTrigger

__all__ = ["run", "main", "plot"]

#: small default sizes per data set (the rest of the DataModule's defaults apply)
DEFAULT_DATA_KW: dict[str, dict[str, Any]] = {
    "multimnist": {"num_train": 6400, "num_val": 500, "num_test": 500, "batch_size": 64},
    "yeast": {"batch_size": 64},
    "tox21": {"batch_size": 128},
    "qm8": {"batch_size": 256},
}


def _teleport_spec(rule: str, args: argparse.Namespace) -> dict[str, Any]:
    """The callback of one run: ``rule``'s trigger, the teleport budget, forced teleports every
    ``--force-every`` steps (forced at steps with step % N == N // 2), plus ``--cost-kw``."""
    schedule = {"max_per_epoch": args.max_per_epoch, "min_steps_between": args.min_steps_between,
                "every": args.force_every}
    return deep_merge({"trigger": rule, "schedule": schedule}, args.cost_kw)


def measured(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The accepted teleports measured before and after (``TeleportRecord.before`` / ``.after``)."""
    return [r for r in history if r["accepted"] and r.get("before") and r.get("after")]


def _teleport_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    acc = measured(history)
    return {
        "teleports": len(history),
        "accepted": sum(bool(r["accepted"]) for r in history),
        "teleport_ms_mean": 1000 * finite_mean([r["seconds"] for r in history]),
        "loss_drift_mean": finite_mean([r["loss_drift"] for r in acc]),
        **{f"{what}_{when}_mean": finite_mean([r[when][key] for r in acc])
           for what, key in (("grad_norm", "mean_norm"), ("conflicts", "conflicts"), ("min_cos", "min_cos"))
           for when in ("before", "after")},
        "grad_norm_ratio_mean": finite_mean([r["after"]["mean_norm"] / r["before"]["mean_norm"] for r in acc]),
    }


def run(dataset: str, rule: str, args: argparse.Namespace) -> dict[str, Any]:
    """One training run of ``args.method`` + COST on ``dataset`` with trigger ``rule``."""
    tele = build_teleport(_teleport_spec(rule, args), args.seed)
    counter = ConflictCounter()  # before the teleport: it counts each step's own gradients
    L.seed_everything(args.seed, verbose=False)
    data_kw = {**DEFAULT_DATA_KW.get(dataset, {}), **args.data_kw.get(dataset, {})}
    dm = make_datamodule(dataset, seed=args.seed, **data_kw)
    dm.setup("fit")
    mtl_cls, _ = module_classes(dm)  # the paper's dense data sets need their own module
    model = mtl_cls(make_model(dm), dm.task_specs, method=args.method, lr=args.lr)
    trainer = quiet_trainer([counter, tele], max_epochs=args.epochs)
    start = time.perf_counter()
    trainer.fit(model, dm.train_dataloader())
    wall = time.perf_counter() - start
    history = teleport_records(tele)
    k = len(dm.task_specs)
    return {
        "dataset": dataset,
        "num_tasks": k,
        "rule": rule,
        "threshold": ConflictTrigger.threshold(k) if rule == "majority" else 1,
        "steps": trainer.global_step,
        "wall_s": wall,
        "forced_every": args.force_every,
        "trigger_ratio_per_epoch": [round(e[f"trigger_ratio_{rule}"], 4) for e in counter.per_epoch()],
        "conflicting_tasks_histogram": counter.histogram("majority"),
        **_teleport_summary(history),
        "history": history,
    }


_TABLE_KEYS = ["num_tasks", "threshold", "steps", "wall_s", "teleports", "accepted", "trigger_ratio_per_epoch",
               "conflicting_tasks_histogram", "teleport_ms_mean", "loss_drift_mean", "grad_norm_before_mean",
               "grad_norm_after_mean", "grad_norm_ratio_mean", "conflicts_before_mean", "conflicts_after_mean",
               "min_cos_before_mean", "min_cos_after_mean"]


def print_table(results: list[dict[str, Any]], header: str) -> None:
    print(f"\n{header}")
    print(f"{'':30s}" + "".join(f"{r['rule']:>22s}" for r in results))
    for k in _TABLE_KEYS:
        cells = []
        for r in results:
            v = r[k]
            cells.append(f"{v:>22.4g}" if isinstance(v, float) else f"{json.dumps(v):>22s}")
        print(f"{k:30s}" + "".join(cells))


def plot(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write Fig. 5a (trigger ratio per epoch) and Fig. 8 (before vs after each accepted teleport)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fig = Figure(figsize=(4 * len(datasets), 3.2))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        for r in (r for r in results if r["dataset"] == ds):
            ratios = r["trigger_ratio_per_epoch"]
            ax.plot(range(1, len(ratios) + 1), [100 * v for v in ratios], "o-", label=f"{r['rule']} rule")
        k = next(r["num_tasks"] for r in results if r["dataset"] == ds)
        ax.set_title(f"{ds} (K={k})")
        ax.set_xlabel("epoch")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("trigger ratio (% of steps)")
    fig.suptitle("Fig. 5a: share of steps on which the trigger fires", fontsize=10)
    fig.tight_layout()
    p5 = out / "fig5a_trigger_ratio.png"
    fig.savefig(p5, dpi=110)

    fig = Figure(figsize=(8.5, 3.8))
    a, b = fig.subplots(1, 2)
    markers = "osD^v<>p*h"
    for i, ds in enumerate(datasets):
        ev = [h for r in results if r["dataset"] == ds for h in measured(r["history"])]
        if not ev:
            continue
        before = [h["before"]["mean_norm"] for h in ev]
        after = [h["after"]["mean_norm"] for h in ev]
        a.scatter(before, after, marker=markers[i % len(markers)], s=18, label=ds)
        b.scatter([h["before"]["min_cos"] for h in ev], [h["after"]["min_cos"] for h in ev],
                  marker=markers[i % len(markers)], s=18, label=ds)
    for ax, name in ((a, "total gradient norm ||g0||"), (b, "min_i cos(g_i, g0)")):
        lo, hi = ax.get_xlim()
        lo, hi = min(lo, ax.get_ylim()[0]), max(hi, ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], "--", color="grey", linewidth=0.8)
        ax.set_xlabel(f"{name} before teleport")
        ax.set_ylabel("after teleport")
        ax.legend(fontsize=8)
    b.axhline(0, color="k", linewidth=0.5)
    b.axvline(0, color="k", linewidth=0.5)
    fig.suptitle("Fig. 8: each accepted teleport (above the diagonal = increased)", fontsize=10)
    fig.tight_layout()
    p8 = out / "fig8_before_after.png"
    fig.savefig(p8, dpi=110)
    return [p5, p8]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["multimnist"], help="benchmarks.BENCHMARKS names")
    p.add_argument("--method", default="fairgrad")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-kw", type=json.loads, default={},
                   help='per data set DataModule overrides, JSON: {"multimnist": {"num_train": 2000}}')
    p.add_argument("--cost-kw", type=json.loads, default={}, help="other SymmetryTeleportCallback arguments, JSON")
    p.add_argument("--max-per-epoch", type=int, default=None, help="teleport budget per epoch (default: none)")
    p.add_argument("--min-steps-between", type=int, default=10)
    p.add_argument("--rules", nargs="+", default=["majority", "any"])
    p.add_argument("--force-every", type=int, default=0,
                   help="also force a teleport every N steps (to measure teleports where the trigger is silent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/teleport_stats"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: list[dict[str, Any]] = []
    forced = f", teleports FORCED every {args.force_every} steps" if args.force_every else ""
    for ds in args.datasets:
        per = [run(ds, rule, args) for rule in args.rules]
        print_table(per, f"{ds}, {args.method} + COST, {args.epochs} epochs, {args.threads} thread(s){forced}")
        results.extend(per)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teleport_stats.json").write_text(json.dumps({"argv": argv, "results": results}, indent=1))
    for path in plot(results, args.out):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
