"""The aggregator microbenchmark's contestants: ours, TorchJD's, LibMTL's and the ``w @ J`` floor,
each a :class:`Contestant` doing one cell's work on a given ``J``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.perf.peers import LIBMTL, libmtl_module, libmtl_on_jacobian, torchjd_factories
from lightning_cost.aggregators import Aggregator, LossWeighting, build_aggregator


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
