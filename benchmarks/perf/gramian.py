"""Step time of the Gramian methods on three engines: ours (Jacobian, Gramian) and TorchJD's autogram.

Run::

    python -m benchmarks.perf.gramian [--quick] [--models tox21mlp lenet resnet18] [--reps 11] [--out docs/results/perf]

For each model and K, one batch, one process, one torch thread: the median time of a full training
step (forward, per-task gradients, the method's weights, the update's backward, Adam) of FairGrad,
MGDA, CAGrad, Nash-MTL (the authors' CCP, and ``nashmtl_newton``: ``solver="newton"``) and PCGrad
over the median LS step on the same model and batch (each row's LS steps timed alternately with its
own steps, so that a slow stretch of a shared machine slows both), with

* ``jacobian``: the mixin on the Jacobian engine (``engine="jacobian"``, ``J`` formed),
* ``gramian``: the mixin on the Gramian engine (``engine="gramian"``, the default for these methods),
* ``gramian_1st``: the same with ``two_stage=False`` (one batched product with the K one-hot rows
  through every head, instead of one product per head and then one batched product through the trunk),
* ``torchjd``: TorchJD's ``autogram.Engine`` over the trunk (``batch_dim=None``: BatchNorm forbids a
  batch dimension) and the matching weighting, then ``losses.backward(w)`` (Nash-MTL has no
  Gramian weighting there and is left out),

and the peak RSS growth of each run. The per-layer path of the Gramian engine is printed per model.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_and_write, quiet, text_table
from benchmarks.perf.bench import RssPeak, build, dataset
from lightning_cost.aggregators import NashMTL

METHODS = ("fairgrad", "mgda", "cagrad", "nashmtl", "nashmtl_newton", "pcgrad")
#: benchmark rows that are a registry method with other settings
VARIANTS: dict[str, Callable[[], Any]] = {"nashmtl_newton": lambda: NashMTL(solver="newton")}
ENGINES = ("jacobian", "gramian", "gramian_1st", "torchjd")
#: the mixin settings of each of our engines
OURS = {"jacobian": {"engine": "jacobian"}, "gramian": {"engine": "gramian"},
        "gramian_1st": {"engine": "gramian", "gramian": {"two_stage": False}}}
#: (model, K, batch) as the engine's targets name them
SETUPS = (("tox21mlp", 12, 128), ("tox21mlp", 12, 256), ("tox21mlp", 40, 128), ("tox21mlp", 40, 256),
          ("lenet", 2, 256), ("resnet18", 3, 8), ("resnet18", 10, 8))
QUICK_SETUPS = (("tox21mlp", 12, 64), ("lenet", 2, 64))


def torchjd_weighting(method: str) -> Callable[[], Any] | None:
    try:
        import torchjd.aggregation as A
    except Exception:  # noqa: BLE001 - the peers extra is not installed
        return None
    return {"mgda": A.MGDAWeighting, "pcgrad": A.PCGradWeighting, "cagrad": lambda: A.CAGradWeighting(c=0.4),
            "fairgrad": lambda: A.FairGradWeighting(alpha=2.0)}.get(method)


def batch_for(kind: str, k: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds, _ = dataset(kind, k, 1 + bs // 8)
    x, y = ds.tensors
    return x[:bs], y[:bs]


def ours_step(kind: str, k: int, method: str, engine: str | None, batch: Any) -> Callable[[], None]:
    chosen = VARIANTS[method]() if method in VARIANTS else method
    model = build(kind, k, chosen, **({} if engine is None else OURS[engine]))
    model.train()
    opt = model.configure_optimizers()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.training_step(batch, 0).backward()
        opt.step()

    step.model = model  # type: ignore[attr-defined]
    return step


def torchjd_step(kind: str, k: int, method: str, batch: Any) -> Callable[[], None] | None:
    factory = torchjd_weighting(method)
    if factory is None:
        return None
    from torchjd.autogram import Engine

    model = build(kind, k, "ls")
    model.train()
    opt = model.configure_optimizers()
    engine, weighting = Engine(model.trunk, batch_dim=None), factory()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        losses = model.task_losses(batch)
        losses.backward(weighting(engine.compute_gramian(losses)))
        opt.step()

    return step


def measure(step: Callable[[], None], ls_step: Callable[[], None], reps: int, warmup: int) -> dict[str, float]:
    """The median step time of ``step`` and of the LS step timed alternately with it (``ls, step, ls,
    step, ...``), so a slow stretch of the machine slows both; ``ratio_vs_ls`` is their ratio. The peak
    RSS growth is the pair's, which is ``step``'s (an LS step holds less)."""
    import time

    for _ in range(warmup):
        ls_step()
        step()
    times: dict[str, list[float]] = {"ls": [], "step": []}
    with RssPeak() as mem:
        for _ in range(reps):
            for name, fn in (("ls", ls_step), ("step", step)):
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
    step_ms, ls_ms = statistics.median(times["step"]), statistics.median(times["ls"])
    return {"step_ms": step_ms, "ls_ms": ls_ms, "ratio_vs_ls": step_ms / ls_ms, "peak_rss_mb": mem.peak_delta / 2**20}


def bench_setup(kind: str, k: int, bs: int, reps: int, warmup: int, log: Callable[[str], None]) -> dict[str, Any]:
    batch = batch_for(kind, k, bs)
    ls = ours_step(kind, k, "ls", None, batch)
    rows: dict[str, Any] = {}
    paths: dict[str, str] = {}
    split = ""
    for method in METHODS:
        rows[method] = {}
        for engine in ENGINES:
            step = torchjd_step(kind, k, method, batch) if engine == "torchjd" else ours_step(kind, k, method, engine, batch)
            if step is None:
                continue
            rows[method][engine] = measure(step, ls, reps, warmup)
            if engine == "gramian":
                paths = step.model.mtl_gramian_engine.paths()  # type: ignore[attr-defined]
                split = step.model.mtl_gramian_engine.split  # type: ignore[attr-defined]
        log(f"  {kind} K={k} B={bs} {method}: " + ", ".join(f"{e} {r['ratio_vs_ls']:.2f}x" for e, r in rows[method].items()))
    ls_runs = [r["ls_ms"] for per in rows.values() for r in per.values()]
    return {"kind": kind, "K": k, "batch": bs, "ls_ms": statistics.median(ls_runs), "ls_runs_ms": ls_runs,
            "methods": rows, "paths": paths, "split": split}


def _cell(per: dict[str, Any], engine: str, key: str, fmt: str) -> str:
    return format(per[engine][key], fmt) if engine in per else "-"


def report(results: dict[str, Any]) -> str:
    head = ["model", "K", "B", "LS ms", "method"] + [f"{e} x LS" for e in ENGINES] + \
        [f"{e} MB" for e in ENGINES] + ["jacobian / gramian time", "torchjd / gramian time"]
    rows = []
    for r in results["setups"]:
        for method, per in r["methods"].items():
            j, g, t = (per.get(e, {}).get("step_ms") for e in ("jacobian", "gramian", "torchjd"))
            rows.append([r["kind"], r["K"], r["batch"], f"{r['ls_ms']:.1f}", method,
                         *(_cell(per, e, "ratio_vs_ls", ".2f") for e in ENGINES),
                         *(_cell(per, e, "peak_rss_mb", ".0f") for e in ENGINES),
                         f"{j / g:.2f}" if g and j else "-", f"{t / g:.2f}" if g and t else "-"])
    lines = [text_table("Step time over an LS step on the same model and batch (1 thread)", head, rows), "", "Gramian engine paths per shared layer:"]
    for r in results["setups"]:
        gram = sorted(n for n, p in r["paths"].items() if p == "gram")
        lines.append(f"  {r['kind']} K={r['K']} B={r['batch']}: gram {gram or 'none'}; "
                     f"{sum(1 for p in r['paths'].values() if p != 'gram')} other modules explicit; {r.get('split', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small setups, few repetitions (the suite's run)")
    parser.add_argument("--out", type=Path, default=None, help="write gramian.{json,txt} here")
    parser.add_argument("--models", nargs="+", choices=sorted({kind for kind, _, _ in SETUPS}), default=None,
                        help="only the setups of these models")
    parser.add_argument("--reps", type=int, default=11, help="timed steps per row (median); ResNet-18 takes 3")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    torch.set_num_threads(1)
    setups, reps, warmup = (QUICK_SETUPS, 2, 1) if args.quick else (SETUPS, args.reps, 2)
    setups = [s for s in setups if args.models is None or s[0] in args.models]
    results: dict[str, Any] = {"threads": 1, "reps": reps, "warmup": warmup, "setups": []}
    with quiet(everything=True):
        for kind, k, bs in setups:
            r = 3 if kind == "resnet18" and not args.quick else reps
            results["setups"].append(bench_setup(kind, k, bs, r, min(warmup, 1) if kind == "resnet18" else warmup, print))
    print_and_write(args.out, "gramian", results, report(results))


if __name__ == "__main__":
    main()
