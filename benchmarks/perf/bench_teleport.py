"""Sections 4 and 5 of the perf benchmark: a forced teleport's time against a training step, and the
trigger's cosines and Gramian (time and float64 error) on a synthetic J at the model's P."""

from __future__ import annotations

import statistics
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks.common import BatchTimer, quiet, quiet_trainer
from benchmarks.perf.bench_models import build, dataset
from benchmarks.perf.measure import malloc_trim, ratio, timeit
from benchmarks.perf.peers import synthetic_jacobian

# --------------------------------------------------------------------------- 4. teleport


def bench_teleport(cfg: dict[str, Any], ls_step_ms: float | None) -> dict[str, Any]:
    """One forced teleport per epoch (the callback's defaults otherwise) on each epoch's 2nd batch, after a
    warm-up epoch: its time against a training step."""
    from benchmarks.runner.variants import build_teleport, teleport_records

    per_epoch = 3
    ds, bs = dataset("lenet", 2, per_epoch)
    model = build("lenet", 2, "ls")
    tele = build_teleport({"schedule": {"every": per_epoch, "warmup_epochs": 1}}, 0)  # forced at step % 3 == 1
    timer = BatchTimer()
    epochs = cfg["teleports"] + 1  # epoch 0 is warm-up
    with quiet(everything=True):
        quiet_trainer([tele, timer], max_epochs=epochs).fit(model, DataLoader(ds, batch_size=bs, shuffle=False))
    history = teleport_records(tele)
    secs = [h["seconds"] * 1e3 for h in history]
    # steps without a teleport, after the first epoch (the teleport batch itself is excluded)
    step_times = [t for i, t in enumerate(timer.ms) if i >= per_epoch and i % per_epoch != 1]
    step_ms = statistics.median(step_times)
    mean_tp = statistics.mean(secs) if secs else float("nan")
    return {"teleports": len(secs), "accepted": sum(bool(h["accepted"]) for h in history),
            "teleport_ms_mean": mean_tp, "teleport_ms_all": secs, "step_ms_with_jacobian": step_ms,
            "ratio_teleport_vs_step": ratio(mean_tp, step_ms),
            "ratio_teleport_vs_ls_step": ratio(mean_tp, ls_step_ms) if ls_step_ms else None,
            "settings": "SymmetryTeleportCallback defaults (the LoRA teleporter, LoRAConfig())"}


# --------------------------------------------------------------------------- 5. trigger


def _f64_reference(jac: Tensor, block: int = 65536) -> tuple[Tensor, Tensor]:
    """``J J^T`` and ``cos(g_i, g_0)`` in float64: the library's Gramian of one float64 block of columns
    at a time (no float64 copy of J), the cosines from it (``J g_0 = G 1 / K``, ``|g_0|^2 = 1^T G 1 / K^2``)."""
    from lightning_cost.aggregators import gramian

    k = jac.shape[0]
    gram = sum(gramian(jac[:, s:s + block].double()) for s in range(0, jac.shape[1], block))
    dots, g0_sq = gram.sum(dim=1) / k, gram.sum() / k**2
    return gram, dots / (gram.diagonal().sqrt() * g0_sq.sqrt())


def bench_trigger(cfg: dict[str, Any], p: int, steps: dict[int, float]) -> list[dict[str, Any]]:
    """The trigger's cosines and the Gramian at the model's P: our blocked sums vs one BLAS call each,
    time and max relative error against float64 (errors for K <= 10: the float64 reference is slow)."""
    from lightning_cost.aggregators import gramian
    from lightning_cost.teleport.trigger import conflict_cosines

    rows = []
    for k in cfg["trigger_ks"]:
        jac = synthetic_jacobian(k, p, seed=k)
        ms = timeit(lambda j=jac: conflict_cosines(j), cfg["trigger_reps"])

        def plain_cos(jac: Tensor = jac) -> Tensor:  # the same cosines with one BLAS call / reduction over P
            g0 = jac.mean(0)
            return (jac @ g0).double() / (jac.norm(dim=1).double() * g0.norm().double())

        ms32 = timeit(plain_cos, cfg["trigger_reps"])
        row = {"K": k, "P": p, "conflict_cosines_ms": ms, "float32_variant_ms": ms32,
               "ratio_vs_float32_variant": ratio(ms, ms32),
               "gramian_ms": timeit(lambda j=jac: gramian(j), cfg["trigger_reps"]),
               "gramian_plain_ms": timeit(lambda j=jac: j @ j.T, cfg["trigger_reps"])}
        row["ratio_gramian_blocked_vs_plain"] = ratio(row["gramian_ms"], row["gramian_plain_ms"])
        if k <= 10:
            ref_g, ref_cos = _f64_reference(jac)
            row["gramian_rel_err"] = float(((gramian(jac).double() - ref_g).abs() / ref_g.abs()).max())
            row["gramian_plain_rel_err"] = float((((jac @ jac.T).double() - ref_g).abs() / ref_g.abs()).max())
            row["cos_abs_err"] = float((conflict_cosines(jac) - ref_cos).abs().max())
            row["cos_plain_abs_err"] = float((plain_cos() - ref_cos).abs().max())
        if k in steps:
            row["pct_of_step"] = 100.0 * ms / steps[k]
        rows.append(row)
        del jac
        malloc_trim()
    return rows
