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
        self.active = True

    def parameters(self) -> list[Tensor]:
        """The trainable tensors of ``dtheta``: LoRA ``A``/``B`` matrices, then the dense deltas."""
        return self.lora_parameters() + self.deltas

    def lora_parameters(self) -> list[Tensor]:
        return [p for n, p in self.module.named_parameters() if "lora_" in n and self.adapter_name in n]

    def call(self, fn: Callable[..., Tensor], *args: Any, eps: Sequence[Tensor] | None = None) -> Tensor:
        """Run ``fn(*args)`` (a method of the module) at ``theta + dtheta (+ eps)``.

        ``eps``, if given, holds one tensor per shared parameter (in ``shared`` order).
        """
        if not self.active:
            raise RuntimeError("inject() the adapter first")
        overrides: dict[str, Tensor] = {}
        for p, d in zip(self.dense_params, self.deltas):
            overrides["m." + self._names[id(p)]] = p + d
        if eps is not None:
            for p, e in zip(self.shared, eps):
                key = "m." + self._names[id(p)]
                overrides[key] = overrides.get(key, p) + e.to(p.dtype)
        if not overrides:
            return fn(*args)
        return torch.func.functional_call(_Call(self.module, fn), overrides, args, strict=False)

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
            if merge:
                self._lora_model.merge_and_unload()
            else:
                self._lora_model.unload()
            self._lora_model = None
        if merge:
            for p, d in zip(self.dense_params, self.deltas):
                p.add_(d.detach())
        if hasattr(self.module, "peft_config"):
            try:
                delattr(self.module, "peft_config")
            except AttributeError:
                pass
        self.deltas = []
        self.active = False
