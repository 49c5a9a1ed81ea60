"""Sections 3 and 6 of the perf benchmark: each aggregator's solve time on the models' J against the
step, and the peers (TorchJD, LibMTL) on the same J."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from benchmarks.perf.measure import ratio, timeit
from benchmarks.perf.peers import LIBMTL, cosine, libmtl_on_jacobian, torchjd_factories
from lightning_cost.aggregators import AVAILABLE, Aggregator, LossWeighting, build_aggregator

TARGET_SOLVE_PCT = 5.0  # aggregator solve <= 5% of a step for K <= 10

# --------------------------------------------------------------------------- 3. solve / 6. peers
# Section 6 is a quick look on the models' J; benchmarks/perf/aggregators.py is the careful per-method
# comparison (every method, K in 2..40, P up to 1e6, interleaved repetitions, wall or CPU clock).


def _our_method(name: str, k: int) -> Aggregator | LossWeighting:
    kw = {"num_tasks": k} if name == "uw" else {}
    return build_aggregator(name, **kw)


def time_ours(name: str, jac: Tensor, losses: Tensor, reps: int) -> tuple[float, Tensor | None]:
    m = _our_method(name, jac.shape[0])
    if isinstance(m, Aggregator):
        out: list[Tensor] = []
        ms = timeit(lambda: out.append(m.aggregate(jac)), reps)
        return ms, out[-1]
    return timeit(lambda: m.loss_weights(losses), reps), None  # a loss weighting: K weights, no solve on J


#: the methods section 6 compares with peers (gradient aggregators: the same J in, an update out)
_PEER_METHODS = ("mgda", "pcgrad", "imtl", "cagrad", "graddrop", "nashmtl", "fairgrad")


def time_libmtl(name: str, jac: Tensor, losses: Tensor, reps: int) -> tuple[float, Tensor]:
    """LibMTL's weighting on a given J (:func:`~benchmarks.perf.peers.libmtl_on_jacobian`)."""
    if name not in LIBMTL or not LIBMTL[name][3]:
        raise NotImplementedError
    run, prepare = libmtl_on_jacobian(name, jac, losses)
    out: list[Tensor] = []
    ms = timeit(lambda: (prepare(), out.append(run())), reps)
    return ms, out[-1]


def bench_solve_and_peers(jacs: dict[str, tuple[Tensor, Tensor, float, bool]], reps: int,
                          log: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    solve_rows, peer_rows = [], []
    for key, (jac, losses, step_ms, extrapolated) in jacs.items():
        k = jac.shape[0]
        reps_here = reps if k * jac.shape[1] < 5e7 else 1
        ours_out: dict[str, Tensor | None] = {}
        for name in AVAILABLE:
            try:
                ms, d = time_ours(name, jac, losses, reps_here)
            except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
                solve_rows.append({"setup": key, "K": k, "method": name, "error": repr(err)})
                continue
            ours_out[name] = d
            pct = 100.0 * ms / step_ms
            solve_rows.append({"setup": key, "K": k, "P": int(jac.shape[1]), "method": name, "solve_ms": ms,
                               "step_ms": step_ms, "step_extrapolated": extrapolated, "pct_of_step": pct,
                               "target_applies": k <= 10, "pass": (pct <= TARGET_SOLVE_PCT) if k <= 10 else None})
        log(f"  solve {key} done")
        tjd = {m: f for m, f in torchjd_factories(k).items() if m in _PEER_METHODS}
        for name in sorted(set(tjd) | {"mgda", "pcgrad", "cagrad", "imtl"}):
            row: dict[str, Any] = {"setup": key, "K": k, "method": name}
            ours = next((r for r in solve_rows if r["setup"] == key and r["method"] == name and "solve_ms" in r), None)
            row["ours_ms"] = ours["solve_ms"] if ours else None
            if name in tjd:
                try:
                    agg = tjd[name]()
                    out: list[Tensor] = []
                    row["torchjd_ms"] = timeit(lambda a=agg, o=out, j=jac: o.append(a(j)), reps_here)
                    row["ratio_ours_vs_torchjd"] = ratio(row["ours_ms"], row["torchjd_ms"]) if ours else None
                    row["cos_ours_torchjd"] = cosine(ours_out.get(name), out[-1])
                except Exception as err:  # noqa: BLE001
                    row["torchjd_error"] = repr(err)[:200]
            try:
                if name in ("pcgrad", "mgda") and k * k * jac.shape[1] > 2e9:
                    raise RuntimeError("skipped: O(K^2) Python loop over P-vectors, minutes at this size")
                ms, d = time_libmtl(name, jac, losses, reps_here)
                row["libmtl_ms"] = ms
                row["ratio_ours_vs_libmtl"] = ratio(row["ours_ms"], ms) if ours else None
                row["cos_ours_libmtl"] = cosine(ours_out.get(name), d)
            except NotImplementedError:
                row["libmtl_error"] = "not available"
            except Exception as err:  # noqa: BLE001
                row["libmtl_error"] = repr(err)[:200]
            peer_rows.append(row)
        log(f"  peers {key} done")
    return solve_rows, peer_rows

