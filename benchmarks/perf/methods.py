"""Time per training step and peak memory of every registered method over LS, on each data set's own
model and batch size.

Run::

    python -m benchmarks.perf.methods [--datasets yeast birds tox21 multimnist fingerprint_mlp]
        [--methods ls mgda ...] [--steps 20] [--warmup 5] [--ls-every 4] [--out docs/results/methods]

A setup is a data set of ``benchmarks/configs/methods/`` (its DataModule, default model, batch size,
lr and ``method_kw``; the runner's ``MTLBenchModule``, so the step is the grid's mixin path) or
``fingerprint_mlp``, the ECFP4 MLP of :mod:`benchmarks.perf.bench` (K = 12, batch 128, random bits):
the README's "time per step over LS on the fingerprint MLP". Every (setup, method) runs in a FRESH
subprocess, one at a time, with one torch thread: ``--warmup`` steps, then ``--steps`` timed steps
through a Lightning ``Trainer`` (no validation), each from ``on_train_batch_start`` to ``_end``
(:class:`~benchmarks.common.BatchTimer`); the median is the step time. Memory is the child's
``ru_maxrss`` at its end: the whole process (imports, data, model, the method's solver), so the
difference to LS is what the method adds.

LS runs first, after every ``--ls-every`` methods and last: each method's ratio is over the mean of
the two LS runs around it, so a slower stretch of a shared machine shows in both (``ls_drift``: the
last LS step over the first). LS's own row is 1.0 by definition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, text_table, write_json

__all__ = ["SETUPS", "schedule", "child", "run_child", "bench_setup", "render", "run", "main"]

SETUPS = ("yeast", "birds", "tox21", "multimnist", "fingerprint_mlp")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"
#: the fingerprint MLP's shape (benchmarks.perf.bench: ``tox21mlp``), K tasks; its method_kw are Tox21's
FINGERPRINT_K = 12
#: a model small enough for the tests: the fingerprint MLP's shapes are replaced by these
TINY = {"in": 16, "hidden": (8,), "batch": 8}


def load_config(setup: str) -> Any:
    """The :class:`~benchmarks.runner.config.RunnerConfig` of a setup's methods config (the
    fingerprint MLP uses Tox21's, for its ``method_kw`` and lr)."""
    from benchmarks.runner.config import RunnerConfig, config_from_argv

    name = "tox21" if setup == "fingerprint_mlp" else setup
    settings, _ = config_from_argv(["--config", str(CONFIGS / f"{name}.yaml")])
    return RunnerConfig(**settings)


def _dataset_parts(setup: str, method: str) -> tuple[Any, Any]:
    """The runner's module (``module_classes``, ``make_model``) and train loader for a data set."""
    import lightning as L

    from benchmarks.registry import make_datamodule, make_model, module_classes

    cfg = load_config(setup)
    dm = make_datamodule(cfg.dataset, **cfg.data_kw)
    dm.setup("fit")
    L.seed_everything(0, verbose=False)
    mtl_cls, _ = module_classes(dm)
    module = mtl_cls(make_model(dm, **cfg.model_kw), dm.task_specs, method=method, lr=cfg.lr,
                     method_kw=cfg.method_kw.get(method, {}), weight_decay=cfg.weight_decay)
    return module, dm.train_dataloader()


def _fingerprint_parts(method: str, batches: int, tiny: bool) -> tuple[Any, Any]:
    """:mod:`benchmarks.perf.bench`'s fingerprint MLP (``tiny``: the same shape of model, smaller)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.models import mlp
    from benchmarks.perf.bench import BenchMTL, build, dataset

    kw = load_config("fingerprint_mlp").method_kw.get(method, {})
    if not tiny:
        ds, bs = dataset("tox21mlp", FINGERPRINT_K, batches)
        return build("tox21mlp", FINGERPRINT_K, method, **kw), DataLoader(ds, batch_size=bs)
    torch.manual_seed(0)
    x = torch.randint(0, 2, (TINY["batch"] * batches, TINY["in"])).float()
    y = torch.randint(0, 2, (len(x), 2))
    heads = nn.ModuleList([nn.Linear(TINY["hidden"][-1], 2) for _ in range(2)])
    model = BenchMTL(mlp(TINY["in"], TINY["hidden"], batchnorm=True), heads, method, **kw)
    return model, DataLoader(TensorDataset(x, y), batch_size=TINY["batch"])


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in this (fresh) process: the median step seconds after the warm-up and the
    process's peak RSS at the end."""
    import torch

    from benchmarks.common import BatchTimer, quiet, quiet_trainer

    torch.set_num_threads(1)
    steps, warmup, method = int(spec["steps"]), int(spec["warmup"]), spec["method"]
    with quiet(everything=True):
        if spec["setup"] == "fingerprint_mlp":
            module, loader = _fingerprint_parts(method, steps + warmup, bool(spec.get("tiny")))
        else:
            module, loader = _dataset_parts(spec["setup"], method)
        timer = BatchTimer()
        quiet_trainer([timer], max_steps=steps + warmup).fit(module, train_dataloaders=loader)
    timed = timer.ms[warmup:]
    return {"step_s": statistics.median(timed) / 1e3, "timed_steps": len(timed),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "skipped_steps": int(getattr(module, "mtl_skipped_steps", 0))}


def run_child(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """:func:`child` in a fresh ``python -m benchmarks.perf.methods --child`` process, one torch and
    OpenMP thread; ``{"error": ...}`` when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf.methods", "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    return json.loads(lines[-1])


def schedule(methods: Sequence[str], ls_every: int) -> list[str]:
    """The order of the runs: LS first, after every ``ls_every`` other methods, and last."""
    others = [m for m in methods if m != "ls"]
    order = ["ls"]
    for i, m in enumerate(others, 1):
        order.append(m)
        if i % ls_every == 0 or i == len(others):
            order.append("ls")
    return order


def _ratios(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per method: its step over the mean of the LS runs before and after it, its RSS minus the
    median LS RSS; LS's row from the median of its runs (ratio 1.0, difference 0)."""
    ls_at = [i for i, (m, r) in enumerate(runs) if m == "ls" and "error" not in r]
    if not ls_at:
        raise RuntimeError("no LS run finished: nothing to compare with")
    ls_steps = [runs[i][1]["step_s"] for i in ls_at]
    ls_rss = statistics.median(runs[i][1]["peak_rss_mib"] for i in ls_at)
    rows: dict[str, Any] = {"ls": {"step_s": statistics.median(ls_steps), "time_ratio_vs_ls": 1.0,
                                   "peak_rss_mib": ls_rss, "rss_diff_mib_vs_ls": 0.0, "skipped_steps": 0}}
    for i, (m, r) in enumerate(runs):
        if m == "ls":
            continue
        if "error" in r:
            rows[m] = r
            continue
        around = [runs[j][1]["step_s"] for j in (max((j for j in ls_at if j < i), default=None),
                                                 min((j for j in ls_at if j > i), default=None)) if j is not None]
        rows[m] = {**r, "ls_step_s": statistics.fmean(around), "time_ratio_vs_ls": r["step_s"] / statistics.fmean(around),
                   "rss_diff_mib_vs_ls": r["peak_rss_mib"] - ls_rss}
    return {"methods": rows, "ls_runs_s": ls_steps, "ls_drift": ls_steps[-1] / ls_steps[0]}


def bench_setup(setup: str, methods: Sequence[str], steps: int, warmup: int, ls_every: int,
                log: Callable[[str], None] = print, tiny: bool = False) -> dict[str, Any]:
    """Every method of ``methods`` on one setup, each in its own process, LS interleaved (:func:`schedule`)."""
    runs: list[tuple[str, dict[str, Any]]] = []
    for m in schedule(methods, ls_every):
        t0 = time.perf_counter()
        r = run_child({"setup": setup, "method": m, "steps": steps, "warmup": warmup, "tiny": tiny})
        runs.append((m, r))
        what = r["error"].splitlines()[-1] if "error" in r else f"{1e3 * r['step_s']:.1f} ms, {r['peak_rss_mib']:.0f} MiB"
        log(f"  {setup} {m}: {what} ({time.perf_counter() - t0:.0f} s)")
    return {"setup": setup, "steps": steps, "warmup": warmup, "order": [m for m, _ in runs], **_ratios(runs)}


def _cells(row: dict[str, Any]) -> list[str]:
    if "error" in row:
        return ["error", "-", "-", "-", "-"]
    return [fmt(1e3 * row["step_s"], 1), fmt(row["time_ratio_vs_ls"]), fmt(row["peak_rss_mib"], 0),
            f"{row['rss_diff_mib_vs_ls']:+.0f}", str(row["skipped_steps"])]


def render(results: dict[str, Any]) -> str:
    """One plain-text table per setup and the ratio table (methods x setups, time per step over LS)."""
    parts = []
    for r in results["setups"]:
        ls = "/".join(f"{1e3 * s:.1f}" for s in r["ls_runs_s"])
        parts.append(text_table(f"{r['setup']}: median of {r['steps']} steps after {r['warmup']} warm-up "
                                f"(LS runs {ls} ms, drift {r['ls_drift']:.2f})",
                                ["method", "step ms", "x LS", "peak RSS MiB", "MiB vs LS", "skipped"],
                                [[m, *_cells(row)] for m, row in r["methods"].items()]))
    names = [r["setup"] for r in results["setups"]]
    methods = list(dict.fromkeys(m for r in results["setups"] for m in r["methods"]))
    rows = [[m, *(fmt(r["methods"].get(m, {}).get("time_ratio_vs_ls")) for r in results["setups"])] for m in methods]
    parts.append(text_table("Time per training step over LS (1 thread)", ["method", *names], rows))
    return "\n\n".join(parts)


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, load, versions."""
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": 1, "load_avg_start": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__}


def run(setups: Sequence[str], methods: Sequence[str], steps: int, warmup: int, ls_every: int,
        out: Path | None, log: Callable[[str], None] = print, tiny: bool = False, command: str = "",
        note: str = "") -> dict[str, Any]:
    """Every setup in turn; writes ``methods_perf.json`` and ``methods_perf.md`` under ``out``."""
    results: dict[str, Any] = {"machine": machine(), "command": command, "note": note, "steps": steps,
                               "warmup": warmup, "setups": []}
    for s in setups:
        results["setups"].append(bench_setup(s, methods, steps, warmup, ls_every, log, tiny))
    results["machine"]["load_avg_end"] = list(os.getloadavg())
    text = render(results)
    print(text)
    if out is not None:
        from benchmarks.runner.methods_table import perf_markdown

        write_json(out / "methods_perf.json", results)
        (out / "methods_perf.md").write_text(perf_markdown(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    from lightning_cost.aggregators import REGISTERED

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--methods", nargs="+", default=list(REGISTERED), help="registry names (LS is always run)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per method (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--ls-every", type=int, default=4, help="an LS run after this many other methods")
    p.add_argument("--out", type=Path, default=None, help="write methods_perf.{json,md} here")
    p.add_argument("--note", default="", help="a sentence on the conditions, kept in the JSON and the tables")
    p.add_argument("--tiny", action="store_true", help="fingerprint_mlp only: a tiny MLP (the tests)")
    p.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return None
    if args.steps < 1 or args.warmup < 0 or args.ls_every < 1:
        p.error("--steps and --ls-every must be >= 1, --warmup >= 0")
    command = "python -m benchmarks.perf.methods " + " ".join(argv)
    return run(args.datasets, args.methods, args.steps, args.warmup, args.ls_every, args.out, tiny=args.tiny,
               command=command, note=args.note)


if __name__ == "__main__":
    main()
