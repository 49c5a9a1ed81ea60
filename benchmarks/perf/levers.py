"""COST's speed levers (``python -m benchmarks.perf.cost_budget --sections levers``), each measured in
one process: inner steps x inner learning rate (what a teleport costs and does), and the step time of
the trigger (exact or on the representation) against the step without it, interleaved in one run."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import lightning as L

from benchmarks.common import BatchTimer, finite_mean, finite_median, quiet, quiet_trainer
from benchmarks.runner.config import RunnerConfig
from benchmarks.runner.variants import build_teleport, deep_merge, teleport_records

__all__ = ["lever_inner_steps", "lever_step_costs", "module_and_data", "summarize_history"]

#: the COST variant of ``benchmarks/configs/cost_budget.yaml`` every measurement starts from
PRESET = "paper"

_mean, _median = finite_mean, finite_median


def summarize_history(history: list[dict[str, Any]]) -> dict[str, float]:
    """Means over a run's teleports: loss drift, relative displacement, gradient-norm ratio (accepted ones), seconds."""
    acc = [h for h in history if h.get("accepted")]
    return {
        "loss_drift_mean": _mean([h.get("loss_drift") for h in acc]),
        "displacement_rel_mean": _mean([h.get("displacement_rel") for h in acc]),
        "grad_norm_ratio_mean": _mean([h["after"]["mean_norm"] / max(h["before"]["mean_norm"], 1e-30)
                                       for h in acc if h.get("before") and h.get("after")]),
        "teleport_s_mean": _mean([h["seconds"] for h in history]),
    }


def module_and_data(dataset: str, method: str, data_kw: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """A set-up DataModule and a fresh benchmark module training ``method`` on it (FairGrad: alpha 2)."""
    from benchmarks.models.modules import MTLBenchModule
    from benchmarks.registry import make_datamodule, make_model

    dm = make_datamodule(dataset, **(data_kw or {}))
    dm.setup()
    kw = {"alpha": 2.0} if method == "fairgrad" else {}
    return dm, MTLBenchModule(make_model(dm), dm.task_specs, method=method, method_kw=kw, lr=1e-3)


def lever_inner_steps(sizes: dict[str, Any], cfg: RunnerConfig, log: Callable[[str], None]) -> list[dict]:
    """(2a) fewer inner steps, larger inner lr: what a teleport costs and what it does."""
    rows = []
    for steps, lr in sizes["lever_grid"]:
        log(f"  inner steps {steps}, inner lr {lr or 'outer (1e-3)'} ...")
        L.seed_everything(0, verbose=False)
        dm, model = module_and_data("multimnist", "fairgrad", cfg.data_kw)
        n = len(dm.train_dataloader())
        tele = build_teleport(deep_merge(cfg.spec(PRESET), {
            "teleporter": {"inner_steps": steps, "inner_lr": lr},
            "schedule": {"max_per_epoch": None, "every": max(2, n // 4)}}), 0)
        with quiet(everything=True):
            quiet_trainer([tele], max_epochs=1).fit(model, dm.train_dataloader())
        hist = teleport_records(tele)
        acc = [h for h in hist if h["accepted"] and h["trace"]]
        lt0, lt1 = [h["trace"][0]["l_t"] for h in acc], [h["trace"][-1]["l_t"] for h in acc]
        lg0, lg1 = [h["trace"][0]["l_g"] for h in acc], [h["trace"][-1]["l_g"] for h in acc]
        rows.append({
            "inner_steps": steps, "inner_lr": lr if lr is not None else cfg.lr,
            "teleports": len(hist), "accepted": len(acc),
            "teleport_s_mean": _mean([h["seconds"] for h in hist]),
            **{k: v for k, v in summarize_history(hist).items() if k != "teleport_s_mean"},
            "conflicts_after_mean": _mean([h["after"]["conflicts"] for h in acc if h["after"]]),
            "sigma_mean": _mean([h["sigma"] for h in acc]),
            "lt_final_mean": _mean(lt1), "lt_first_mean": _mean(lt0),
            "lg_gain_rel_mean": _mean([(b - a) / max(abs(a), 1e-30) for a, b in zip(lg0, lg1, strict=True)]),
            "first_teleport": {k: acc[0].get(k) for k in ("loss_drift", "displacement_rel", "seconds")} if acc else None,
        })
    return rows


def lever_step_costs(sizes: dict[str, Any], cfg: RunnerConfig) -> dict[str, Any]:
    """(2b) FairGrad's step with vs without COST's trigger; LS with the exact or the representation trigger.

    Paired design: one run per variant with ``check_every=2``, so the trigger (and, for LS, the Jacobian
    or the representation gradients it needs) runs on the even steps only; the ratio is the median
    time of the checked steps over the median of the unchecked ones *of the same run*, which
    alternate step by step and so see the same machine load. Pooled over ``step_reps`` runs.
    """
    from benchmarks.models.modules import MTLBenchModule
    from benchmarks.registry import make_model

    variants = {
        "fairgrad+exact_trigger": ("fairgrad", {}),
        "ls+exact_trigger": ("ls", {}),
        "ls+rep_trigger_flatten": ("ls", {"trigger": {"on": "representation"}}),
        "ls+rep_trigger_mean": ("ls", {"trigger": {"on": "representation", "reduce": "mean"}}),
    }
    out: dict[str, Any] = {}
    for dataset in ("multimnist", "yeast"):
        data_kw = cfg.data_kw if dataset == "multimnist" else {"batch_size": 64}
        dm, _ = module_and_data(dataset, "ls", data_kw)
        loader = dm.train_dataloader()
        rows: dict[str, list[tuple[int, float]]] = {k: [] for k in variants}
        rng = random.Random(1)
        for _ in range(sizes["step_reps"]):
            keys = list(variants)
            rng.shuffle(keys)
            for k in keys:
                method, tele_kw = variants[k]
                L.seed_everything(0, verbose=False)
                kw = {"alpha": 2.0} if method == "fairgrad" else {}
                model = MTLBenchModule(make_model(dm), dm.task_specs, method=method, method_kw=kw, lr=1e-3)
                tele = build_teleport({"schedule": {"max_per_epoch": 0, "check_every": 2}, **tele_kw}, 0)
                timer = BatchTimer()
                with quiet(everything=True):
                    quiet_trainer([timer, tele], max_steps=2 * sizes["step_batches"] + 2).fit(model, loader)
                rows[k] += timer.rows[2:]  # the first steps pay one-off costs
        res = {}
        for k, rs in rows.items():
            checked = _median([t for s, t in rs if s % 2 == 0]) * 1e3
            plain = _median([t for s, t in rs if s % 2 == 1]) * 1e3
            res[k] = {"checked_step_ms": checked, "unchecked_step_ms": plain, "ratio": checked / plain,
                      "steps": len(rs)}
        out[dataset] = {"K": len(dm.task_specs), "batch_size": dm.batch_size, **res}
    return out
