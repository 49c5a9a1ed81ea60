"""Per-task gradients w.r.t. the shared representation, for the teleport's representation trigger.

After :meth:`RepresentationGradients.request_representation_jacobian`, each training step records
in ``mtl_step.representation_jacobian`` (``[K, B, D]``) the gradient of every task loss w.r.t. the
shared representation: the output of the shared module when ``configure_multitask`` got a module
(a forward hook captures it during ``training_step`` only), or whatever ``training_step`` passes to
:meth:`~RepresentationGradients.mark_representation`. With a Jacobian step these gradients come out
of the same vector-Jacobian products as the parameter Jacobian (no extra pass); with a loss
weighting they cost one batched backward (K cotangents) through the heads only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RepresentationGradients", "stack_representation_gradients"]


class RepresentationGradients:
    """The representation part of :class:`~lightning_cost.MultiTaskMixin` (capture and gradients)."""

    def _mtl_init_representation(self, shared: nn.Module | Any) -> None:
        modules = self.named_modules() if isinstance(shared, nn.Module) else ()  # type: ignore[attr-defined]
        self._mtl_shared_module_name: str | None = next((n for n, m in modules if m is shared), None)
        self._mtl_rep_requested = False
        self._mtl_rep_hook: Any = None
        self._mtl_capture = False
        self._mtl_reps: list[Tensor] = []
        self._mtl_marked: list[Tensor] = []

    def request_representation_jacobian(self, enabled: bool = True) -> None:
        """Record ``mtl_step.representation_jacobian`` (per-task gradients w.r.t. the shared representation).

        The representation is the output of the module given as ``shared`` to
        ``configure_multitask`` (captured by a forward hook during ``training_step`` only), or,
        if ``training_step`` calls :meth:`mark_representation`, the tensors it marks.
        """
        self._mtl_rep_requested = bool(enabled)
        name = self._mtl_shared_module_name
        if enabled and self._mtl_rep_hook is None and name is not None:
            module = self.get_submodule(name)  # type: ignore[attr-defined]
            self._mtl_rep_hook = module.register_forward_hook(self._mtl_capture_output)
        elif not enabled and self._mtl_rep_hook is not None:
            self._mtl_rep_hook.remove()
            self._mtl_rep_hook = None

    def mark_representation(self, z: Tensor) -> Tensor:
        """Mark ``z`` as (part of) the shared representation of this step; returns ``z`` unchanged.

        Call it in ``training_step`` on the output of the shared part when the shared parameters were
        given as a list (or to choose another tensor than the shared module's output). Cheap no-op
        unless :meth:`request_representation_jacobian` is on.
        """
        if getattr(self, "_mtl_capture", False):
            self._mtl_marked.append(z)
        return z

    def _mtl_capture_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if getattr(self, "_mtl_capture", False) and isinstance(output, Tensor):
            self._mtl_reps.append(output)

    def _mtl_start_capture(self) -> None:
        self._mtl_reps, self._mtl_marked = [], []
        self._mtl_capture = bool(getattr(self, "_mtl_rep_requested", False))

    def _mtl_end_capture(self) -> list[Tensor]:
        """Stop capturing; the step's representation tensors (marked ones take precedence)."""
        self._mtl_capture = False
        reps = [z for z in (self._mtl_marked or self._mtl_reps) if z.requires_grad]
        self._mtl_reps, self._mtl_marked = [], []
        return reps

    def _mtl_rep_jacobian(self, losses: Tensor, reps: Sequence[Tensor], scale: float) -> Tensor:
        """``[K, B, D]`` gradients of the K losses w.r.t. the representation (graph kept for the backward).

        Through the heads only, with the module's Jacobian engine (one batched VJP by default).
        """
        grads = self.mtl_jacobian_engine.vjps(losses * scale if scale != 1.0 else losses,  # type: ignore[attr-defined]
                                              reps, retain=True)
        return stack_representation_gradients(grads, reps, losses.shape[0], scale)


def stack_representation_gradients(grads: Sequence[Tensor | None], reps: Sequence[Tensor], k: int,
                                   scale: float) -> Tensor:
    """``[K, B, D]`` from the per-tensor ``[K, *shape]`` gradients of the representation tensors
    (``None``: no task reaches it; ``[K, 1, N]`` if they disagree on ``B``), detached, float32 and
    divided by ``scale``."""
    return torch.stack([_task_rows([g[i] if g is not None else None for g in grads], reps, scale) for i in range(k)])


def _task_rows(grads: Sequence[Tensor | None], reps: Sequence[Tensor], scale: float) -> Tensor:
    """One task's representation gradients as ``[B, D]`` (``[1, N]`` if the reps disagree on ``B``)."""
    parts = [(g if g is not None else torch.zeros_like(z)).detach().float() for g, z in zip(grads, reps, strict=True)]
    if len({p.shape[0] if p.ndim else -1 for p in parts}) == 1 and parts[0].ndim >= 1:
        out = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
    else:
        out = torch.cat([p.reshape(-1) for p in parts]).unsqueeze(0)
    return out / scale if scale != 1.0 else out
