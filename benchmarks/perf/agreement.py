"""How often the representation trigger agrees with the exact one, step by step
(``python -m benchmarks.perf.cost_budget --sections agreement``): MultiMNIST and Yeast with FairGrad, and a
synthetic regression problem where conflicts are frequent (LS, K = 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from benchmarks.common import finite_mean, quiet, quiet_trainer
from benchmarks.perf.levers import module_and_data
from benchmarks.runner.config import RunnerConfig
from benchmarks.runner.conflicts import ConflictCounter

__all__ = ["bench_agreement"]

_mean = finite_mean


def _agreement_counters() -> dict[str, ConflictCounter]:
    """Per step, the cosines of the exact trigger (the parameter Jacobian) and of the representation
    trigger (both reductions), each asked of the module on every step."""
    return {"exact": ConflictCounter(request=True, keep_cosines=True),
            **{reduce: ConflictCounter(on="representation", reduce=reduce, request=True, keep_cosines=True)
               for reduce in ("flatten", "mean")}}


def _agreement_rows(counters: dict[str, ConflictCounter]) -> list[dict[str, Any]]:
    """The steps every counter saw, as ``{"exact": cosines, "flatten": ..., "mean": ...}``."""
    by_step = {name: {s.step: s.cosines for s in c.steps} for name, c in counters.items()}
    common = sorted(set.intersection(*(set(v) for v in by_step.values())))
    return [{name: by_step[name][step] for name in counters} for step in common]


def _agreement_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from lightning_cost.teleport.trigger import ConflictTrigger

    out: dict[str, Any] = {"steps": len(rows)}
    if not rows:
        return out
    k = len(rows[0]["exact"])
    for rule in ("majority", "any"):
        trig = ConflictTrigger(rule)
        exact = [trig.decide(torch.tensor(r["exact"], dtype=torch.float64)).fire for r in rows]
        out[rule] = {"exact_fire_rate": _mean([float(e) for e in exact])}
        for reduce in ("flatten", "mean"):
            rep = [trig.decide(torch.tensor(r[reduce], dtype=torch.float64)).fire for r in rows]
            both = sum(a and b for a, b in zip(exact, rep, strict=True))
            neither = sum((not a) and (not b) for a, b in zip(exact, rep, strict=True))
            only_exact = sum(a and not b for a, b in zip(exact, rep, strict=True))
            only_rep = sum(b and not a for a, b in zip(exact, rep, strict=True))
            n = len(rows)
            out[rule][reduce] = {
                "both_fire": both / n, "both_silent": neither / n, "exact_only": only_exact / n,
                "rep_only": only_rep / n, "agreement": (both + neither) / n, "rep_fire_rate": (both + only_rep) / n,
                "recall": both / (both + only_exact) if both + only_exact else float("nan"),
                "precision": both / (both + only_rep) if both + only_rep else float("nan"),
            }
    ex = torch.tensor([r["exact"] for r in rows], dtype=torch.float64)
    for reduce in ("flatten", "mean"):
        rp = torch.tensor([r[reduce] for r in rows], dtype=torch.float64)
        sign = ((ex < 0) == (rp < 0)).double().mean()
        a, b = ex.flatten() - ex.mean(), rp.flatten() - rp.mean()
        corr = float((a @ b) / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else float("nan")
        out[f"task_sign_agreement_{reduce}"] = float(sign)
        out[f"cosine_correlation_{reduce}"] = corr
    out["K"] = k
    return out


def _synthetic(k: int = 4, n: int = 4096, d: int = 16, width: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """K regression tasks ``y_i = s_i tanh(x . w_i)`` (independent ``w_i``, task 0 twice as large) through a
    ``width``-unit shared bottleneck: the tasks compete for the representation, so conflicts are frequent
    (measured with LS: the exact ceil(K/2) rule fires on ~40 % of the first 150 steps, the any-task rule
    on ~80 %)."""
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.data.tasks import TaskSpec
    from benchmarks.models import MultiTaskNet, make_heads, mlp
    from benchmarks.models.modules import MTLBenchModule

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    ys = []
    for i in range(k):
        w = torch.randn(d, generator=g)
        ys.append((2.0 if i == 0 else 1.0) * torch.tanh(x @ w) + 0.1 * torch.randn(n, generator=g))
    specs = [TaskSpec.regression(f"t{i}") for i in range(k)]
    net = MultiTaskNet(mlp(d, (32, width), batchnorm=False), make_heads(specs, width))
    model = MTLBenchModule(net, specs, method="ls", lr=1e-3)
    return model, DataLoader(TensorDataset(x, torch.stack(ys, 1)), batch_size=32, shuffle=True, generator=g)


def bench_agreement(sizes: dict[str, Any], cfg: RunnerConfig, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [
        ("multimnist", "fairgrad", cfg.data_kw, cfg.epochs, sizes["agree_mm_batches"]),
        ("yeast", "fairgrad", {"batch_size": 64}, sizes["yeast_epochs"], None),
    ]
    for dataset, method, data_kw, epochs, limit in runs:
        log(f"  {dataset} ({method}) ...")
        L.seed_everything(0, verbose=False)
        dm, model = module_and_data(dataset, method, data_kw)
        counters = _agreement_counters()
        kw = {"limit_train_batches": limit} if limit else {}
        with quiet(everything=True):
            quiet_trainer(list(counters.values()), max_epochs=epochs, **kw).fit(model, dm.train_dataloader())
        out[dataset] = {"method": method, "epochs": epochs, **_agreement_stats(_agreement_rows(counters))}
    log("  synthetic (ls, K=4) ...")
    L.seed_everything(0, verbose=False)
    model, loader = _synthetic()
    counters = _agreement_counters()
    with quiet(everything=True):
        quiet_trainer(list(counters.values()), max_steps=sizes["agree_synth_steps"]).fit(model, loader)
    out["synthetic"] = {"method": "ls", **_agreement_stats(_agreement_rows(counters))}
    return out
