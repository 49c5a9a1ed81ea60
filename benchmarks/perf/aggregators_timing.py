"""The aggregator microbenchmark's measurement of one cell (method, K, P): its contestants timed in
interleaved repetitions, and the row of medians, ratios and agreements."""

from __future__ import annotations

import gc
import statistics
from typing import Any

import torch
from torch import Tensor

from benchmarks.perf.aggregators_contestants import Contestant, floor, libmtl, mixin_check, ours, torchjd
from benchmarks.perf.peers import cosine, synthetic_jacobian

#: Methods that draw random numbers: their updates differ from a peer's by design.
RANDOM = {"pcgrad", "graddrop", "rlw"}

#: Differences between our defaults / solver and the peer's (printed with the table).
NOTES = {
    ("mgda", "torchjd"): "Frank-Wolfe stopped at step < 1e-3 (inexact for K >= 3); ours: exact active set",
    ("mgda", "libmtl"): "projected-gradient iterations (STOP_CRIT 1e-5), K=2 weights clipped to [0.001, 0.999]",
    ("cagrad", "torchjd"): "cvxpy/Clarabel on an SVD factor of G, no rescale; ours: exact dual, rescale 1/(1+c^2)",
    ("cagrad", "libmtl"): "scipy SLSQP on the dual (code only works for K=3)",
    ("imtl", "torchjd"): "pinv(G) sqrt(diag G) normalised; the same weights for full-rank J",
    ("imtl", "libmtl"): "torch.inverse of (D U^T) in float32 on the K x P matrices; also IMTL-L loss scales",
    ("nashmtl", "torchjd"): "max_norm=0 (no clipping, as ours); per-constraint cvxpy problem, 100 ECOS iters",
    ("fairgrad", "torchjd"): "least_squares with finite-difference Jacobian and default tolerances (1e-8)",
    ("pcgrad", "libmtl"): "O(K^2) P-vector projections in a Python loop",
    ("graddrop", "torchjd"): "independent random draws",
    ("ls", "torchjd"): "Sum aggregator",
    ("rlw", "torchjd"): "Random aggregator (independent draws)",
    ("ls", "libmtl"): "EW: weighted loss backward",
    ("dwa", "libmtl"): "DWA after 2 epochs: weighted loss backward",
    ("rlw", "libmtl"): "RLW(dist='Normal'): weighted loss backward",
    ("uw", "libmtl"): "UW: weighted loss backward (1/2 factors differ)",
}


def task_losses(k: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(k, generator=g) + 0.5


# --------------------------------------------------------------------------- timing


def time_cell(contestants: list[Contestant], budget_s: float, min_reps: int, max_reps: int) -> int:
    """Warm up, then interleave repetitions (rotating order); returns the number of repetitions."""
    live = []
    for c in contestants:
        if c.error is not None:
            continue
        try:
            warm = [c.call()[0] for _ in range(2)]
        except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
            c.error = f"{type(err).__name__}: {err}"[:160]
            continue
        c.times, c.cpu_times = [], []
        live.append((c, min(warm)))
    if not live:
        return 0
    per_rep = sum(t for _, t in live) * 1e-3
    reps = max(min_reps, min(max_reps, int(budget_s / max(per_rep, 1e-6))))
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            n = len(live)
            for i in range(n):
                c = live[(i + r) % n][0]
                wall, cpu = c.call()
                c.times.append(wall)
                c.cpu_times.append(cpu)
    finally:
        gc.enable()
    return reps


def _stats(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "min_ms": min(times)}


def bench_cell(
    name: str, k: int, p: int, budget_s: float, min_reps: int, max_reps: int, clock: str = "wall"
) -> dict[str, Any]:
    jac = synthetic_jacobian(k, p, seed=k)
    losses = task_losses(k, seed=k)
    cs: list[Contestant | None] = [ours(name, jac, losses), torchjd(name, jac), libmtl(name, jac, losses), floor(jac)]
    if name not in ("ls", "si", "rlw", "dwa", "uw", "famo"):
        cs.append(mixin_check(jac))
    contestants = [c for c in cs if c is not None]
    reps = time_cell(contestants, budget_s, min_reps, max_reps)
    row: dict[str, Any] = {"method": name, "K": k, "P": p, "reps": reps, "random": name in RANDOM, "clock": clock}
    if clock == "cpu":  # thread CPU time: less sensitive to other processes on a loaded machine
        for c in contestants:
            c.times, c.cpu_times = c.cpu_times, c.times
    by = {c.name: c for c in contestants}
    for c in contestants:
        if c.error is not None:
            row[c.name] = {"error": c.error}
        elif c.times:
            row[c.name] = _stats(c.times)
            row[c.name]["other_clock_median_ms"] = statistics.median(c.cpu_times)
    mine = by["ours"]
    for peer in ("torchjd", "libmtl"):
        c = by.get(peer)
        if c is None:
            continue
        if NOTES.get((name, peer)):
            row.setdefault("notes", {})[peer] = NOTES[(name, peer)]
        if mine.times and c.times:
            row[f"ratio_{peer}"] = statistics.median(mine.times) / statistics.median(c.times)
            row[f"paired_ratio_{peer}"] = statistics.median(a / b for a, b in zip(mine.times, c.times, strict=True))
            row[f"cos_{peer}"] = cosine(mine.out, c.out)
    if mine.times:
        row["ratio_floor"] = statistics.median(mine.times) / statistics.median(by["floor"].times)
    del jac
    return row
