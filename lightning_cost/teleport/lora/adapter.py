"""The LoRA teleport's displacement ``dtheta``: PEFT LoRA on supported shared layers, dense deltas elsewhere.

LoRA (``peft.tuners.lora.LoraModel``) is injected into every ``nn.Linear``, ``nn.Conv1d/2d/3d``
(``groups == 1``) and ``nn.Embedding`` whose ``weight`` is a teleported parameter, and into nothing
else: task heads are never adapted. Teleported parameters that are not the weight of such a layer
(normalisation affines, a raw ``nn.Parameter``, grouped convolutions) get a *dense delta*: a
zero-initialised tensor of the same shape. Biases of LoRA layers stay fixed (PEFT's ``bias="none"``).

The adapter never runs PEFT's LoRA branch: :meth:`TeleportAdapter.overrides` gives each adapted layer
the weight ``W + s B A`` (PEFT's ``get_delta_weight``, the formula ``merge`` uses) to evaluate through
``torch.func.functional_call``. The function is the same (linear in the input), the gradient reaches
``A`` and ``B`` through the delta, a forward costs what the plain network costs, and the point
evaluated is bit for bit the point :meth:`TeleportAdapter.merge` writes. The merge keeps the
optimizer's Parameter objects (PEFT's ``merge_and_unload`` puts back the same ones).

The LoRA initialisation (``A`` Kaiming-uniform, ``B = 0``, as PEFT) draws from the generator it is
given, and PEFT's own construction runs under a forked RNG: a teleport never moves the global
random stream, so training after it is what it would have been.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SUPPORTED_LAYERS", "TeleportAdapter"]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _lora_targets(module: nn.Module, ids: set[int]) -> list[str]:
    targets = []
    for name, sub in module.named_modules():
        if not isinstance(sub, SUPPORTED_LAYERS) or id(getattr(sub, "weight", None)) not in ids:
            continue
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and sub.groups != 1:
            continue  # PEFT cannot merge grouped convolutions: a dense delta covers them
        targets.append(name)
    return targets


class TeleportAdapter:
    """Injects, trains and merges the teleport displacement on ``params`` of ``module``.

    Args:
        module: the LightningModule (adapted in place while the adapter is active).
        params: the parameters to teleport.
        rank: LoRA rank ``r`` (the authors use 5).
        alpha: LoRA ``lora_alpha`` (scaling ``alpha / r``); defaults to ``rank`` (scaling 1).
        use_lora: ``False`` puts a dense delta on every parameter (no PEFT).
    """

    adapter_name = "cost_teleport"

    def __init__(self, module: nn.Module, params: Sequence[nn.Parameter], rank: int = 5, alpha: float | None = None,
                 use_lora: bool = True) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.module, self.params = module, list(params)
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        ids = {id(p) for p in self.params}
        self.lora_targets = _lora_targets(module, ids) if use_lora else []
        lora_ids = {id(module.get_submodule(t).weight) for t in self.lora_targets}
        self.dense_params = [p for p in self.params if id(p) not in lora_ids]
        self.deltas: list[Tensor] = []
        self._lora_model: Any = None
        self._lora_layers: list[tuple[str, Any]] = []  # (name of the base weight, PEFT LoRA layer)
        self._names: dict[int, str] = {}
        self.active = False

    # -------------------------------------------------------------- lifecycle
    def inject(self, generator: torch.Generator | None = None) -> None:
        """Add the adapters; ``A`` is drawn from ``generator`` (the global RNG is left as it was)."""
        if self.active:
            raise RuntimeError("the adapter is already injected")
        devices = sorted({p.device for p in self.params if p.device.type == "cuda"}, key=str)
        with torch.random.fork_rng(devices=devices):
            self._inject_peft()
        self._names = {id(p): n for n, p in self.module.named_parameters()}
        self.deltas = [torch.zeros_like(p, requires_grad=True) for p in self.dense_params]
        for target in self.lora_targets:
            layer: Any = self.module.get_submodule(target)  # a PEFT LoRA layer
            layer.enable_adapters(False)  # the LoRA branch is off: dtheta enters through the weight
            self._lora_layers.append((self._names[id(layer.get_base_layer().weight)], layer))
        self._initialise(generator)
        self.active = True

    def _inject_peft(self) -> None:
        if not self.lora_targets:
            return
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        # PEFT annotates lora_alpha as int, but only uses lora_alpha / r: a float alpha is exact.
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha,  # type: ignore[arg-type]
                            target_modules=list(self.lora_targets), lora_dropout=0.0, bias="none")
        self._lora_model = LoraModel(self.module, config, self.adapter_name)

    @torch.no_grad()
    def _initialise(self, generator: torch.Generator | None) -> None:
        """PEFT's LoRA initialisation (``A`` Kaiming-uniform, ``B = 0``; embeddings the other way round)
        drawn from ``generator``; every LoRA tensor trainable (``enable_adapters(False)`` froze them)."""
        for _, layer in self._lora_layers:
            name = self.adapter_name
            if name in layer.lora_A:
                _draw(layer.lora_A[name].weight, generator, embedding=False)
                layer.lora_B[name].weight.zero_()
            if name in getattr(layer, "lora_embedding_A", {}):
                layer.lora_embedding_A[name].zero_()
                _draw(layer.lora_embedding_B[name], generator, embedding=True)
        for p in self.lora_parameters():
            p.requires_grad_(True)

    @torch.no_grad()
    def restart(self, generator: torch.Generator | None = None) -> None:
        """Back to ``dtheta = 0`` with a fresh draw of ``A`` (a new inner search from the same point)."""
        if not self.active:
            raise RuntimeError("inject() the adapter first")
        self._initialise(generator)
        for d in self.deltas:
            d.zero_()

    def values(self) -> list[Tensor]:
        """A copy of :meth:`parameters` (to come back to with :meth:`load`)."""
        return [p.detach().clone() for p in self.parameters()]

    @torch.no_grad()
    def load(self, values: Sequence[Tensor]) -> None:
        """Set :meth:`parameters` to ``values`` (from :meth:`values` of this adapter)."""
        for p, v in zip(self.parameters(), values, strict=True):
            p.copy_(v)

    def parameters(self) -> list[Tensor]:
        """The trainable tensors of ``dtheta``: LoRA ``A``/``B`` matrices, then the dense deltas."""
        return self.lora_parameters() + self.deltas

    def lora_parameters(self) -> list[Tensor]:
        return [p for n, p in self.module.named_parameters() if "lora_" in n and self.adapter_name in n]

    def name_of(self, p: Tensor) -> str:
        """The name under which :meth:`overrides` gives ``p``."""
        return self._names[id(p)]

    def overrides(self, eps: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """``theta + dtheta (+ eps)`` for the parameters that differ from ``theta``, keyed by name.

        Adapted layers get ``W + s B A``, dense-delta parameters ``p + d``; with ``eps`` (one tensor per
        parameter in ``params`` order, optionally with a leading batch dimension) every parameter gets
        ``+ eps``. Differentiable w.r.t. :meth:`parameters`; computed outside autocast.
        """
        if not self.active:
            raise RuntimeError("inject() the adapter first")
        out: dict[str, Tensor] = {}
        device_type = self.params[0].device.type if self.params else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            for key, layer in self._lora_layers:
                w = layer.get_base_layer().weight
                out[key] = w + layer.get_delta_weight(self.adapter_name).to(w.dtype)
            for p, d in zip(self.dense_params, self.deltas, strict=True):
                out[self._names[id(p)]] = p + d
        return out if eps is None else self.perturb(out, eps)

    def perturb(self, overrides: dict[str, Tensor], eps: Sequence[Tensor]) -> dict[str, Tensor]:
        """``overrides`` with ``eps`` added to every parameter (a leading dimension of ``eps`` broadcasts)."""
        out = dict(overrides)
        for p, e in zip(self.params, eps, strict=True):
            key = self._names[id(p)]
            out[key] = out.get(key, p) + e.to(p.dtype)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Write ``dtheta`` into the parameters in place and remove every adapter."""
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
            delattr(self.module, "peft_config")
        self.deltas, self._lora_layers = [], []
        self.active = False


def _draw(t: Tensor, generator: torch.Generator | None, embedding: bool) -> None:
    """PEFT's draw for a LoRA factor, from ``generator`` (on CPU, then copied to ``t``'s device)."""
    cpu = torch.empty(t.shape, dtype=t.dtype)
    if embedding:
        cpu.normal_(generator=generator)
    else:
        torch.nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
    t.copy_(cpu)
