"""Task losses and per-task gradients on the teleport's batches, and the snapshot a teleport rolls back to.

Every evaluation is *global*: under DDP each rank evaluates its own samples and the value it returns
is the mean over ranks, while its gradient is the rank's own (:func:`globalize`). Averaging the
parameter gradients over ranks afterwards then gives exactly the gradient of any function of the
global losses, so a teleport's objective (eqs. 7-11) is the one-device objective on the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor, nn

from lightning_cost._precision import autocast_dtype, coarsest
from lightning_cost.distributed import all_reduce_mean
from lightning_cost.jacobian import JacobianEngine

__all__ = ["DROPOUT_LAYERS", "Snapshot", "TaskLossEvaluator", "globalize", "keep_buffers"]

#: Layers switched off during a teleport (so every evaluation is one function of the weights).
DROPOUT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)


def globalize(local: Tensor) -> Tensor:
    """The DDP mean of ``local`` as value, with ``local``'s own gradient (identity in one process)."""
    return all_reduce_mean(local.detach()) + (local - local.detach())  # value: exactly the mean


@contextlib.contextmanager
def keep_buffers(module: nn.Module) -> Iterator[None]:
    """Every buffer of ``module`` as it was on entry, afterwards (train-mode forwards update BatchNorm
    statistics; a teleport's evaluations must not)."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


class _Method(nn.Module):
    """Lets ``functional_call`` run a method of ``module`` (parameter names get the prefix ``m.``)."""

    def __init__(self, module: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.m = module
        self._fn = fn

    def forward(self, *args: Any) -> Tensor:
        return self._fn(*args)


class TaskLossEvaluator:
    """The module's ``[K]`` task losses (``evaluate_task_losses``), averaged over the teleport's batches.

    ``overrides`` maps parameter names (as in ``module.named_parameters()``) to the tensors to use
    instead (``torch.func.functional_call``): the teleporters evaluate ``theta + dtheta + eps`` that way
    and keep a gradient path to ``dtheta``. Forwards run in ``forward_context`` (the trainer's precision
    plugin's, so autocast matches training).
    """

    def __init__(self, module: Any, forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 batch_idx: int = 0) -> None:
        self.module, self.batch_idx = module, batch_idx
        self.forward_context = forward_context or contextlib.nullcontext

    @classmethod
    def for_trainer(cls, trainer: L.Trainer, module: Any, batch_idx: int = 0) -> TaskLossEvaluator:
        return cls(module, trainer.precision_plugin.forward_context, batch_idx)

    def _one(self, batch: Any, overrides: dict[str, Tensor] | None) -> Tensor:
        fn = self.module.evaluate_task_losses
        with self.forward_context():
            if not overrides:
                return fn(batch, self.batch_idx).float()
            prefixed = {"m." + k: v for k, v in overrides.items()}
            return torch.func.functional_call(_Method(self.module, fn), prefixed, (batch, self.batch_idx),
                                              strict=False).float()

    def compute_dtype(self) -> torch.dtype:
        """The precision the task losses are computed in: the autocast dtype inside ``forward_context``
        (``bfloat16`` under ``precision="bf16-mixed"``) or, coarser still, the weights' own dtype
        (``precision="bf16-true"``); ``torch.float32`` when neither is coarser."""
        params = list(self.module.parameters())
        devices = {p.device.type for p in params} or {"cpu"}
        with self.forward_context():
            active = [autocast_dtype(d) for d in devices]
        return coarsest([*active, *(p.dtype for p in params)])

    def local(self, batches: Sequence[Any], overrides: dict[str, Tensor] | None = None) -> Tensor:
        """This rank's mean task losses over ``batches`` (differentiable)."""
        return torch.stack([self._one(b, overrides) for b in batches]).mean(dim=0)

    def __call__(self, batches: Sequence[Any], overrides: dict[str, Tensor] | None = None) -> Tensor:
        """Global mean task losses (value global, gradient local: :func:`globalize`)."""
        return globalize(self.local(batches, overrides))

    def batched(self, batches: Sequence[Any], stacked: dict[str, Tensor]) -> Tensor:
        """``[n, K]`` global losses at ``n`` weight settings in one :func:`torch.func.vmap` pass each batch.

        ``stacked`` maps names to ``[n, *shape]`` tensors; buffers get ``n`` private copies, so
        train-mode statistics updates stay inside the call. Raises what ``vmap`` raises for a module it
        cannot vectorise (``.item()``, data-dependent control flow).
        """
        n = int(next(iter(stacked.values())).shape[0])
        values = dict(stacked)
        for name, b in self.module.named_buffers():
            values[name] = b.detach().unsqueeze(0).expand(n, *b.shape).clone()
        keys = list(values)

        def one(batch: Any, *tensors: Tensor) -> Tensor:
            return self._one(batch, dict(zip(keys, tensors, strict=True)))

        outs = [torch.func.vmap(lambda *t, b=b: one(b, *t), randomness="different")(*(values[k] for k in keys))
                for b in batches]
        return globalize(torch.stack(outs).mean(dim=0))

    def jacobian(self, batches: Sequence[Any], params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Global task losses ``[K]`` and per-task gradients ``[K, P]`` of ``params`` at the current weights,
        by the module's own per-task Jacobian engine (``mtl_jacobian_engine``) when it has one."""
        engine = getattr(self.module, "mtl_jacobian_engine", None) or JacobianEngine()
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                losses = self.local(batches)
                jacobian = engine.jacobian(losses, params)
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
        return all_reduce_mean(losses.detach()), jacobian

    def active_dropout(self) -> list[nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, DROPOUT_LAYERS) and m.training]

    @contextlib.contextmanager
    def dropout_off(self) -> Iterator[bool]:
        """Switch every training dropout layer off (restored after); yields whether there was one.

        With dropout on, eq. 7's ``L_t`` and the acceptance test would compare losses under different
        random masks. BatchNorm keeps using batch statistics (the snapshot restores its buffers).
        """
        layers = self.active_dropout()
        for m in layers:
            m.eval()
        try:
            yield bool(layers)
        finally:
            for m in layers:
                m.train()


class Snapshot:
    """Everything a teleport may change: the teleported weights, every buffer of the module, the
    optimizer's state of those weights, ``requires_grad`` flags and train/eval modes."""

    def __init__(self, module: nn.Module, params: Sequence[nn.Parameter], optimizer: Any) -> None:
        self.module, self.params, self.optimizer = module, list(params), optimizer
        self.weights = [p.detach().clone() for p in self.params]
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        state = getattr(optimizer, "state", {})
        self.opt_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in state[p].items()}
                          for p in self.params if p in state}
        self.flags = [(p, p.requires_grad) for p in module.parameters()]
        self.modes = [(m, m.training) for m in module.modules()]

    @torch.no_grad()
    def restore_weights(self) -> None:
        for p, w in zip(self.params, self.weights, strict=True):
            p.copy_(w)

    @torch.no_grad()
    def restore_buffers(self) -> None:
        for b, saved in self.buffers:
            b.copy_(saved)

    def restore_flags_and_modes(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode

    def restore_optimizer(self) -> None:
        state = getattr(self.optimizer, "state", None)
        if state is None:
            return
        for p in self.params:
            state.pop(p, None)
        for p, saved in self.opt_state.items():
            state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}

    def restore_all(self) -> None:
        self.restore_weights()
        self.restore_buffers()
        self.restore_flags_and_modes()
        self.restore_optimizer()

    def displacement(self) -> Tensor:
        """``theta - theta_0`` over the teleported weights, flattened (float64)."""
        return torch.cat([(p.detach().double() - w.double()).reshape(-1) for p, w in zip(self.params, self.weights,
                                                                                          strict=True)])

    def moved(self) -> bool:
        """Whether any teleported weight differs from the snapshot (a delta below float resolution does not)."""
        return any(not torch.equal(p.detach(), w) for p, w in zip(self.params, self.weights, strict=True))

    def weight_norm(self) -> float:
        return float(torch.sqrt(cast(Tensor, sum((w.double() ** 2).sum() for w in self.weights))))
