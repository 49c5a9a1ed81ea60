"""One teleport attempt, without the Trainer: the core that :class:`~lightning_cost.SymmetryTeleportCallback`
and the plain-loop :class:`~lightning_cost.Teleport` both run.

An attempt measures the per-task gradients at the current point, lets a
:class:`~lightning_cost.teleport.teleporter.Teleporter` move the shared weights along the level set of
the task losses (eq. 5) toward better gradients (eq. 6), measures again, and applies the
:class:`~lightning_cost.teleport.transfer.StateTransfer` to the optimizer's state (HTR, eqs. 12-13, or
exact transport). Everything runs with dropout off and every buffer restored; the weights, buffers,
modes and optimizer state are rolled back on a rejected move or any exception. What the caller
supplies is what only a training loop knows: the batches, the evaluator (and so the forward context),
the step and epoch in the record, and where the record is kept and logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_cost.teleport.evaluation import Snapshot, TaskLossEvaluator, keep_buffers
from lightning_cost.teleport.records import GradientStats, TeleportRecord
from lightning_cost.teleport.registry import build_teleporter, split_spec
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem
from lightning_cost.teleport.transfer import StateTransfer
from lightning_cost.teleport.trigger import ConflictTrigger

__all__ = ["attempt_teleport", "flat_grad", "lr_of", "resolve_parts"]


def attempt_teleport(module: nn.Module, params: list[nn.Parameter], optimizer: Any, evaluator: TaskLossEvaluator,
                     batches: Sequence[Any], record: TeleportRecord, *, teleporter: Teleporter,
                     transfer: StateTransfer, trigger: ConflictTrigger, generator: torch.Generator,
                     measure: bool = True, last_gradient: Tensor | None = None,
                     known: tuple[Tensor, Tensor] | None = None) -> TeleportRecord:
    """Run one teleport of ``params`` and fill ``record`` (``accepted``, ``applied``, before/after stats).

    Args:
        module: the module whose weights move (``evaluator.module`` or the module it evaluates).
        params: the weights to teleport (the columns of the Jacobian).
        optimizer: the optimizer whose state of ``params`` the transfer rewrites (and rolls back).
        evaluator: the ``[K]`` task losses on ``batches`` (eq. 7's ``L*`` and the Jacobian before).
        batches: the teleport's data.
        record: the attempt's record, with its step, epoch and names already set.
        teleporter, transfer, trigger, generator: how to move, what to do with the optimizer state
            after, how the record counts conflicting tasks (eq. 4), and the teleporter's random stream.
        measure: also measure the per-task gradients after the move (free for an exact symmetry).
        last_gradient: eq. 12's ``g'`` (flattened over ``params``); only ``"htr"`` and
            ``"restart_if_opposed"`` read it (``None``: ``sigma = 0``).
        known: ``(losses, jacobian)`` already measured at these weights on these batches (a training
            step's); used when there is one batch and no dropout was active, as the evaluation would
            otherwise differ from the step's.

    Returns ``record``. ``record.applied`` (the weights moved, or a control was accepted) means the
    caller must drop the current optimizer step: its gradient belongs to the old point.
    """
    with evaluator.dropout_off() as had_dropout:
        # the snapshot is taken with dropout off, so restoring its modes (the teleporter does, before
        # the measurement after the move) keeps dropout off until the whole teleport is done
        snapshot = Snapshot(module, params, optimizer)
        try:
            with keep_buffers(module):
                reuse = known is not None and len(batches) == 1 and not had_dropout
                target, jacobian = known if known is not None and reuse else evaluator.jacobian(batches, params)
            record.before = GradientStats.of(jacobian, trigger)
            problem = TeleportProblem(module, params, evaluator, batches, target, jacobian, generator,
                                      lr_of(optimizer, params), snapshot)
            move = teleporter.teleport(problem, record)
            record.applied = move is not None and (record.moved or teleporter.control)
            if move is not None and record.applied:
                _after_move(record, problem, snapshot, move, optimizer, transfer, trigger, measure, last_gradient)
        except BaseException:
            snapshot.restore_all()
            raise
    if not record.accepted:
        rank_zero_warn(f"lightning_cost: teleport rejected and rolled back ({record.reason})")
    return record


def _after_move(record: TeleportRecord, problem: TeleportProblem, snapshot: Snapshot, move: Move, optimizer: Any,
                transfer: StateTransfer, trigger: ConflictTrigger, measure: bool, last_gradient: Tensor | None) -> None:
    """The displacement, the gradients after the move (when measured) and the state transfer."""
    displacement = snapshot.displacement()
    record.displacement_norm = float(displacement.norm())
    record.displacement_rel = record.displacement_norm / max(snapshot.weight_norm(), 1e-30)
    if measure:
        if move.factors is not None:  # an exact symmetry: the new gradients are g / t, no backward
            flat = torch.cat([t.reshape(-1) for t in move.factors]).to(problem.jacobian.dtype)
            after = problem.jacobian / flat
        else:
            with keep_buffers(problem.module):
                _, after = problem.evaluator.jacobian(problem.batches, problem.params)
        record.after = GradientStats.of(after, trigger)
    record.sigma = transfer.after_teleport(optimizer, problem.params, displacement.float(), last_gradient,
                                           move.factors)


def flat_grad(params: Sequence[nn.Parameter]) -> Tensor | None:
    """The gradient of ``params`` as the last backward left it, flattened in order (eq. 12's ``g'`` when the
    caller has no direction of its own); ``None`` when none of them has one."""
    if all(p.grad is None for p in params):
        return None
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in params])


def lr_of(optimizer: Any, params: Sequence[nn.Parameter]) -> float:
    """The learning rate of the param group that holds the teleported weights."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def resolve_parts(teleporter: str | Mapping[str, Any] | Teleporter, trigger: str | Mapping[str, Any] | ConflictTrigger,
                  transfer: str | StateTransfer | None) -> tuple[Teleporter, ConflictTrigger, StateTransfer]:
    """The teleporter (a name, ``{"name": ..., **settings}`` or an instance), the trigger (a rule name, its
    settings or an instance) and the state transfer (``None``: the teleporter's default); ``"transport"``
    is refused for a teleporter that gives no symmetry factors."""
    if isinstance(teleporter, (str, Mapping)):
        name, settings = split_spec(teleporter)
        teleporter = build_teleporter(name, **settings)
    elif not isinstance(teleporter, Teleporter):
        raise TypeError(f"teleporter must be a name, a mapping or a Teleporter, got {type(teleporter).__name__}")
    rule = ConflictTrigger(cast(Any, trigger)) if isinstance(trigger, str) else (  # checked there
        ConflictTrigger(**trigger) if isinstance(trigger, Mapping) else trigger)
    policy = transfer if isinstance(transfer, StateTransfer) else StateTransfer(transfer or teleporter.default_transfer)
    if policy.policy == "transport" and not teleporter.gives_factors:
        raise ValueError(f"transfer='transport' needs an exact symmetry; the {teleporter.name!r} teleporter "
                         "gives none (use teleporter='rescale', or transfer 'htr', 'keep' or 'reset')")
    return teleporter, rule, policy
