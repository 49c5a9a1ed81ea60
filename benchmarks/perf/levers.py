"""COST's speed levers (``python -m benchmarks.perf.cost_budget --sections levers``), each measured in
one process with interleaved repetitions: the n~ perturbed forwards of eq. 9 as a loop vs one ``vmap``
pass, the adapter's merged-weight evaluation vs PEFT's LoRA branch, inner steps x inner learning rate,
and the step time of the trigger (exact or on the representation) against the step without it."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from benchmarks.common import BatchTimer, finite_mean, finite_median, quiet, quiet_trainer
from benchmarks.runner.config import RunnerConfig
from benchmarks.runner.variants import build_teleport, deep_merge, teleport_records

__all__ = ["lever_forward_paths", "lever_inner_steps", "lever_step_costs", "module_and_data", "summarize_history"]

#: the COST variant of main.yaml (``benchmarks/configs/main.yaml``) every measurement starts from
PRESET = "paper"

_mean, _median = finite_mean, finite_median


def summarize_history(history: list[dict[str, Any]]) -> dict[str, float]:
    """Means over a run's teleports: loss drift, relative displacement, gradient-norm ratio (accepted ones), seconds."""
    acc = [h for h in history if h.get("accepted")]
    return {
        "loss_drift_mean": _mean([h.get("loss_drift") for h in acc]),
        "displacement_rel_mean": _mean([h.get("displacement_rel") for h in acc]),
        "grad_norm_ratio_mean": _mean([h["grad_norm_after"] / max(h["grad_norm_before"], 1e-30) for h in acc]),
        "teleport_s_mean": _mean([h["seconds"] for h in history]),
    }


def _interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median ms of each function, the functions run in a shuffled order in every repetition."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    for _ in range(reps):
        keys = list(fns)
        rng.shuffle(keys)
        for k in keys:
            t = time.perf_counter()
            fns[k]()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: _median(v) for k, v in times.items()}


def module_and_data(dataset: str, method: str, data_kw: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """A set-up DataModule and a fresh benchmark module training ``method`` on it (FairGrad: alpha 2)."""
    from benchmarks.models.modules import MTLBenchModule
    from benchmarks.registry import make_datamodule, make_model

    dm = make_datamodule(dataset, **(data_kw or {}))
    dm.setup()
    kw = {"alpha": 2.0} if method == "fairgrad" else {}
    return dm, MTLBenchModule(make_model(dm), dm.task_specs, method=method, method_kw=kw, lr=1e-3)


def lever_forward_paths(dataset: str, data_kw: dict[str, Any], reps: int, n: int = 5) -> dict[str, Any]:
    """(a) loop vs vmap for the n~ perturbed losses; (e) merged weight vs PEFT's LoRA branch."""
    from lightning_cost.teleport.adapter import TeleportAdapter
    from lightning_cost.teleport.objective import balance_ratios, sample_sphere, sharpness

    torch.manual_seed(0)
    dm, model = module_and_data(dataset, "fairgrad", data_kw)
    model.train()
    batch = next(iter(dm.train_dataloader()))
    shared = model.shared_parameters()
    ad = TeleportAdapter(model, shared)
    ad.inject()
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0.0, 1e-2)
    g = torch.Generator().manual_seed(0)
    draws = [sample_sphere([p.shape for p in shared], 1e-2, g) for _ in range(n)]
    stacked = [torch.stack(parts) for parts in zip(*draws, strict=True)]
    buffers = [(b, b.clone()) for b in model.buffers()]
    params = ad.parameters()
    fn = model.evaluate_task_losses

    def restore() -> None:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    def loop() -> Tensor:
        with torch.no_grad():
            base = ad.overrides()
            out = torch.stack([ad.call(fn, batch, 0, eps=e, overrides=base) for e in draws])
        restore()
        return out

    def batched() -> Tensor:
        with torch.no_grad():
            return ad.call_batched(fn, batch, 0, eps=stacked)

    def peft_branch(grad: bool = False) -> Any:
        for _, layer in ad._lora_layers:
            layer.enable_adapters(True)
        try:
            with torch.set_grad_enabled(grad):
                losses = fn(batch, 0) if not ad.dense_params else ad.call(fn, batch, 0, overrides={
                    k: v for k, v in ad.overrides().items() if k not in {key for key, _ in ad._lora_layers}})
                if grad:
                    torch.autograd.grad(losses.sum(), params, allow_unused=True)
        finally:
            for _, layer in ad._lora_layers:
                layer.enable_adapters(False)
            for p in params:
                p.requires_grad_(True)
            restore()

    def merged(grad: bool = False) -> Any:
        with torch.set_grad_enabled(grad):
            losses = ad.call(fn, batch, 0)
            if grad:
                torch.autograd.grad(losses.sum(), params, allow_unused=True)
        restore()

    a, b = loop(), batched()
    ratios = balance_ratios(torch.rand(a.shape[1]) + 0.1)
    lg_loop = max(float(sharpness(x, ratios)) for x in a)
    lg_vmap = max(float(sharpness(x, ratios)) for x in b)
    with torch.no_grad():
        for _, layer in ad._lora_layers:
            layer.enable_adapters(True)
        ref = fn(batch, 0) if not ad.dense_params else None
        for _, layer in ad._lora_layers:
            layer.enable_adapters(False)
        for p in params:
            p.requires_grad_(True)
        restore()
        same = ad.call(fn, batch, 0)
        restore()
    ms = _interleaved({"perturbed_loop": loop, "perturbed_vmap": batched, "fwd_peft_branch": peft_branch,
                       "fwd_merged_weight": merged, "fwd_bwd_peft_branch": lambda: peft_branch(True),
                       "fwd_bwd_merged_weight": lambda: merged(True)}, reps)
    ad.discard()
    return {
        "dataset": dataset, "batch_size": int(batch[0].shape[0]), "num_perturbations": n, "ms": ms,
        "vmap_over_loop": ms["perturbed_vmap"] / ms["perturbed_loop"],
        "merged_over_peft_fwd": ms["fwd_merged_weight"] / ms["fwd_peft_branch"],
        "merged_over_peft_fwd_bwd": ms["fwd_bwd_merged_weight"] / ms["fwd_bwd_peft_branch"],
        "max_abs_loss_diff_vmap_vs_loop": float((a - b).abs().max()),
        "lg_loop": lg_loop, "lg_vmap": lg_vmap, "lg_rel_diff": abs(lg_vmap - lg_loop) / max(abs(lg_loop), 1e-30),
        "max_abs_loss_diff_merged_vs_peft": float((same - ref).abs().max()) if ref is not None else None,
    }


def lever_inner_steps(sizes: dict[str, Any], cfg: RunnerConfig, log: Callable[[str], None]) -> list[dict]:
    """(b) fewer inner steps, larger inner lr: what a teleport costs and what it does."""
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
        acc = [h for h in hist if h["accepted"]]
        lt0 = [h["inner_terms"][0][0] for h in acc]
        lt1 = [h["inner_terms"][-1][0] for h in acc]
        lg0 = [h["inner_terms"][0][1] for h in acc]
        lg1 = [h["inner_terms"][-1][1] for h in acc]
        rows.append({
            "inner_steps": steps, "inner_lr": lr if lr is not None else cfg.lr,
            "teleports": len(hist), "accepted": len(acc),
            "teleport_s_mean": _mean([h["seconds"] for h in hist]),
            **{k: v for k, v in summarize_history(hist).items() if k != "teleport_s_mean"},
            "conflicts_after_mean": _mean([h["conflicts_after"] for h in acc]),
            "sigma_mean": _mean([h["sigma"] for h in acc]),
            "lt_final_mean": _mean(lt1), "lt_first_mean": _mean(lt0),
            "lg_gain_rel_mean": _mean([(b - a) / max(abs(a), 1e-30) for a, b in zip(lg0, lg1, strict=True)]),
            "first_teleport": {k: acc[0].get(k) for k in ("loss_drift", "displacement_rel", "seconds")} if acc else None,
        })
    return rows


def lever_step_costs(sizes: dict[str, Any], cfg: RunnerConfig) -> dict[str, Any]:
    """(c) FairGrad's step with vs without COST's trigger; (d) LS with the exact or the representation trigger.

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
        "ls+rep_trigger_flatten": ("ls", {"trigger_on": "representation"}),
        "ls+rep_trigger_mean": ("ls", {"trigger_on": "representation", "representation_reduce": "mean"}),
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
