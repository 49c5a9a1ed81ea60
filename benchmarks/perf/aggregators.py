"""Microbenchmark: every method of lightning_cost against the same method in TorchJD and LibMTL,
on identical Jacobians ``J`` of shape ``[K, P]``.

Run::

    python -m benchmarks.perf.aggregators [--out results/perf_aggregators] [--quick]
        [--methods imtl,mgda] [--ks 2,3,10,40] [--ps 10000,1000000] [--budget 2.0]
        [--compare OLD.json]

What is timed is the work the training core does with ``J`` for that method:

* an :class:`~lightning_cost.aggregators.Aggregator`: ``method.aggregate(J)``, the call
  :meth:`MultiTaskMixin._mtl_aggregate` makes (after its own zero-row check, which is timed
  separately as ``mixin_check``: it is the mixin's cost, not the method's);
* a :class:`~lightning_cost.aggregators.LossWeighting`: what the mixin does when it has ``J``:
  ``w = method.loss_weights(losses)``, ``d = w @ J``, ``method.observe(losses)`` (and, for UW,
  the backward of ``method(losses)`` into its log-variances).

Peers, on the same ``J`` (float32, the dtype of a float32 model's gradients):

* TorchJD: ``aggregator(J)``.
* LibMTL: ``weighting.backward(losses, **kwargs)`` with its gradient computation replaced by
  ``J`` itself (no copy; none of these weightings writes into it) and its ``.grad`` write-back
  replaced by capturing the update. LibMTL's loss weightings (EW, DWA, RLW, UW) back-propagate
  their weighted loss: here the losses are ``L = J theta + L0`` with a leaf ``theta`` (built
  untimed before every call), so the timed backward computes ``J^T w`` into ``theta.grad``.

``floor`` is one ``w @ J`` (a single pass over ``J``): no method can be much faster than that.

Method: ``torch.set_num_threads(1)``; per cell (method, K, P) two warm-up calls each, then
repetitions in which the contestants run back to back in a rotating order (so that load drift
on the shared machine hits all of them alike); the reported time is the median, and
``ours/peer`` is the ratio of the medians (``paired`` in the JSON: the median of the per-
repetition ratios). The number of repetitions adapts to a time budget per cell (at least
``--min-reps``). ``agree`` is the cosine between our update and the peer's (1 = same
direction; random methods and methods with other defaults differ by design, see ``note``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import fmt, text_table
from benchmarks.perf.peers import (
    LIBMTL,
    cosine,
    libmtl_module,
    libmtl_on_jacobian,
    synthetic_jacobian,
    torchjd_factories,
)
from lightning_cost.aggregators import AVAILABLE, Aggregator, LossWeighting, build_aggregator

KS = (2, 3, 10, 40)
PS = (10_000, 1_000_000)

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


# --------------------------------------------------------------------------- contestants


@dataclass
class Contestant:
    """One way of doing a cell's work: ``prepare`` (untimed) then ``run`` (timed) -> the update."""

    name: str
    run: Callable[[], Tensor | None]
    prepare: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    error: str | None = None
    out: Tensor | None = None

    def call(self) -> tuple[float, float]:
        """Wall and thread-CPU time (ms) of one ``run``."""
        if self.prepare is not None:
            self.prepare()
        c = time.thread_time_ns()
        t = time.perf_counter_ns()
        out = self.run()
        dt = (time.perf_counter_ns() - t) * 1e-6
        dc = (time.thread_time_ns() - c) * 1e-6
        self.out = out
        return dt, dc


def ours(name: str, jac: Tensor, losses: Tensor) -> Contestant:
    k = jac.shape[0]
    kw: dict[str, Any] = {}
    if name == "uw":
        kw["num_tasks"] = k
    if name in ("pcgrad", "graddrop", "rlw"):
        kw["seed"] = 0
    m = build_aggregator(name, **kw)
    if name == "dwa":  # two epochs observed (L(t-2) = 1.1 L, L(t-1) = L): the softmax weights are computed
        for epoch_losses in (losses * 1.1, losses):
            m.observe(epoch_losses)
            m.on_epoch_end()
    if isinstance(m, Aggregator):
        return Contestant("ours", lambda: m.aggregate(jac))

    assert isinstance(m, LossWeighting)
    trainable = any(p.requires_grad for p in m.parameters())

    def weighting() -> Tensor:  # the LossWeighting API on a given J: weights, their combination, the step's state
        d = m.loss_weights(losses).to(jac.dtype) @ jac
        m.observe(losses)
        if trainable:  # UW: the gradient of its own parameters (the log-variances) through its objective
            m(losses).backward()
        return d

    def zero() -> None:
        for p in m.parameters():
            p.grad = None

    return Contestant("ours", weighting, zero if trainable else None)


def mixin_check(jac: Tensor) -> Contestant:
    """The zero-row test MultiTaskMixin._mtl_aggregate runs before calling the aggregator."""
    return Contestant("mixin_check", lambda: (jac.abs().amax(dim=1) > 0).all())


def floor(jac: Tensor) -> Contestant:
    w = torch.ones(jac.shape[0], dtype=jac.dtype)
    return Contestant("floor", lambda: w @ jac)


def torchjd(name: str, jac: Tensor) -> Contestant | None:
    factories = torchjd_factories(jac.shape[0])
    if name not in factories:
        return None
    try:
        agg = factories[name]()
    except Exception as err:  # noqa: BLE001 - e.g. a missing optional dependency
        c = Contestant("torchjd", lambda: None)
        c.error = repr(err)[:120]
        return c
    return Contestant("torchjd", lambda: agg(jac))


def libmtl(name: str, jac: Tensor, losses: Tensor) -> Contestant | None:
    if name not in LIBMTL:
        return None
    mod, cls, kw, jacobian_based = LIBMTL[name]
    try:
        if jacobian_based:
            run, prepare = libmtl_on_jacobian(name, jac, losses)
            return Contestant("libmtl", run, prepare)
        w = getattr(libmtl_module(mod), cls)()
    except Exception as err:  # noqa: BLE001 - not installed / import error
        c = Contestant("libmtl", lambda: None)
        c.error = repr(err)[:120]
        return c
    p = jac.shape[1]
    w.task_num, w.device, w.rep_grad = jac.shape[0], torch.device("cpu"), False
    w.init_param()
    if name == "dwa":
        w.epoch = 2
        w.train_loss_buffer = np.stack([losses.numpy() * 1.2, losses.numpy() * 1.1, losses.numpy()], axis=1)
    theta = torch.zeros(p, dtype=jac.dtype, requires_grad=True)
    graph: list[Tensor] = []

    def build() -> None:  # untimed: the "forward" whose backward LibMTL's weighting runs
        theta.grad = None
        for q in w.parameters():
            q.grad = None
        graph[:] = [jac @ theta + losses]

    def backward() -> Tensor:
        w.backward(graph[0], **kw)
        return theta.grad  # type: ignore[return-value]

    return Contestant("libmtl", backward, build)


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


# --------------------------------------------------------------------------- output


def _ms(row: dict[str, Any], who: str) -> str:
    r = row.get(who)
    if r is None:
        return "-"
    if "error" in r:
        return "err"
    v = r["median_ms"]
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def render(rows: list[dict[str, Any]]) -> str:
    header = ["method", "K", "P", "reps", "ours ms", "torchjd", "ours/tjd", "cos", "libmtl", "ours/lib", "cos",
              "floor", "ours/floor", "mixin chk"]
    cells = [[r["method"], str(r["K"]), f"{r['P']:.0e}", str(r["reps"]), _ms(r, "ours"), _ms(r, "torchjd"),
              fmt(r.get("ratio_torchjd")), fmt(r.get("cos_torchjd"), 3), _ms(r, "libmtl"), fmt(r.get("ratio_libmtl")),
              fmt(r.get("cos_libmtl"), 3), _ms(r, "floor"), fmt(r.get("ratio_floor"), 1), _ms(r, "mixin_check")]
             for r in rows]
    out = text_table("", header, cells).splitlines()
    errors = [f"  {r['method']} K={r['K']} P={r['P']:.0e} {who}: {r[who]['error']}"
              for r in rows for who in ("ours", "torchjd", "libmtl") if isinstance(r.get(who), dict) and "error" in r[who]]
    if errors:
        out += ["", "errors:", *errors]
    notes = sorted({(r["method"], peer, text) for r in rows for peer, text in r.get("notes", {}).items()})
    if notes:
        out += ["", "what the peers compute differently:", *(f"  {m} / {p}: {t}" for m, p, t in notes)]
    return "\n".join(out)


def _pair(row: dict[str, Any], peer: str) -> str:
    """``ratio (paired)`` of one row and peer."""
    r, q = row.get(f"ratio_{peer}"), row.get(f"paired_ratio_{peer}")
    return "-" if r is None else f"{r:.2f} ({q:.2f})"


def render_compare(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """Before/after table of the ratios ours/peer: ratio of the medians (median of the paired ratios)."""
    key = lambda r: (r["method"], r["K"], r["P"])  # noqa: E731
    before = {key(r): r for r in old}
    header = ["method", "K", "P", "/tjd before", "/tjd after", "/lib before", "/lib after", "ours ms before", "after"]
    cells = []
    for r in new:
        b = before.get(key(r), {})
        cells.append([r["method"], str(r["K"]), f"{r['P']:.0e}", _pair(b, "torchjd"), _pair(r, "torchjd"),
                      _pair(b, "libmtl"), _pair(r, "libmtl"), _ms(b, "ours") if b else "-", _ms(r, "ours")])
    return text_table("", header, cells)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    for name in ("torchjd", "LibMTL", "cvxpy", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run(methods: tuple[str, ...] = AVAILABLE, ks: tuple[int, ...] = KS, ps: tuple[int, ...] = PS,
        budget_s: float = 2.0, min_reps: int = 7, max_reps: int = 200, out_dir: str | Path | None = None,
        log: Callable[[str], None] | None = None, clock: str = "wall") -> dict[str, Any]:
    torch.set_num_threads(1)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    rows = []
    with warnings.catch_warnings(), contextlib.suppress(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        for p in ps:
            for k in ks:
                for name in methods:
                    row = bench_cell(name, k, p, budget_s, min_reps, max_reps, clock)
                    rows.append(row)
                    log(f"  {name} K={k} P={p:.0e}: ours {_ms(row, 'ours')} ms, torchjd {_ms(row, 'torchjd')}, "
                        f"libmtl {_ms(row, 'libmtl')} ({row['reps']} reps)")
                gc.collect()
    res = {"meta": {"threads": torch.get_num_threads(), "budget_s": budget_s, "min_reps": min_reps, "clock": clock,
                    "versions": _versions(), "seconds": time.perf_counter() - t0,
                    "timed": "ours: aggregate(J) / loss_weights + w @ J + observe; torchjd: agg(J); "
                             "libmtl: weighting.backward with J injected"},
           "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "aggregators.json").write_text(json.dumps(res, indent=1))
        (out / "aggregators.txt").write_text(render(rows) + "\n")
    return res


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in s.split(",") if x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/perf_aggregators", help="folder for aggregators.json / .txt")
    ap.add_argument("--methods", default=",".join(AVAILABLE))
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--ps", default=",".join(map(str, PS)))
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed repetitions per cell (approx.)")
    ap.add_argument("--min-reps", type=int, default=7)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="K in (2, 10), P = 1e4, short budget")
    ap.add_argument("--compare", help="an earlier aggregators.json: print the ratios before/after")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what the medians and ratios are of: wall time (default) or this thread's CPU time "
                         "(less sensitive to other processes; the other clock is kept in the JSON)")
    args = ap.parse_args(argv)
    ks, ps, budget = _ints(args.ks), _ints(args.ps), args.budget
    if args.quick:
        ks, ps, budget = (2, 10), (10_000,), min(budget, 0.3)
    methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
    res = run(methods, ks, ps, budget, args.min_reps, args.max_reps, args.out, clock=args.clock)
    print(render(res["rows"]))
    if args.compare:
        old = json.loads(Path(args.compare).read_text())["rows"]
        print("\nratios ours/peer (< 1: ours faster), before = " + args.compare)
        print(render_compare(old, res["rows"]))
        Path(args.out, "compare.txt").write_text(render_compare(old, res["rows"]) + "\n")
    print(f"\nwrote {Path(args.out) / 'aggregators.json'} in {res['meta']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
