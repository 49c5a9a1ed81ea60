"""The teleport's displacement ``dtheta``: PEFT LoRA on supported shared layers, dense deltas elsewhere.

LoRA (via ``peft.tuners.lora.LoraModel``) is injected into every ``nn.Linear``, ``nn.Conv1d/2d/3d``
(``groups == 1``) and ``nn.Embedding`` whose ``weight`` is a shared parameter, and into nothing
else: task heads are never adapted. Shared parameters that are not the weight of such a layer
(BatchNorm/LayerNorm affine parameters, a raw ``nn.Parameter`` as in the 2-D toy problem, grouped
convolutions) get a *dense delta*: a zero-initialised tensor of the same shape, added to the
parameter. Biases of LoRA layers stay fixed, as in PEFT's default ``bias="none"``.

Forward passes at ``theta + dtheta (+ eps)`` go through :func:`torch.func.functional_call`, so
the perturbed point keeps a gradient path to the adapter (the authors' code lost it, NOTES.md
sec. 2). :meth:`TeleportAdapter.merge` writes ``dtheta`` into the existing Parameter objects in
place (PEFT's ``merge_and_unload`` keeps them), so every reference the optimizer holds stays valid.

**Merged-weight evaluation.** PEFT's LoRA layers compute ``base(x) + B(A(x)) * s``: for a
convolution that is two extra convolutions over the full feature maps. The adapter instead
switches PEFT's LoRA branch off (``enable_adapters(False)``) and hands the layer the weight
``W + get_delta_weight()`` (``W + s B A``, PEFT's own formula, the one ``merge`` uses) through
``functional_call``. The function is the same (linear in ``x``), the gradient reaches ``A`` and
``B`` through the delta, a forward costs what the plain network costs, and the point evaluated is
bit for bit the point :meth:`merge` produces. Measured (``python -m benchmarks.perf.cost_budget
--sections levers``, one CPU thread): on the MultiMNIST LeNet (batch 256) a forward takes 0.59x
PEFT's and a forward + backward 0.59x; on the Yeast MLP (batch 64, forwards of a few ms) the two
are within noise (0.6x to 1.7x over two runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SUPPORTED_LAYERS", "TeleportAdapter"]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


class _Call(nn.Module):
    """Lets ``functional_call`` run an arbitrary method of ``module`` (names get the prefix ``m.``)."""

    def __init__(self, module: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.m = module
        self._fn = fn

    def forward(self, *args: Any) -> Tensor:
        return self._fn(*args)


def _lora_targets(module: nn.Module, shared_ids: set[int]) -> list[str]:
    targets = []
    for name, sub in module.named_modules():
        if not isinstance(sub, SUPPORTED_LAYERS) or id(getattr(sub, "weight", None)) not in shared_ids:
            continue
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and sub.groups != 1:
            continue  # PEFT cannot merge grouped convolutions: a dense delta covers them
        targets.append(name)
    return targets


class TeleportAdapter:
    """Injects, trains and merges the teleport displacement on ``shared`` parameters of ``module``.

    Args:
        module: the LightningModule (adapted in place while the adapter is active).
        shared: its shared parameters.
        rank: LoRA rank ``r`` (the authors use 5).
        alpha: LoRA ``lora_alpha`` (scaling ``alpha / r``); defaults to ``rank`` (scaling 1).
        use_lora: ``False`` puts a dense delta on every shared parameter (no PEFT).
    """

    adapter_name = "cost_teleport"

    def __init__(
        self,
        module: nn.Module,
        shared: Sequence[nn.Parameter],
        rank: int = 5,
        alpha: float | None = None,
        use_lora: bool = True,
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.module = module
        self.shared = list(shared)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        shared_ids = {id(p) for p in self.shared}
        self.lora_targets = _lora_targets(module, shared_ids) if use_lora else []
        lora_weight_ids = {id(module.get_submodule(t).weight) for t in self.lora_targets}
        self.dense_params = [p for p in self.shared if id(p) not in lora_weight_ids]
        self.deltas: list[Tensor] = []
        self._lora_model: Any = None
        self._lora_layers: list[tuple[str, Any]] = []  # (key of the base weight, PEFT LoRA layer)
        self._names: dict[int, str] = {}
        self.active = False

    # -------------------------------------------------------------- lifecycle
    def inject(self) -> None:
        if self.active:
            raise RuntimeError("the adapter is already injected")
        if self.lora_targets:
            from peft import LoraConfig
            from peft.tuners.lora import LoraModel

            config = LoraConfig(
                r=self.rank,
                lora_alpha=self.alpha,
                target_modules=list(self.lora_targets),
                lora_dropout=0.0,
                bias="none",
            )
            self._lora_model = LoraModel(self.module, config, self.adapter_name)
        self.deltas = [torch.zeros_like(p, requires_grad=True) for p in self.dense_params]
        self._names = {id(p): n for n, p in self.module.named_parameters()}
        self._lora_layers = []
        for target in self.lora_targets:
            layer = self.module.get_submodule(target)
            layer.enable_adapters(False)  # the LoRA branch is off: dtheta enters through the weight (see above)
            self._lora_layers.append(("m." + self._names[id(layer.get_base_layer().weight)], layer))
        for p in self.lora_parameters():
            p.requires_grad_(True)  # enable_adapters(False) froze them
        self.active = True

    def parameters(self) -> list[Tensor]:
        """The trainable tensors of ``dtheta``: LoRA ``A``/``B`` matrices, then the dense deltas."""
        return self.lora_parameters() + self.deltas

    def lora_parameters(self) -> list[Tensor]:
        return [p for n, p in self.module.named_parameters() if "lora_" in n and self.adapter_name in n]

    def overrides(self, eps: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The weights that differ from ``theta``: ``theta + dtheta (+ eps)``, keyed for :meth:`call`.

        LoRA layers get ``W + s B A`` (PEFT's ``get_delta_weight``), dense-delta parameters
        ``p + d``; with ``eps`` (one tensor per shared parameter, in ``shared`` order, each of the
        parameter's shape or with one extra leading dimension for :meth:`call_batched`), every
        shared parameter gets ``+ eps``. Differentiable w.r.t. :meth:`parameters`; computed in the
        parameters' precision (outside autocast). Compute it once and pass it to several calls.
        """
        if not self.active:
            raise RuntimeError("inject() the adapter first")
        out: dict[str, Tensor] = {}
        device_type = self.shared[0].device.type if self.shared else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            for key, layer in self._lora_layers:
                w = layer.get_base_layer().weight
                out[key] = w + layer.get_delta_weight(self.adapter_name).to(w.dtype)
            for p, d in zip(self.dense_params, self.deltas, strict=True):
                out["m." + self._names[id(p)]] = p + d
        return out if eps is None else self.perturb(out, eps)

    def perturb(self, overrides: dict[str, Tensor], eps: Sequence[Tensor]) -> dict[str, Tensor]:
        """``overrides`` (from :meth:`overrides`) with ``eps`` added to every shared parameter."""
        out = dict(overrides)
        for p, e in zip(self.shared, eps, strict=True):
            key = "m." + self._names[id(p)]
            out[key] = out.get(key, p) + e.to(p.dtype)
        return out

    def call(
        self,
        fn: Callable[..., Tensor],
        *args: Any,
        eps: Sequence[Tensor] | None = None,
        overrides: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Run ``fn(*args)`` (a method of the module) at ``theta + dtheta (+ eps)``.

        ``eps``, if given, holds one tensor per shared parameter (in ``shared`` order).
        ``overrides`` (from :meth:`overrides`) saves recomputing ``theta + dtheta``.
        """
        if not self.active:
            raise RuntimeError("inject() the adapter first")
        ov = self.overrides() if overrides is None else overrides
        if eps is not None:
            ov = self.perturb(ov, eps)
        if not ov:
            return fn(*args)
        return torch.func.functional_call(_Call(self.module, fn), ov, args, strict=False)

    def call_batched(
        self,
        fn: Callable[..., Tensor],
        *args: Any,
        eps: Sequence[Tensor],
        overrides: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """``fn(*args)`` at ``theta + dtheta + eps_j`` for ``n`` perturbations in one vectorised pass.

        ``eps`` holds one ``[n, *shape]`` tensor per shared parameter. The ``n`` forwards run as one
        :func:`torch.func.vmap` over stacked weights (``functional_call`` with a leading batch
        dimension on every shared weight); the result stacks the ``n`` outputs, ``[n, ...]``, equal
        to ``n`` calls of :meth:`call` up to float rounding. Buffers (BatchNorm running statistics)
        are given as ``n`` private copies, so the in-place statistics updates of a train-mode
        forward stay inside the call and the module's buffers are not touched. Random ops (dropout)
        draw independently per perturbation. Raises whatever ``vmap`` raises for a module it cannot
        vectorise (data-dependent Python control flow, ``.item()``, ...).
        """
        if not self.active:
            raise RuntimeError("inject() the adapter first")
        ov = self.overrides() if overrides is None else overrides
        n = int(eps[0].shape[0])
        batched = self.perturb({k: v.unsqueeze(0) for k, v in ov.items()}, eps)
        for name, b in self.module.named_buffers():
            batched["m." + name] = b.detach().unsqueeze(0).expand(n, *b.shape).clone()
        keys = list(batched)
        call = _Call(self.module, fn)

        def one(*values: Tensor) -> Tensor:
            return torch.func.functional_call(call, dict(zip(keys, values, strict=True)), args, strict=False)

        return torch.func.vmap(one, randomness="different")(*(batched[k] for k in keys))

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``dtheta`` into the shared parameters in place and remove every adapter."""
        self._unload(merge=True)

    @torch.no_grad()
    def discard(self) -> None:
        """Remove every adapter without touching the weights."""
        self._unload(merge=False)

    def _unload(self, merge: bool) -> None:
        if not self.active:
            return
        if self._lora_model is not None:
            for _, layer in self._lora_layers:
                layer.enable_adapters(True)  # merge_and_unload merges the active adapters
            if merge:
                self._lora_model.merge_and_unload()
            else:
                self._lora_model.unload()
            self._lora_model = None
        if merge:
            for p, d in zip(self.dense_params, self.deltas, strict=True):
                p.add_(d.detach())
        if hasattr(self.module, "peft_config"):
            try:
                delattr(self.module, "peft_config")
            except AttributeError:
                pass
        self.deltas = []
        self._lora_layers = []
        self.active = False
