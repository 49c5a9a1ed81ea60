"""The contract between a multi-task LightningModule and the teleport callback.

Any LightningModule can take part in COST by implementing :class:`MultiTaskModule`;
:class:`lightning_cost.MultiTaskMixin` is one implementation. The callback only uses
what is listed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["MultiTaskModule", "StepRecord"]


@dataclass
class StepRecord:
    """What the multi-task core knows about the current training step.

    All tensors are detached, unscaled (fp16 loss scaling removed) and, under DDP,
    averaged over ranks, so every rank holds identical values.

    Attributes:
        losses: ``[K]`` task losses of the step.
        jacobian: ``[K, P]`` gradients of the task losses w.r.t. the shared parameters
            (flattened in :meth:`MultiTaskModule.shared_parameters` order), or ``None``
            when the method needed none and none was requested.
        direction: ``[P]`` update direction the aggregator produced for the shared
            parameters (the gradient the optimizer receives), or ``None``.
        finite: ``False`` when losses or gradients were non-finite; such a step is not stepped.
        skipped: ``True`` when the optimizer step of this batch was skipped by the core.
        extras: method-specific diagnostics (e.g. task weights).
        representation_jacobian: ``[K, B, D]`` gradients of the task losses w.r.t. the shared
            *representation* (the output of the shared part, ``B`` its first dimension, ``D`` the
            rest flattened), or ``None`` unless requested (optional hook
            ``request_representation_jacobian``, see below). Unscaled and detached, but **local**
            to the rank: its rows are samples, which cannot be averaged over ranks (reduce a
            statistic of it, e.g. its ``K x K`` Gram matrix, instead).
        gramian: ``[K, K]`` Gramian ``J J^T`` of ``jacobian`` (at least float32), or ``None``.
            The core forms it once per step when the method is a Gramian aggregator; the conflict
            trigger then reads it instead of ``J``. ``None`` otherwise (the trigger's ``K``
            cosines from ``J`` cost less than a Gramian).
    """

    losses: Tensor
    jacobian: Tensor | None = None
    direction: Tensor | None = None
    finite: bool = True
    skipped: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    representation_jacobian: Tensor | None = None
    gramian: Tensor | None = None


@runtime_checkable
class MultiTaskModule(Protocol):
    """What :class:`~lightning_cost.SymmetryTeleportCallback` needs from a LightningModule."""

    #: Names of the K tasks, in the order of every ``[K]`` tensor.
    task_names: Sequence[str]
    #: Record of the last training step (set during ``training_step``), or ``None``.
    mtl_step: StepRecord | None

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared (task-agnostic) parameters, in a fixed order."""
        ...

    def evaluate_task_losses(self, batch: Any, batch_idx: int = 0) -> Tensor:
        """Differentiable ``[K]`` task losses on ``batch`` at the current weights, with no side effects
        (no logging, no optimizer interaction)."""
        ...

    def request_jacobian(self, enabled: bool = True) -> None:
        """Ask the core to fill ``mtl_step.jacobian`` on every step, even for loss-weighting methods."""
        ...

    # Optional (not part of the runtime check): ``request_representation_jacobian(enabled=True)``
    # asks the core to fill ``mtl_step.representation_jacobian``. The teleport callback needs it
    # only with ``trigger={"on": "representation"}``; :class:`~lightning_cost.MultiTaskMixin` has it.
