"""The training step of the multi-task core: per-task gradients, the update, skipped steps.

:class:`MultiTaskStep` is the part of :class:`~lightning_cost.MultiTaskMixin` that runs inside
``training_step`` once the K task losses are known:

* a loss weighting with no Jacobian requested returns its scalar objective (one ordinary backward);
* otherwise the module's :class:`~lightning_cost.jacobian.JacobianEngine` gives, in one call, the
  ``K x P`` Jacobian of the shared parameters (unscaled, averaged over DDP ranks), each task's
  gradient of the other parameters and, when requested, of the shared representation; the method
  turns ``J`` into the shared direction and the update is returned as a linear surrogate
  (:mod:`lightning_cost.update`).

A step whose losses or gradients are non-finite (without a fp16 ``GradScaler``), or whose
aggregation fails (:class:`~lightning_cost.aggregators.AggregationError`), is skipped: its
gradients are dropped before the optimizer step. A run of consecutive skipped steps as long as
``mtl_skip_limit`` raises :class:`TrainingStalledError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from lightning_cost.aggregators import AggregationError, Aggregator, GramianAggregator, LossWeighting
from lightning_cost.aggregators import gramian as compute_gramian
from lightning_cost.distributed import all_reduce_mean, is_distributed, warn_rank_zero
from lightning_cost.gramian_engine import GramianEngine, GramianStep
from lightning_cost.jacobian import JacobianEngine
from lightning_cost.protocol import StepRecord
from lightning_cost.representation import stack_representation_gradients
from lightning_cost.update import (
    aggregate_nonzero_rows,
    combine,
    jacobian_finiteness,
    linear_surrogate,
    row_statistic,
)

__all__ = ["MultiTaskStep", "TrainingStalledError"]

log = logging.getLogger(__name__)

#: The default run of consecutive skipped steps that stops training is the larger of this and
#: ``DEFAULT_STALL_FRACTION`` of an epoch's training batches.
DEFAULT_STALL_STEPS = 50
DEFAULT_STALL_FRACTION = 0.1


class TrainingStalledError(RuntimeError):
    """Training made no progress: the multi-task core skipped a long run of consecutive steps."""


class MultiTaskStep:
    """The step logic of :class:`~lightning_cost.MultiTaskMixin` (state set by ``configure_multitask``)."""

    if TYPE_CHECKING:  # the state ``configure_multitask`` sets and what the mixin defines (no runtime effect)
        task_names: list[str]
        mtl_method: Aggregator | LossWeighting
        mtl_step: StepRecord | None
        mtl_skipped_steps: int
        mtl_jacobian_engine: JacobianEngine
        mtl_gramian_engine: GramianEngine
        _mtl_engine: str
        _mtl_gram_captured: bool
        _mtl_max_skipped: int | None
        _mtl_skip_run: int
        _mtl_drop_grads: bool

        def shared_parameters(self) -> list[nn.Parameter]: ...

        def _mtl_rep_jacobian(self, losses: Tensor, reps: Sequence[Tensor], scale: float) -> Tensor: ...

    @property
    def mtl_skip_limit(self) -> int:
        """The run of consecutive skipped steps that raises :class:`TrainingStalledError` (0: never)."""
        if self._mtl_max_skipped is not None:
            return self._mtl_max_skipped
        batches = getattr(self._mtl_trainer(), "num_training_batches", None)
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            return max(DEFAULT_STALL_STEPS, math.ceil(DEFAULT_STALL_FRACTION * batches))
        return DEFAULT_STALL_STEPS

    def _mtl_trainer(self) -> Any:
        try:
            return self.trainer  # type: ignore[attr-defined]
        except RuntimeError:  # not attached to a Trainer
            return None

    def _mtl_scaler(self) -> Any:
        """The fp16 ``GradScaler`` of the trainer's precision plugin, or ``None``."""
        return getattr(getattr(self._mtl_trainer(), "precision_plugin", None), "scaler", None)

    def _mtl_loss_scale(self) -> float:
        scaler = self._mtl_scaler()
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _mtl_skip(self, record: StepRecord, why: str) -> None:
        """Mark the step as skipped (its gradients are dropped before the optimizer step); raise
        :class:`TrainingStalledError` once the run of consecutive skipped steps reaches the limit."""
        record.skipped = True
        self.mtl_step = record
        self.mtl_skipped_steps += 1
        self._mtl_skip_run += 1
        self._mtl_drop_grads = True
        warn_rank_zero(log, "lightning_cost: skipping the optimizer step (weights untouched): %s", why)
        limit = self.mtl_skip_limit
        if limit and self._mtl_skip_run >= limit:
            raise TrainingStalledError(
                f"{type(self.mtl_method).__name__}: {self._mtl_skip_run} consecutive training steps were skipped "
                f"(max_skipped_steps={limit}), so the weights have stopped changing; the last one because: {why}. "
                "Check the task losses' scales and the method's settings, or raise max_skipped_steps (0: never stop)."
            )

    def _mtl_weighting_step(self, losses: Tensor, reps: Sequence[Tensor] = ()) -> Tensor | None:
        """Loss weighting without a Jacobian: one ordinary backward of the method's objective."""
        method: LossWeighting = self.mtl_method  # type: ignore[assignment]
        global_losses = all_reduce_mean(losses.detach())
        record = StepRecord(losses=global_losses, finite=bool(torch.isfinite(global_losses).all()))
        if not record.finite:
            if self._mtl_scaler() is not None:  # let the GradScaler skip the step and lower its scale
                self.mtl_step = record
                return losses.sum()
            self._mtl_skip(record, f"non-finite task losses {global_losses.tolist()}")
            return (losses * 0.0).sum()  # a backward still runs (DDP needs it); its gradients are dropped
        if reps:  # backward passes through the heads only, to the representation
            record.representation_jacobian = self._mtl_rep_jacobian(losses, reps, self._mtl_loss_scale())
        objective = method(losses)
        method.observe(global_losses)
        self.mtl_step = record
        return objective

    def _mtl_trainable_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The trainable shared parameters and every other trainable parameter (the method's excluded)."""
        shared = self.shared_parameters()
        method_ids = {id(p) for p in self.mtl_method.parameters()}
        shared_ids = {id(p) for p in shared}
        others = [p for p in self.parameters()  # type: ignore[attr-defined]
                  if p.requires_grad and id(p) not in shared_ids and id(p) not in method_ids]
        shared_trainable = [p for p in shared if p.requires_grad]
        if not shared_trainable:
            raise RuntimeError("no shared parameter requires grad: nothing to aggregate")
        return shared_trainable, others

    def _mtl_per_task_gradients(self, losses: Tensor, shared: Sequence[Tensor], others: Sequence[Tensor],
                                reps: Sequence[Tensor], scale: float, retain: bool = False
                                ) -> tuple[Tensor, list, Tensor | None]:
        """``J`` (unscaled, global), the others' ``[K, *shape]`` gradients and the representation
        rows, all from one call of the engine (the representation needs no extra pass)."""
        n_shared, n_others, k = len(shared), len(others), losses.shape[0]
        scaled = losses * scale if scale != 1.0 else losses
        grads = self.mtl_jacobian_engine.vjps(scaled, [*shared, *others, *reps], retain)
        jacobian = JacobianEngine.assemble(grads[:n_shared], shared, k, scale=scale)
        other_grads = grads[n_shared : n_shared + n_others]
        rep_jac = stack_representation_gradients(grads[n_shared + n_others :], reps, k, scale) if reps else None
        del grads  # the per-parameter blocks of J are copied into it: free them before the aggregation
        return jacobian, other_grads, rep_jac

    @property
    def mtl_uses_gramian_engine(self) -> bool:
        """Whether the next Jacobian step runs on the Gramian engine (``engine="auto"``: for Gramian
        aggregators; never under DDP, whose global Gramian needs the cross-rank terms)."""
        engine = self.mtl_gramian_engine
        if self._mtl_engine == "jacobian" or engine.disabled_reason is not None or is_distributed():
            return False
        return self._mtl_engine == "gramian" or isinstance(self.mtl_method, GramianAggregator)

    def _mtl_jacobian_step(self, losses: Tensor, reps: Sequence[Tensor] = (),
                           task_losses: Sequence[Tensor] | None = None) -> Tensor | None:
        if self._mtl_gram_captured:
            return self._mtl_gramian_step(losses, reps, task_losses)
        return self._mtl_exact_step(losses, reps)

    def _mtl_exact_step(self, losses: Tensor, reps: Sequence[Tensor] = (), retain: bool = False) -> Tensor | None:
        shared, others = self._mtl_trainable_split()
        scale = self._mtl_loss_scale()
        jacobian, other_grads, rep_jac = self._mtl_per_task_gradients(losses, shared, others, reps, scale, retain)
        global_losses = all_reduce_mean(losses.detach())
        row_stat, gramian = row_statistic(jacobian, self.mtl_method)
        record = StepRecord(losses=global_losses, jacobian=jacobian, gramian=gramian, representation_jacobian=rep_jac)
        finite, overflowed = jacobian_finiteness(jacobian, row_stat)
        record.finite = finite and bool(torch.isfinite(global_losses).all())
        update = self._mtl_direction(record, row_stat, overflowed)
        if update is None:  # skipped: zero gradients for every parameter
            return linear_surrogate(shared, torch.zeros_like(jacobian[0]), others, None)
        direction, coeffs = update
        record.direction = direction
        self.mtl_step = record
        surrogate = linear_surrogate(shared, direction, others, [combine(g, coeffs, scale) for g in other_grads])
        display = (coeffs * losses.detach()).sum()
        method = self.mtl_method
        if isinstance(method, LossWeighting) and any(q.requires_grad for q in method.parameters()):
            aux = method(losses.detach())  # gradients of the method's own parameters (UW)
            surrogate = surrogate + aux
            display = aux.detach()
        return surrogate + (display - surrogate).detach()

    def _mtl_unusable(self, record: StepRecord, overflowed: bool) -> bool | None:
        """``None``: the step's gradients are usable; ``True``: the step is skipped (non-finite values
        without a fp16 ``GradScaler``, or a diverged run whose Gramian overflows); ``False``: non-finite
        values go to the ``GradScaler``, which skips the step and lowers its scale."""
        if not record.finite:
            if self._mtl_scaler() is None:
                self._mtl_skip(record, "non-finite task losses or gradients")
                return True
            return False
        if overflowed:  # the run has diverged: a clear skip, not a solver crash
            self._mtl_skip(record, "task gradients so large that their Gramian overflows (diverged training)")
            return True
        return None

    def _mtl_direction(self, record: StepRecord, row_stat: Tensor, overflowed: bool
                       ) -> tuple[Tensor, Tensor] | None:
        """The shared direction and the per-task coefficients of the other parameters' gradients,
        or ``None`` for a skipped step (``overflowed``: a finite ``J`` whose Gramian is not)."""
        jacobian, method = record.jacobian, self.mtl_method
        assert jacobian is not None
        k = jacobian.shape[0]
        unusable = self._mtl_unusable(record, overflowed)
        if unusable is not None:  # skipped, or the non-finite sum handed to the GradScaler
            return None if unusable else (jacobian.sum(0), torch.ones(k, device=jacobian.device))
        if isinstance(method, LossWeighting):
            coeffs = method.loss_weights(record.losses).to(jacobian.dtype)
            direction = coeffs @ jacobian
            method.observe(record.losses)
            record.extras["weights"] = coeffs
            return direction, coeffs
        method.observe_losses(record.losses)  # the global losses, before the aggregation (GradNorm, DB-MTL, MoCo)
        try:
            direction = self._mtl_aggregate(jacobian, row_stat, record.gramian)
        except AggregationError as err:
            self._mtl_skip(record, f"{type(method).__name__} failed: {err}")
            return None
        return direction, torch.ones(k, device=jacobian.device, dtype=jacobian.dtype)

    def _mtl_aggregate(self, jacobian: Tensor, row_stat: Tensor, gramian: Tensor | None = None) -> Tensor:
        """The method's direction for ``J``, tasks with a zero shared gradient left out
        (:func:`~lightning_cost.update.aggregate_nonzero_rows`)."""
        return aggregate_nonzero_rows(self.mtl_method, jacobian, row_stat, gramian, self.task_names)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the Gramian engine
    def _mtl_gramian_step(self, losses: Tensor, reps: Sequence[Tensor] = (),
                          task_losses: Sequence[Tensor] | None = None) -> Tensor | None:
        """The step on the Gramian engine: ``G`` and ``J^T w`` without ``J`` (the first step is
        checked against the Jacobian engine, see :class:`~lightning_cost.GramianConfig`)."""
        engine = self.mtl_gramian_engine
        engine.jacobian = self.mtl_jacobian_engine
        shared, others = self._mtl_trainable_split()
        scale = self._mtl_loss_scale()
        if not engine.verified:
            reference = compute_gramian(self.mtl_jacobian_engine.jacobian(losses, shared, scale=scale, retain=True))
            result = engine.compute(losses, shared, others, reps, scale=scale, retain=True, task_losses=task_losses)
            if not engine.check(result.gramian, reference.float()):
                warn_rank_zero(log, "lightning_cost: %s", engine.disabled_reason)
                return self._mtl_exact_step(losses, reps)
        else:
            result = engine.compute(losses, shared, others, reps, scale=scale, task_losses=task_losses)
        return self._mtl_gramian_update(losses, reps, result, shared, others)

    def _mtl_gramian_update(self, losses: Tensor, reps: Sequence[Tensor], result: GramianStep,
                            shared: Sequence[Tensor], others: Sequence[Tensor]) -> Tensor:
        k, gram, scale = losses.shape[0], result.gramian, result.scale
        rep_jac = stack_representation_gradients(result.rep_grads, reps, k, scale) if reps else None
        record = StepRecord(losses=all_reduce_mean(losses.detach()), gramian=gram, representation_jacobian=rep_jac)
        row_stat = gram.diagonal()
        finite_g = bool(torch.isfinite(row_stat).all())
        finite_parts = finite_g or result.finite_parts()
        record.finite = finite_parts and bool(torch.isfinite(record.losses).all())
        weights = self._mtl_gram_weights(record, row_stat, overflowed=finite_parts and not finite_g)
        if weights is None:  # skipped: zero gradients for every parameter
            return linear_surrogate(shared, torch.zeros(sum(p.numel() for p in shared), device=gram.device),
                                    others, None)
        record.direction = result.combine(weights)
        self.mtl_step = record
        ones = torch.ones(k, device=gram.device)
        surrogate = linear_surrogate(shared, record.direction, others,
                                     [combine(g, ones, scale) for g in result.other_grads])
        display = losses.detach().sum()
        return surrogate + (display - surrogate).detach()

    def _mtl_gram_weights(self, record: StepRecord, row_stat: Tensor, overflowed: bool) -> Tensor | None:
        """The task weights ``w`` of ``d = J^T w`` from the Gramian, or ``None`` for a skipped step;
        tasks with a zero shared gradient are left out (weight 0), as in the Jacobian step, except for a
        method that ``uses_losses``, which gets every row after :meth:`~Aggregator.observe_losses`."""
        method, gram = self.mtl_method, record.gramian
        assert gram is not None
        k = gram.shape[0]
        unusable = self._mtl_unusable(record, overflowed)
        if unusable is not None:  # skipped, or the non-finite sum handed to the GradScaler
            return None if unusable else torch.ones(k, device=gram.device)
        gram_method = cast(GramianAggregator, method)
        gram_method.observe_losses(record.losses)  # before the weights, as on the Jacobian path
        keep = (row_stat > 0).nonzero().flatten()
        if gram_method.uses_losses and keep.numel() > 0:  # its per-task state needs every row (see aggregate_nonzero_rows)
            keep = torch.arange(k, device=gram.device)
        w = torch.zeros(k, device=gram.device)
        if keep.numel() == 1:
            w[keep] = 1.0
        elif keep.numel() > 1:
            sub = gram if keep.numel() == k else gram.index_select(0, keep).index_select(1, keep)
            try:
                w[keep] = gram_method.weights(sub).float()
            except AggregationError as err:
                self._mtl_skip(record, f"{type(method).__name__} failed: {err}")
                return None
        return w
