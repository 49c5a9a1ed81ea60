"""Performance benchmark of lightning_cost: step time and memory of every method, per-task
gradient cost, aggregator solve time, teleport and trigger cost, and peers (TorchJD, LibMTL).

Run::

    python -m benchmarks.perf.bench [--quick] [--out results/perf]

Everything runs on CPU with ``torch.set_num_threads(1)`` (the project's machines share 2 cores
between several jobs), so absolute times are noisy and machine-dependent: the headline numbers
are *ratios* measured in the same process.

Memory is the peak resident set size (RSS) of the process during the measured run, sampled every
5 ms from ``/proc/self/statm``, minus the RSS just before the run (after ``gc.collect()`` and
``malloc_trim``). ``tracemalloc`` is not used: it does not see PyTorch's tensor allocations.

This module is the command line and the run; the sections live in :mod:`benchmarks.perf.bench_gradients`
(1, 2), :mod:`benchmarks.perf.bench_solve` (3, 6) and :mod:`benchmarks.perf.bench_teleport` (4, 5), the
models and data in :mod:`benchmarks.perf.bench_models`, the tables in :mod:`benchmarks.perf.bench_render`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.perf.bench_gradients import bench_methods, bench_pertask
from benchmarks.perf.bench_models import BenchMTL, build, dataset, lenet_parts
from benchmarks.perf.bench_render import render
from benchmarks.perf.bench_solve import bench_solve_and_peers
from benchmarks.perf.bench_teleport import bench_teleport, bench_trigger
from benchmarks.perf.measure import RssPeak, malloc_trim
from benchmarks.perf.peers import synthetic_jacobian

#: what other modules import from here (their homes: bench_models, measure)
__all__ = ["BenchMTL", "RssPeak", "build", "dataset", "lenet_parts", "main", "make_config", "run"]

# --------------------------------------------------------------------------- configuration


def make_config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(quick=True, lenet_steps=4, lenet_warmup=1, resnet=False, resnet_ks=(), resnet_steps=0,
                    resnet_warmup=0, grad_reps=2, lenet_ks=(2, 10), mlp_ks=(12,), solve_reps=3, synth_k=40,
                    teleports=1, trigger_p=200_000, trigger_ks=(2, 3, 5, 10, 20, 40), trigger_reps=3)
    return dict(quick=False, lenet_steps=20, lenet_warmup=3, resnet=True, resnet_ks=(2, 3, 10), resnet_steps=4,
                resnet_warmup=1, grad_reps=3, lenet_ks=(2, 3, 10), mlp_ks=(12,), solve_reps=3, synth_k=40,
                teleports=5, trigger_p=None, trigger_ks=(2, 3, 5, 10, 20, 40), trigger_reps=3)

# --------------------------------------------------------------------------- main


def _peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torchjd", "LibMTL"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["LibMTL_note"] = ("`import LibMTL` fails (LibMTL/model/resnet.py imports torchvision.models.utils); "
                          "its weighting modules are imported directly; GradDrop needs rep_grad (not on J); "
                          "_get_grads/_reset_grad stubbed to feed J and capture the update")
    return out


def run(quick: bool = False, out_dir: str | Path = "results/perf", log: Callable[[str], None] | None = None,
        cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = make_config(quick)
    cfg.update(cfg_overrides or {})
    t0 = time.perf_counter()
    res: dict[str, Any] = {"meta": {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "python": platform.python_version(), "config": {k: list(v) if isinstance(v, tuple)
                                                                                    else v for k, v in cfg.items()},
                                    "memory_metric": "peak RSS delta over the Trainer.fit (sampled every 5 ms "
                                                     "from /proc/self/statm; not tracemalloc)",
                                    "peers": _peer_versions()}}
    log("1. step time of every method ...")
    res["methods"] = bench_methods(cfg, log)
    log("2. per-task gradients ...")
    pertask, jacs = [], {}
    setups = ([("lenet", k) for k in cfg["lenet_ks"]] + [("tox21mlp", k) for k in cfg["mlp_ks"]]
              + [("resnet18", k) for k in cfg["resnet_ks"]])
    for kind, k in setups:
        r, jac, losses = bench_pertask(kind, k, cfg["grad_reps"])
        key = f"{kind}_K{k}"
        pertask.append({"setup": key, "K": k, **r})
        jacs[key] = (jac, losses, r["mixin_ms"], False)
        log(f"  {key}: mixin {r['mixin_ms']:.1f} ms, K plain {r['k_plain_ms']:.1f} ms")
    res["pertask"] = pertask
    # synthetic K=40 on the largest model's P; its step extrapolated from a + b K fitted on the measured ones
    big = "resnet18" if cfg["resnet_ks"] else "lenet"
    pts = [(r["K"], r["mixin_ms"]) for r in pertask if r["setup"].startswith(big)]
    ks, ts = [p[0] for p in pts], [p[1] for p in pts]
    kbar, tbar = statistics.mean(ks), statistics.mean(ts)
    slope = sum((a - kbar) * (b - tbar) for a, b in pts) / max(sum((a - kbar) ** 2 for a in ks), 1e-12)
    k40 = cfg["synth_k"]
    step40 = tbar + slope * (k40 - kbar)
    p_big = next(r["P"] for r in pertask if r["setup"].startswith(big))
    jacs[f"synthetic_{big}P_K{k40}"] = (synthetic_jacobian(k40, p_big), torch.rand(k40) + 0.5, step40, True)
    log("3+6. solve time and peers ...")
    res["solve"], res["peers"] = bench_solve_and_peers(jacs, cfg["solve_reps"], log)
    del jacs
    malloc_trim()
    log("4. teleport ...")
    res["teleport"] = bench_teleport(cfg, res["methods"]["lenet_K2"]["methods"]["ls"]["step_ms"])
    log("5. trigger ...")
    steps = {k: tbar + slope * (k - kbar) for k in cfg["trigger_ks"]}
    res["trigger"] = bench_trigger(cfg, cfg["trigger_p"] or p_big, steps if cfg["trigger_p"] is None else {})
    res["meta"]["seconds"] = time.perf_counter() - t0
    res["targets"] = {
        "pertask_le_1.1x_k_plain": {r["setup"]: r["pass"] for r in res["pertask"]},
        "solve_le_5pct_step_k_le_10": {f"{r['setup']}/{r['method']}": r["pass"] for r in res["solve"]
                                       if r.get("pass") is not None},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(res, indent=1, default=float))
    text = render(res)
    (out / "perf.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'perf.json'} in {res['meta']['seconds']:.0f} s")
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="LeNet only, few steps (< 60 s)")
    ap.add_argument("--out", default="results/perf", help="output folder for perf.json / perf.txt")
    args = ap.parse_args(argv)
    run(args.quick, args.out)


if __name__ == "__main__":
    main()
