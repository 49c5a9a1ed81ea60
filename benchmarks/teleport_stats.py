"""Teleport statistics on MultiMNIST: the paper's Fig. 5a (trigger ratio per epoch) and Fig. 8
(gradient norm and conflict before vs after each teleport), plus teleport time and loss drift.

    python -m benchmarks.teleport_stats [--method fairgrad] [--epochs 2] [--num-train 6400] [--out DIR]

Runs the method with the callback under both trigger rules (the paper's ceil(K/2), the authors'
any-task rule) and prints one table per rule; writes ``DIR/teleport_stats.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.data import MultiMNISTDataModule
from benchmarks.lit import MTLBenchModule
from benchmarks.models import lenet_multimnist
from lightning_cost import SymmetryTeleportCallback


def run(rule: str, args: argparse.Namespace) -> dict:
    L.seed_everything(args.seed)
    dm = MultiMNISTDataModule(num_train=args.num_train, num_val=500, num_test=500, batch_size=args.batch_size,
                              image_size=28, seed=args.seed)
    dm.setup("fit")
    model = MTLBenchModule(lenet_multimnist(dm.task_specs, dm.in_shape), dm.task_specs, method=args.method, lr=1e-3)
    tele = SymmetryTeleportCallback(trigger=rule, max_teleports_per_epoch=args.max_per_epoch,
                                    min_steps_between=args.min_steps_between)
    callbacks: list[L.Callback] = [tele]
    if args.force_every:

        class Force(L.Callback):  # measurement aid: teleport every N steps whatever the trigger says
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                step = trainer.global_step
                tele.force_next = step > 0 and step % args.force_every == 0

        callbacks.insert(0, Force())
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, dm.train_dataloader())
    wall = time.perf_counter() - start
    acc = [r for r in tele.history if r["accepted"]]
    steps = trainer.global_step

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    return {
        "rule": rule,
        "steps": steps,
        "wall_s": wall,
        "teleports": len(tele.history),
        "accepted": len(acc),
        "trigger_ratio_per_epoch": [round(e["trigger_ratio"], 4) for e in tele.epoch_stats],
        "teleport_ms_mean": 1000 * mean([r["seconds"] for r in tele.history]),
        "loss_drift_mean": mean([r["loss_drift"] for r in acc]),
        "grad_norm_before_mean": mean([r["grad_norm_before"] for r in acc]),
        "grad_norm_after_mean": mean([r["grad_norm_after"] for r in acc]),
        "grad_norm_ratio_mean": mean([r["grad_norm_after"] / r["grad_norm_before"] for r in acc]),
        "conflicts_before_mean": mean([r["conflicts_before"] for r in acc]),
        "conflicts_after_mean": mean([r["conflicts_after"] for r in acc]),
        "min_cos_before_mean": mean([min(r["cosines_before"]) for r in acc]),
        "min_cos_after_mean": mean([min(r["cosines_after"]) for r in acc]),
        "history": tele.history,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="fairgrad")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-train", type=int, default=6400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-per-epoch", type=int, default=None, help="teleport budget per epoch (default: none)")
    p.add_argument("--min-steps-between", type=int, default=10)
    p.add_argument("--rules", nargs="+", default=["paper", "authors"])
    p.add_argument("--force-every", type=int, default=0,
                   help="also force a teleport every N steps (to measure teleports where the trigger is silent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results/teleport_stats"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run(rule, args) for rule in args.rules]
    keys = ["steps", "wall_s", "teleports", "accepted", "trigger_ratio_per_epoch", "teleport_ms_mean",
            "loss_drift_mean", "grad_norm_before_mean", "grad_norm_after_mean", "grad_norm_ratio_mean",
            "conflicts_before_mean", "conflicts_after_mean", "min_cos_before_mean", "min_cos_after_mean"]
    forced = f", teleports FORCED every {args.force_every} steps" if args.force_every else ""
    print(f"\nMultiMNIST, {args.method} + COST, {args.epochs} epochs x {args.num_train} composites, "
          f"{args.threads} thread(s){forced}")
    print(f"{'':28s}" + "".join(f"{r['rule']:>18s}" for r in results))
    for k in keys:
        vals = []
        for r in results:
            v = r[k]
            vals.append(f"{v:>18.4g}" if isinstance(v, float) else f"{str(v):>18s}")
        print(f"{k:28s}" + "".join(vals))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teleport_stats.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
