"""The sweep: every method x flag x init trained (here or in a process pool), summarised and written out."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.toy.plot import plot_results
from benchmarks.toy.problem import INITS, PARETO_TOL, PARETO_X1, PARETO_X2, init_key
from benchmarks.toy.settings import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    LABELS,
    METHODS,
    PAPER_CLIP,
    PAPER_L1_SCALE,
    cost_settings,
    method_hparams,
    rescaled_betas,
)
from benchmarks.toy.train import run_one

#: Rough relative cost of a run per method (orders the parallel sweep).
_COST_RANK = {"nashmtl": 6, "fairgrad": 3, "cagrad": 3, "mgda": 2, "pcgrad": 2}


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_one(**job)


def run_sweep(out: str | Path, methods: Sequence[str] = METHODS, inits: Sequence[Sequence[float]] = INITS,
              steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, betas: Sequence[float] | None = None,
              l1_scale: float | None = None, flags: Sequence[bool] = (False, True), record_every: int = 10,
              tol: float = PARETO_TOL, jobs: int = 1, plot: bool = True, echo: bool = True) -> dict[str, Any]:
    """Every method x flag x init; writes ``toy_summary.json``, ``toy_trajectories.json`` and ``toy.png``.

    ``toy_summary.json``::

        {"config": {steps, lr, betas, optimizer, record_every, jobs, wall_seconds, versions,
                    pareto: {x1, x2, tol, distance}, l1_scale: {method: factor}, methods,
                    inits, method_hparams: {method: {...}}, cost: {callback arguments}},
         "results": {method: {"baseline" | "cost": {"(x1, x2)": run}}},
         "counts": {method: {"baseline" | "cost": number of inits that reached the Pareto set}}}

    ``run`` = ``{init, l1_scale, steps, final_x: [x1, x2], final_losses: [L1, L2] (unscaled),
    final_pareto_distance, final_on_pareto, reached_pareto, first_pareto_step (null if never),
    teleports (accepted), teleports_rejected, teleport_events: [{step, accepted, reason, losses_before,
    losses_after (as trained, i.e. scaled), x_before, x_after (accepted only), ...}], skipped_steps,
    seconds}``. ``toy_trajectories.json`` holds ``{"config": ..., "runs": [run + method, cost,
    trajectory: {steps, x, losses (unscaled)}]}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    betas = tuple(rescaled_betas(lr) if betas is None else (float(betas[0]), float(betas[1])))
    todo = _sweep_jobs(methods, inits, flags, steps, lr, betas, l1_scale, record_every, tol)
    start = time.perf_counter()
    runs = _train_all(todo, jobs, echo)
    wall = time.perf_counter() - start
    config = _sweep_config(methods, inits, steps, lr, betas, l1_scale, record_every, tol, jobs, wall)
    summary = _summarise(config, runs)
    _write_outputs(out, config, runs, summary, plot)
    return summary


def _sweep_jobs(methods: Sequence[str], inits: Sequence[Sequence[float]], flags: Sequence[bool], steps: int,
                lr: float, betas: tuple[float, ...], l1_scale: float | None, record_every: int,
                tol: float) -> list[dict[str, Any]]:
    """The :func:`run_one` arguments of every run, method by method, then flag by flag, then init by init."""
    return [dict(method=m, init=tuple(i), cost=f, steps=steps, lr=lr, betas=betas, l1_scale=l1_scale,
                 record_every=record_every, tol=tol)
            for m in methods for f in flags for i in inits]


def _train_all(todo: Sequence[dict[str, Any]], jobs: int, echo: bool) -> list[dict[str, Any]]:
    """The records of the runs ``todo``, in its order: trained one after the other, or (``jobs > 1``) in a
    process pool."""
    if jobs > 1:
        return _train_in_pool(todo, jobs, echo)
    runs: list[dict[str, Any]] = []
    for job in todo:
        runs.append(run_one(**job))
        if echo:
            _echo(runs[-1], len(runs), len(todo))
    return runs


def _train_in_pool(todo: Sequence[dict[str, Any]], jobs: int, echo: bool) -> list[dict[str, Any]]:
    """The runs ``todo`` on a pool of ``jobs`` spawned processes, longest first; the records in ``todo``'s
    order."""
    import multiprocessing as mp

    runs: list[dict[str, Any]] = []
    # Longest runs first (Nash-MTL's solver, then the teleporting runs) so that the pool ends together.
    order = sorted(range(len(todo)),
                   key=lambda i: (-_COST_RANK.get(todo[i]["method"], 1) - todo[i]["cost"], i))
    with mp.get_context("spawn").Pool(jobs) as pool:
        for r in pool.imap_unordered(_run_job, [todo[i] for i in order]):
            runs.append(r)
            if echo:
                _echo(r, len(runs), len(todo))
    rank = {(j["method"], j["cost"], tuple(j["init"])): i for i, j in enumerate(todo)}
    runs.sort(key=lambda r: rank[(r["method"], r["cost"], tuple(r["init"]))])
    return runs


def _sweep_config(methods: Sequence[str], inits: Sequence[Sequence[float]], steps: int, lr: float,
                  betas: tuple[float, ...], l1_scale: float | None, record_every: int, tol: float, jobs: int,
                  wall: float) -> dict[str, Any]:
    """The ``"config"`` of ``toy_summary.json`` (see :func:`run_sweep`)."""
    scales = {m: (PAPER_L1_SCALE.get(m, 1.0) if l1_scale is None else float(l1_scale)) for m in methods}
    clips = {m: (PAPER_CLIP.get(m) if l1_scale is None else None) for m in methods}
    config = {
        "steps": steps, "lr": lr, "betas": list(betas), "optimizer": "Adam", "record_every": record_every,
        "jobs": jobs, "wall_seconds": wall,
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version()},
        "pareto": {"x1": list(PARETO_X1), "x2": PARETO_X2, "tol": tol,
                   "distance": "euclidean distance to the segment, checked after every optimizer step"},
        "l1_scale": scales, "gradient_clip": clips, "methods": list(methods),
        "inits": [[float(v) for v in i] for i in inits],
        "method_hparams": {m: {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in method_hparams(m, scales[m]).items()} for m in methods},
        "cost": cost_settings(steps),
    }
    return config


def _write_outputs(out: Path, config: dict[str, Any], runs: Sequence[dict[str, Any]], summary: dict[str, Any],
                   plot: bool) -> None:
    """``toy_summary.json``, ``toy_trajectories.json`` and (``plot``) ``toy.png`` in ``out``."""
    (out / "toy_summary.json").write_text(json.dumps(summary, indent=1))
    (out / "toy_trajectories.json").write_text(json.dumps({"config": config, "runs": runs}))
    if plot:
        plot_results(runs, out / "toy.png")


def _summarise(config: dict[str, Any], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``toy_summary.json`` (see :func:`run_sweep`) from the config and the runs' records."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for r in runs:
        flag = "cost" if r["cost"] else "baseline"
        rec = {k: v for k, v in r.items() if k not in ("trajectory", "method", "cost")}
        results.setdefault(r["method"], {}).setdefault(flag, {})[init_key(r["init"])] = rec
        counts.setdefault(r["method"], {}).setdefault(flag, 0)
        counts[r["method"]][flag] += int(r["reached_pareto"])
    return {"config": config, "results": results, "counts": counts}


def _echo(r: dict[str, Any], i: int, n: int) -> None:
    """One console line for run ``i`` of ``n`` as it finishes."""
    step = r["first_pareto_step"]
    tele = f"teleports {r['teleports']}/{r['teleports'] + r['teleports_rejected']}" if r["cost"] else ""
    print(f"[{i:>2}/{n}] {LABELS.get(r['method'], r['method']):>8} {'+COST' if r['cost'] else '     '} "
          f"{init_key(r['init']):>12} -> ({r['final_x'][0]:7.3f}, {r['final_x'][1]:7.3f}) "
          f"{'Pareto @ ' + str(step) if step is not None else 'not on Pareto':<16} {tele:<16} "
          f"{r['seconds']:5.1f}s", flush=True)
