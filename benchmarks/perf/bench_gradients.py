"""Sections 1 and 2 of the perf benchmark: each method's step time and memory through a Lightning
Trainer, and the cost of exact per-task gradients against K plain backwards and TorchJD's engine."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks.common import BatchTimer, quiet, quiet_trainer
from benchmarks.perf.bench_models import BenchMTL, build, dataset
from benchmarks.perf.measure import RssPeak, malloc_trim, ratio, timeit
from lightning_cost.aggregators import AVAILABLE

TARGET_PERTASK = 1.1  # mixin Jacobian <= 1.1 x K plain backward passes

# --------------------------------------------------------------------------- 1. step time / memory


def run_method(kind: str, k: int, method: str, steps: int, warmup: int) -> dict[str, float]:
    ds, bs = dataset(kind, k, steps + warmup)
    model = build(kind, k, method)
    timer = BatchTimer()
    with quiet(everything=True), RssPeak() as mem:
        quiet_trainer([timer], max_steps=steps + warmup).fit(model, DataLoader(ds, batch_size=bs, shuffle=False))
    measured = timer.ms[warmup:] or timer.ms
    return {"step_ms": statistics.median(measured), "peak_rss_delta_mb": mem.peak_delta / 2**20,
            "skipped_steps": int(model.mtl_skipped_steps)}


def bench_methods(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    setups = [("lenet", 2, cfg["lenet_steps"], cfg["lenet_warmup"])]
    if cfg["resnet"]:
        setups += [("resnet18", k, cfg["resnet_steps"], cfg["resnet_warmup"]) for k in cfg["resnet_ks"]]
    out: dict[str, Any] = {}
    for kind, k, steps, warmup in setups:
        key = f"{kind}_K{k}"
        rows: dict[str, Any] = {}
        others = [m for m in AVAILABLE if m != "ls"]
        ls_runs = [run_method(kind, k, "ls", steps, warmup)]
        for i, m in enumerate(others):
            rows[m] = run_method(kind, k, m, steps, warmup)
            log(f"  {key} {m}: {rows[m]['step_ms']:.1f} ms")
            if i == len(others) // 2:  # LS again in the middle and at the end: drift under load
                ls_runs.append(run_method(kind, k, "ls", steps, warmup))
        ls_runs.append(run_method(kind, k, "ls", steps, warmup))
        ls = {"step_ms": statistics.median(r["step_ms"] for r in ls_runs),
              "peak_rss_delta_mb": statistics.median(r["peak_rss_delta_mb"] for r in ls_runs),
              "skipped_steps": 0, "ls_runs_ms": [r["step_ms"] for r in ls_runs],
              "ls_drift": ratio(ls_runs[-1]["step_ms"], ls_runs[0]["step_ms"])}
        rows = {"ls": ls, **rows}
        floor = 1.0  # MB: RSS deltas below 1 MB are noise
        for r in rows.values():
            r["time_ratio_vs_ls"] = ratio(r["step_ms"], ls["step_ms"])
            r["mem_ratio_vs_ls"] = ratio(max(r["peak_rss_delta_mb"], floor), max(ls["peak_rss_delta_mb"], floor))
        out[key] = {"kind": kind, "K": k, "steps": steps, "warmup": warmup, "methods": rows}
    return out


# --------------------------------------------------------------------------- 2. per-task gradients


def _shared_row(model: BenchMTL) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.trunk.parameters()])


def _gradient_paths(model: BenchMTL, batch: Any, k: int) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """The ways of one step to the shared gradients, keyed by the result each one's time goes to, and
    TorchJD's engine on the same step."""

    def mixin() -> None:  # the mixin's own path (default jacobian_mode): forward, per-task VJPs, surrogate backward
        model.zero_grad(set_to_none=True)
        model.training_step(batch, 0).backward()

    def in_mode(mode: str) -> Callable[[], None]:
        def fn() -> None:
            model.mtl_jacobian_mode = mode
            try:
                mixin()
            finally:
                model.mtl_jacobian_mode = "auto"
        return fn

    def k_plain() -> None:  # K backward passes, each re-running the forward
        for i in range(k):
            model.zero_grad(set_to_none=True)
            model.task_losses(batch)[i].backward()
            _shared_row(model)

    def k_retain() -> None:  # LibMTL's _compute_grad(mode="backward"): one forward, K retained backwards
        losses = model.task_losses(batch)
        for i in range(k):
            model.zero_grad(set_to_none=True)
            losses[i].backward(retain_graph=i < k - 1)
            _shared_row(model)

    def summed() -> None:
        model.zero_grad(set_to_none=True)
        model.task_losses(batch).sum().backward()

    shared = list(model.trunk.parameters())

    def torchjd_engine() -> None:  # TorchJD's own path for the same step: mtl_backward + jac_to_grad(Sum)
        from torchjd.aggregation import Sum
        from torchjd.autojac import jac_to_grad, mtl_backward

        model.zero_grad(set_to_none=True)
        x, y = batch
        z = model.trunk(x)
        losses = [F.cross_entropy(h(z), y[:, i]) for i, h in enumerate(model.heads)]
        mtl_backward(losses, features=z, shared_params=shared, tasks_params=[list(h.parameters()) for h in model.heads])
        jac_to_grad(shared, Sum())

    def forward() -> None:
        with torch.no_grad():
            model.task_losses(batch)

    timed = {"mixin_ms": mixin, "k_plain_ms": k_plain, "k_retain_ms": k_retain, "sum_backward_ms": summed,
             "forward_ms": forward, "mixin_loop_ms": in_mode("loop"), "mixin_batched_ms": in_mode("batched")}
    return timed, torchjd_engine


def _torchjd_agreement(model: BenchMTL, mixin: Callable[[], None], torchjd_engine: Callable[[], None], reps: int,
                       r: dict[str, Any]) -> None:
    """Into ``r``: TorchJD's engine's time and the max |diff| of its shared update vs the mixin's
    (or why TorchJD could not be imported)."""
    try:  # the engines agree: LS's mixin update (weights 1) is TorchJD's Sum of the same Jacobian
        torch.manual_seed(1)
        mixin()
        ours = _shared_row(model).clone()
        torch.manual_seed(1)
        torchjd_engine()
        r["torchjd_max_abs_diff"] = float((_shared_row(model) - ours).abs().max())
        r["torchjd_ms"] = timeit(torchjd_engine, reps)
    except ImportError as err:
        r["torchjd_error"] = repr(err)[:200]


def _peak_per_mode(timed: dict[str, Callable[[], None]], r: dict[str, Any]) -> None:
    """Into ``r``: the peak RSS (MB) of one mixin step in each jacobian_mode."""
    for mode in ("loop", "batched"):  # peak memory of one step in each jacobian_mode
        malloc_trim()
        with RssPeak() as mem:
            timed[f"mixin_{mode}_ms"]()
        r[f"mixin_{mode}_peak_mb"] = mem.peak_delta / 2**20


def bench_pertask(kind: str, k: int, reps: int) -> tuple[dict[str, float], Tensor, Tensor]:
    ds, bs = dataset(kind, k, 1)
    batch = ds.tensors[0][:bs], ds.tensors[1][:bs]
    model = build(kind, k, "ls")
    model.request_jacobian(True)
    model.train()
    timed, torchjd_engine = _gradient_paths(model, batch, k)
    with quiet(everything=True):
        r = {name: timeit(fn, reps) for name, fn in timed.items()}
        _torchjd_agreement(model, timed["mixin_ms"], torchjd_engine, reps, r)
        _peak_per_mode(timed, r)
        model.zero_grad(set_to_none=True)
        model.training_step(batch, 0)
    jac = model.mtl_step.jacobian.detach().clone()
    losses = model.mtl_step.losses.detach().clone()
    r.update(P=int(jac.shape[1]), ratio_mixin_vs_k_plain=ratio(r["mixin_ms"], r["k_plain_ms"]),
             ratio_mixin_vs_k_retain=ratio(r["mixin_ms"], r["k_retain_ms"]),
             ratio_mixin_vs_sum_backward=ratio(r["mixin_ms"], r["sum_backward_ms"]),
             ratio_batched_vs_loop=ratio(r["mixin_batched_ms"], r["mixin_loop_ms"]),
             ratio_mixin_vs_torchjd=ratio(r["mixin_ms"], r["torchjd_ms"]) if "torchjd_ms" in r else None)
    r["pass"] = bool(r["ratio_mixin_vs_k_plain"] <= TARGET_PERTASK)
    return r, jac, losses
