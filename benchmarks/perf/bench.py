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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import BatchTimer, quiet, quiet_trainer, text_table
from benchmarks.perf.peers import LIBMTL, cosine, libmtl_on_jacobian, synthetic_jacobian, torchjd_factories
from lightning_cost import MultiTaskMixin
from lightning_cost.aggregators import AVAILABLE, Aggregator, LossWeighting, build_aggregator

TARGET_PERTASK = 1.1  # mixin Jacobian <= 1.1 x K plain backward passes
TARGET_SOLVE_PCT = 5.0  # aggregator solve <= 5% of a step for K <= 10

# --------------------------------------------------------------------------- configuration


def make_config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(quick=True, lenet_steps=4, lenet_warmup=1, resnet=False, resnet_ks=(), resnet_steps=0,
                    resnet_warmup=0, grad_reps=2, lenet_ks=(2, 10), mlp_ks=(12,), solve_reps=3, synth_k=40,
                    teleports=1, trigger_p=200_000, trigger_ks=(2, 3, 5, 10, 20, 40), trigger_reps=3)
    return dict(quick=False, lenet_steps=20, lenet_warmup=3, resnet=True, resnet_ks=(2, 3, 10), resnet_steps=4,
                resnet_warmup=1, grad_reps=3, lenet_ks=(2, 3, 10), mlp_ks=(12,), solve_reps=3, synth_k=40,
                teleports=5, trigger_p=None, trigger_ks=(2, 3, 5, 10, 20, 40), trigger_reps=3)


# --------------------------------------------------------------------------- utilities


def _malloc_trim() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak RSS delta (bytes) over a block, sampled every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_delta, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> RssPeak:
        _malloc_trim()
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_delta = self.peak - self.base


def timeit(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b > 0 else float("nan")


# --------------------------------------------------------------------------- models


class BenchMTL(MultiTaskMixin, L.LightningModule):
    """A shared trunk and K classification heads; ``training_step`` returns the K losses."""

    def __init__(self, trunk: nn.Module, heads: nn.ModuleList, method: Any = "ls", lr: float = 1e-3,
                 **multitask: Any) -> None:
        super().__init__()
        self.trunk, self.heads, self.lr = trunk, heads, lr
        self.configure_multitask([f"t{i}" for i in range(len(heads))], shared=self.trunk, method=method, **multitask)

    def task_loss_list(self, batch: Any) -> list[Tensor]:
        x, y = batch
        z = self.trunk(x)
        return [F.cross_entropy(h(z), y[:, i]) for i, h in enumerate(self.heads)]

    def task_losses(self, batch: Any) -> Tensor:
        return torch.stack(self.task_loss_list(batch))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return dict(zip(self.task_names, self.task_loss_list(batch), strict=True))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def lenet_parts(k: int) -> tuple[nn.Module, nn.ModuleList]:
    from benchmarks.data.tasks import TaskSpec
    from benchmarks.models import lenet_multimnist

    net = lenet_multimnist([TaskSpec.multiclass(f"t{i}", 10) for i in range(k)], in_shape=(1, 28, 28))
    return net.trunk, nn.ModuleList(list(net.heads.values()))


def tox21_mlp_parts(k: int) -> tuple[nn.Module, nn.ModuleList]:
    """The Tox21/QM8 tables' model: ECFP4 (2048 bits) -> 512 -> 256 MLP trunk, one head per task."""
    from benchmarks.models import mlp

    return mlp(2048, (512, 256), batchnorm=True, dropout=0.1), nn.ModuleList([nn.Linear(256, 2) for _ in range(k)])


def resnet_parts(k: int) -> tuple[nn.Module, nn.ModuleList]:
    from torchvision.models import resnet18

    trunk = resnet18(num_classes=10)
    width = trunk.fc.in_features
    trunk.fc = nn.Identity()
    return trunk, nn.ModuleList([nn.Linear(width, 10) for _ in range(k)])


_MNIST_CACHE: dict[int, TensorDataset] = {}


def multimnist_train(n: int) -> TensorDataset:
    """MultiMNIST (28x28, the original recipe) train composites, real data."""
    if n not in _MNIST_CACHE:
        from benchmarks.data import MultiMNISTDataModule

        dm = MultiMNISTDataModule(num_train=n, num_val=256, num_test=256, batch_size=256, image_size=28)
        dm.setup("fit")
        _MNIST_CACHE[n] = dm.train_set
    return _MNIST_CACHE[n]


def dataset(kind: str, k: int, batches: int) -> tuple[TensorDataset, int]:
    """The benchmark data: MultiMNIST for LeNet (random labels for K > 2), random 64x64 for ResNet."""
    g = torch.Generator().manual_seed(0)
    if kind == "lenet":
        bs = 256
        try:
            ds = multimnist_train(bs * batches)
            x, y = ds.tensors
        except (FileNotFoundError, KeyError, OSError):  # no data file: same shapes, random
            x, y = torch.randn(bs * batches, 1, 28, 28, generator=g), torch.randint(0, 10, (bs * batches, 2), generator=g)
        if k != 2:
            y = torch.randint(0, 10, (len(x), k), generator=g)
        return TensorDataset(x, y), bs
    if kind == "tox21mlp":  # fingerprint-shaped bits, random labels: only the shapes matter for timing
        bs = 128
        x = torch.randint(0, 2, (bs * batches, 2048), generator=g).float()
        return TensorDataset(x, torch.randint(0, 2, (bs * batches, k), generator=g)), bs
    bs = 8
    x = torch.randn(bs * batches, 3, 64, 64, generator=g)
    return TensorDataset(x, torch.randint(0, 10, (bs * batches, k), generator=g)), bs


def build(kind: str, k: int, method: Any = "ls", **multitask: Any) -> BenchMTL:
    torch.manual_seed(0)
    parts = {"lenet": lenet_parts, "tox21mlp": tox21_mlp_parts, "resnet18": resnet_parts}[kind]
    trunk, heads = parts(k)
    return BenchMTL(trunk, heads, method, **multitask)


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
              "ls_drift": _ratio(ls_runs[-1]["step_ms"], ls_runs[0]["step_ms"])}
        rows = {"ls": ls, **rows}
        floor = 1.0  # MB: RSS deltas below 1 MB are noise
        for r in rows.values():
            r["time_ratio_vs_ls"] = _ratio(r["step_ms"], ls["step_ms"])
            r["mem_ratio_vs_ls"] = _ratio(max(r["peak_rss_delta_mb"], floor), max(ls["peak_rss_delta_mb"], floor))
        out[key] = {"kind": kind, "K": k, "steps": steps, "warmup": warmup, "methods": rows}
    return out


# --------------------------------------------------------------------------- 2. per-task gradients


def _shared_row(model: BenchMTL) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.trunk.parameters()])


def bench_pertask(kind: str, k: int, reps: int) -> tuple[dict[str, float], Tensor, Tensor]:
    ds, bs = dataset(kind, k, 1)
    batch = ds.tensors[0][:bs], ds.tensors[1][:bs]
    model = build(kind, k, "ls")
    model.request_jacobian(True)
    model.train()

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

    with quiet(everything=True):
        r = {name: timeit(fn, reps) for name, fn in
             [("mixin_ms", mixin), ("k_plain_ms", k_plain), ("k_retain_ms", k_retain), ("sum_backward_ms", summed),
              ("forward_ms", forward), ("mixin_loop_ms", in_mode("loop")), ("mixin_batched_ms", in_mode("batched"))]}
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
        for mode in ("loop", "batched"):  # peak memory of one step in each jacobian_mode
            _malloc_trim()
            with RssPeak() as mem:
                in_mode(mode)()
            r[f"mixin_{mode}_peak_mb"] = mem.peak_delta / 2**20
        model.zero_grad(set_to_none=True)
        model.training_step(batch, 0)
    jac = model.mtl_step.jacobian.detach().clone()
    losses = model.mtl_step.losses.detach().clone()
    r.update(P=int(jac.shape[1]), ratio_mixin_vs_k_plain=_ratio(r["mixin_ms"], r["k_plain_ms"]),
             ratio_mixin_vs_k_retain=_ratio(r["mixin_ms"], r["k_retain_ms"]),
             ratio_mixin_vs_sum_backward=_ratio(r["mixin_ms"], r["sum_backward_ms"]),
             ratio_batched_vs_loop=_ratio(r["mixin_batched_ms"], r["mixin_loop_ms"]),
             ratio_mixin_vs_torchjd=_ratio(r["mixin_ms"], r["torchjd_ms"]) if "torchjd_ms" in r else None)
    r["pass"] = bool(r["ratio_mixin_vs_k_plain"] <= TARGET_PERTASK)
    return r, jac, losses


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
                    row["ratio_ours_vs_torchjd"] = _ratio(row["ours_ms"], row["torchjd_ms"]) if ours else None
                    row["cos_ours_torchjd"] = cosine(ours_out.get(name), out[-1])
                except Exception as err:  # noqa: BLE001
                    row["torchjd_error"] = repr(err)[:200]
            try:
                if name in ("pcgrad", "mgda") and k * k * jac.shape[1] > 2e9:
                    raise RuntimeError("skipped: O(K^2) Python loop over P-vectors, minutes at this size")
                ms, d = time_libmtl(name, jac, losses, reps_here)
                row["libmtl_ms"] = ms
                row["ratio_ours_vs_libmtl"] = _ratio(row["ours_ms"], ms) if ours else None
                row["cos_ours_libmtl"] = cosine(ours_out.get(name), d)
            except NotImplementedError:
                row["libmtl_error"] = "not available"
            except Exception as err:  # noqa: BLE001
                row["libmtl_error"] = repr(err)[:200]
            peer_rows.append(row)
        log(f"  peers {key} done")
    return solve_rows, peer_rows


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
            "ratio_teleport_vs_step": _ratio(mean_tp, step_ms),
            "ratio_teleport_vs_ls_step": _ratio(mean_tp, ls_step_ms) if ls_step_ms else None,
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
               "ratio_vs_float32_variant": _ratio(ms, ms32),
               "gramian_ms": timeit(lambda j=jac: gramian(j), cfg["trigger_reps"]),
               "gramian_plain_ms": timeit(lambda j=jac: j @ j.T, cfg["trigger_reps"])}
        row["ratio_gramian_blocked_vs_plain"] = _ratio(row["gramian_ms"], row["gramian_plain_ms"])
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
        _malloc_trim()
    return rows


# --------------------------------------------------------------------------- tables


def _passed(v: Any) -> Any:
    return ("PASS" if v else "MISS") if isinstance(v, bool) else v


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    return "\n" + text_table(f"== {title}", header, [[_passed(c) for c in r] for r in rows])


def render(res: dict[str, Any]) -> str:
    parts = [f"lightning_cost perf benchmark ({'quick' if res['meta']['quick'] else 'full'}); "
             f"torch {res['meta']['torch']}, {res['meta']['threads']} thread(s) on a shared 2-core CPU under load; "
             "ratios are the headline, absolute times are indicative only.",
             f"memory = {res['meta']['memory_metric']}"]
    for key, blk in res["methods"].items():
        rows = [[m, r["step_ms"], r["time_ratio_vs_ls"], r["peak_rss_delta_mb"], r["mem_ratio_vs_ls"], r["skipped_steps"]]
                for m, r in blk["methods"].items()]
        parts.append(table(f"1. Step time through a Lightning Trainer, {key} (median of {blk['steps']} steps after "
                           f"{blk['warmup']} warm-up; LS runs start/mid/end "
                           f"{'/'.join(f'{t:.0f}' for t in blk['methods']['ls']['ls_runs_ms'])} ms)",
                           ["method", "step ms", "x LS", "peak RSS MB", "mem x LS", "skipped"], rows))
    rows = [[r["setup"], r["P"], r["forward_ms"], r["sum_backward_ms"], r["k_plain_ms"], r["k_retain_ms"], r["mixin_ms"],
             r["ratio_mixin_vs_k_plain"], r["ratio_mixin_vs_k_retain"], r["ratio_mixin_vs_sum_backward"], r["pass"],
             "" if r["pass"] else f"+{100 * (r['ratio_mixin_vs_k_plain'] / TARGET_PERTASK - 1):.0f}% over"]
            for r in res["pertask"]]
    parts.append(table(f"2. Exact per-task gradients (ms, median); target mixin <= {TARGET_PERTASK} x K plain backwards "
                       "(each re-running the forward)",
                       ["setup", "P", "fwd", "sum bwd", "K plain", "K retain", "mixin", "/K plain", "/K retain",
                        "/sum bwd", "target", "miss by"], rows))
    rows = [[r["setup"], r.get("mixin_loop_ms"), r.get("mixin_batched_ms"), r.get("ratio_batched_vs_loop"),
             r.get("mixin_loop_peak_mb"), r.get("mixin_batched_peak_mb"), r.get("torchjd_ms", r.get("torchjd_error")),
             r.get("ratio_mixin_vs_torchjd"),
             f"{r['torchjd_max_abs_diff']:.1e}" if "torchjd_max_abs_diff" in r else ""] for r in res["pertask"]]
    parts.append(table("2b. jacobian_mode: K VJPs ('loop') vs one VJP with K cotangents ('batched', the default "
                       "'auto'); mixin step ms and peak RSS MB of one step; TorchJD's engine on the same step "
                       "(mtl_backward + jac_to_grad(Sum); max |diff| of the shared update vs ours)",
                       ["setup", "loop ms", "batched ms", "batched/loop", "loop MB", "batched MB", "torchjd ms",
                        "mixin/tjd", "max diff"], rows))
    rows = []
    for r in res["solve"]:
        if "error" in r:
            rows.append([r["setup"], r["K"], r["method"], "ERROR", "", "", "", r["error"][:60]])
            continue
        miss = "" if r["pass"] in (True, None) else f"{r['pct_of_step'] / TARGET_SOLVE_PCT:.1f}x over"
        rows.append([r["setup"], r["K"], r["method"], r["solve_ms"], r["step_ms"], r["pct_of_step"], r["pass"], miss])
    parts.append(table(f"3. Solve time alone on the model's J (loss weightings: loss_weights only); % of the step "
                       f"(forward + K VJPs; K=40 step extrapolated linearly in K); target <= {TARGET_SOLVE_PCT}% for K<=10",
                       ["setup", "K", "method", "solve ms", "step ms", "% step", "target", "miss by"], rows))
    t = res["teleport"]
    parts.append(table("4. Teleport cost (MultiMNIST LeNet, forced, default callback settings)",
                       ["teleports", "accepted", "mean ms", "step ms (w/ J)", "x step", "x LS step"],
                       [[t["teleports"], t["accepted"], t["teleport_ms_mean"], t["step_ms_with_jacobian"],
                         t["ratio_teleport_vs_step"], t["ratio_teleport_vs_ls_step"]]]))
    def _e(v: Any) -> str:
        return f"{v:.1e}" if isinstance(v, float) else ""

    rows = [[r["K"], r["P"], r["conflict_cosines_ms"], r["float32_variant_ms"], r["ratio_vs_float32_variant"],
             _e(r.get("cos_abs_err")), _e(r.get("cos_plain_abs_err")), r.get("pct_of_step"), r.get("gramian_ms"),
             r.get("gramian_plain_ms"), r.get("ratio_gramian_blocked_vs_plain"), _e(r.get("gramian_rel_err")),
             _e(r.get("gramian_plain_rel_err"))] for r in res["trigger"]]
    parts.append(table("5. Trigger cosines and Gramian J J^T on a synthetic J at the model's P: ours (sums blocked by "
                       "65536 columns) vs one BLAS call over P; ms and max error vs float64 (abs for cos, relative "
                       "for G)",
                       ["K", "P", "cos ms", "plain ms", "x plain", "cos err", "plain err", "% step", "G ms",
                        "G plain ms", "x plain", "G rel err", "plain rel err"], rows))
    rows = [[r["setup"], r["method"], r.get("ours_ms"), r.get("torchjd_ms"), r.get("ratio_ours_vs_torchjd"),
             r.get("cos_ours_torchjd"), r.get("libmtl_ms") if "libmtl_ms" in r else r.get("libmtl_error", "")[:40],
             r.get("ratio_ours_vs_libmtl"), r.get("cos_ours_libmtl")] for r in res["peers"]]
    parts.append(table("6. Peers on the same J (ms; ratio < 1: ours faster; cos = agreement of the directions)",
                       ["setup", "method", "ours", "torchjd", "ours/tjd", "cos tjd", "libmtl", "ours/lib", "cos lib"],
                       rows))
    parts.append(f"\npeers: {json.dumps(res['meta']['peers'])}")
    return "\n".join(parts)


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
    _malloc_trim()
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
