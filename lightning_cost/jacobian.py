"""Per-task gradients of K losses over one autograd graph: the Jacobian engine of the multi-task core.

The multi-task core (:class:`~lightning_cost.MultiTaskMixin`) and the teleport need the gradients of
each of the ``K`` task losses separately, not their sum. :class:`JacobianEngine` computes them from
the one graph of the step's forward pass, in one of two ways that give the same numbers:

* ``"batched"``: one vector-Jacobian product with the ``K`` one-hot cotangents (the rows of the
  identity) as a batch, ``torch.autograd.grad(..., is_grads_batched=True)``, which ``vmap``
  vectorises over the backward graph. Fast where the backward is made of many small ops (small
  models, many tasks), at the price of ``K`` times the backward's intermediate memory.
* ``"loop"``: ``K`` vector-Jacobian products over the same graph (``retain_graph`` between them).
  Works for every op.

``"auto"`` (the default) tries the batched product and, the first time an op turns out to have no
batching rule (a ``RuntimeError``), falls back to the loop for good.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_cost.distributed import all_reduce_mean_, warn_rank_zero

__all__ = ["JACOBIAN_MODES", "JacobianEngine", "JacobianMode"]

log = logging.getLogger(__name__)

JacobianMode = Literal["auto", "batched", "loop"]
JACOBIAN_MODES: tuple[str, ...] = get_args(JacobianMode)

#: Longest excerpt of an exception's message in the one-line fallback warning.
_REASON_CHARS = 160


class JacobianEngine:
    """Per-task gradients of K losses: one batched VJP (K one-hot cotangents) or K VJPs over one graph.

    Args:
        mode: ``"batched"``, ``"loop"`` or ``"auto"`` (batched, falling back to the loop for the rest
            of the engine's life on the first ``RuntimeError`` of the batched product; the fallback is
            announced in one warning line, with the full traceback at DEBUG level).
    """

    def __init__(self, mode: JacobianMode = "auto") -> None:
        if mode not in JACOBIAN_MODES:
            raise ValueError(f"jacobian_mode must be one of {JACOBIAN_MODES}, got {mode!r}")
        self._mode: str = mode
        self._batched_ok: bool | None = None  # None: untried; False: the loop is used from now on

    @property
    def mode(self) -> str:
        """The mode the engine was built with (``"auto"`` stays ``"auto"`` after a fallback)."""
        return self._mode

    @property
    def fell_back(self) -> bool:
        """Whether ``"auto"`` gave up the batched product and uses the loop from now on."""
        return self._batched_ok is False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self._mode!r}{', fell back to the loop' if self.fell_back else ''})"

    def vjps(self, losses: Tensor, inputs: Sequence[Tensor], retain: bool = False) -> list[Tensor | None]:
        """The gradients of each of the ``K`` ``losses`` w.r.t. ``inputs``, stacked as ``[K, *shape]``.

        ``None`` for an input that no task reaches; a task that does not reach an input others reach
        gets a zero row (as ``allow_unused`` gives zeros). ``retain`` keeps the graph for a later
        backward. Each per-task gradient is freed as soon as it is stacked.
        """
        if self._mode == "batched" or (self._mode == "auto" and self._batched_ok is not False):
            batched = self._batched_vjps(losses, inputs, retain)
            if batched is not None:
                return batched
        return self._looped_vjps(losses, inputs, retain)

    def jacobian(self, losses: Tensor, params: Sequence[Tensor], *, scale: float = 1.0,
                 retain: bool = False) -> Tensor:
        """The ``[K, P]`` Jacobian of ``losses`` w.r.t. ``params`` (``P`` the sum of their sizes, in
        ``params`` order, zero columns for a parameter no task reaches).

        It is computed for ``losses * scale`` and divided by ``scale`` (fp16 loss scaling: the
        gradients of the unscaled losses would underflow), then averaged over DDP ranks.
        """
        scaled = losses * scale if scale != 1.0 else losses
        return self.assemble(self.vjps(scaled, params, retain), params, losses.shape[0], scale=scale)

    @staticmethod
    def assemble(grads: Sequence[Tensor | None], params: Sequence[Tensor], k: int, *, scale: float = 1.0) -> Tensor:
        """The ``[K, P]`` Jacobian from :meth:`vjps`' per-parameter blocks (zeros for ``None``),
        divided by ``scale`` and averaged over DDP ranks (a no-op in one process). One copy of ``J``."""
        jacobian = torch.cat([(g if g is not None else torch.zeros((k, p.numel()), dtype=p.dtype, device=p.device))
                              .reshape(k, -1) for g, p in zip(grads, params, strict=True)], dim=1)
        if scale != 1.0:
            jacobian.div_(scale)
        return all_reduce_mean_(jacobian)

    def pullback(self, outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor],
                 retain: bool = False) -> list[Tensor | None]:
        """``[K, *shape]`` products of ``K`` rows of cotangents of ``outputs`` (``cotangents[j]`` is
        ``[K, *outputs[j].shape]``) with the Jacobian of ``outputs`` w.r.t. ``inputs``; batched or looped
        as :meth:`vjps`, and ``None`` for an input that no row reaches."""
        if self._mode == "batched" or (self._mode == "auto" and self._batched_ok is not False):
            batched = self._batched(list(outputs), list(cotangents), inputs, retain)
            if batched is not None:
                return batched
        k = cotangents[0].shape[0]
        per_task: list[list[Tensor | None]] = [list(torch.autograd.grad(list(outputs), list(inputs), grad_outputs=[c[i] for c in cotangents],
                                             retain_graph=retain or i < k - 1, allow_unused=True)) for i in range(k)]
        return self.stack_rows(per_task, inputs)

    def _batched_vjps(self, losses: Tensor, inputs: Sequence[Tensor], retain: bool) -> list[Tensor | None] | None:
        """One VJP with the ``K`` one-hot cotangents; ``None`` when ``"auto"`` has just fallen back."""
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        return self._batched(losses, eye, inputs, retain)

    def _batched(self, outputs: Tensor | list[Tensor], grad_outputs: Tensor | list[Tensor], inputs: Sequence[Tensor],
                 retain: bool) -> list[Tensor | None] | None:
        try:  # the first try keeps the graph, so that the loop can still run if it fails
            out = torch.autograd.grad(outputs, list(inputs), grad_outputs=grad_outputs, is_grads_batched=True,
                                      retain_graph=retain or not self._batched_ok, allow_unused=True)
        except RuntimeError as err:
            if self._mode == "batched" or self._batched_ok:
                raise
            self._batched_ok = False
            warn_rank_zero(log, "lightning_cost: the batched per-task VJP failed (%s); using K VJPs from now on",
                           _one_line(err))
            log.debug("lightning_cost: the batched per-task VJP's error, in full:", exc_info=err)
            return None
        self._batched_ok = True
        return list(out)

    @classmethod
    def _looped_vjps(cls, losses: Tensor, inputs: Sequence[Tensor], retain: bool) -> list[Tensor | None]:
        k = losses.shape[0]
        per_task: list[list[Tensor | None]] = [list(torch.autograd.grad(losses[i], list(inputs), retain_graph=retain or i < k - 1,
                                             allow_unused=True)) for i in range(k)]
        return cls.stack_rows(per_task, inputs)

    @staticmethod
    def stack_rows(per_task: list[list[Tensor | None]], inputs: Sequence[Tensor]) -> list[Tensor | None]:
        """``[K, *shape]`` per input from ``K`` lists of per-input gradients (zeros where one task's is
        ``None``; ``None`` where every task's is). Each per-task gradient is freed once stacked."""
        stacked: list[Tensor | None] = []
        for j, x in enumerate(inputs):
            col = [g[j] for g in per_task]
            for g in per_task:  # one copy alive, not two
                g[j] = None
            present = [i for i, g in enumerate(col) if g is not None]
            if len(present) == len(col):
                stacked.append(torch.stack(col))  # type: ignore[arg-type]
            elif not present:
                stacked.append(None)
            else:  # e.g. a head's parameters, reached by its own task only: one zero block, not K - 1
                rows = torch.zeros((len(col), *x.shape), dtype=col[present[0]].dtype, device=x.device)  # type: ignore[union-attr]
                for i in present:
                    rows[i] = col[i]  # type: ignore[assignment]
                stacked.append(rows)
        return stacked


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message``, shortened (compiled graphs raise C++ stacks of many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > _REASON_CHARS:
        first = first[: _REASON_CHARS - 3] + "..."
    more = f" (+{len(lines) - 1} lines at DEBUG level)" if len(lines) > 1 else ""
    return f"{type(err).__name__}: {first}{more}" if first else type(err).__name__
