"""When a teleport may happen: warm-up, spacing, a cap per epoch, checked steps, forced teleports."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_cost.teleport._checks import check_bool, check_float, check_int

__all__ = ["TeleportSchedule"]


@dataclass
class TeleportSchedule:
    """The budget around the trigger: the trigger says whether a teleport *should* happen, this says
    whether one *may*.

    Args:
        warmup_epochs: no teleport before this many epochs have passed (and ``warmup_steps``).
        warmup_steps: no teleport before this many optimizer steps (and ``warmup_epochs``).
        warmup_fraction: no teleport before this fraction of the run's optimizer steps
            (``Trainer.estimated_stepping_batches``); the authors teleport from 1/4 of training.
        max_per_epoch: at most this many teleport attempts (accepted or not) per epoch; ``None``: no cap.
        min_steps_between: at least this many optimizer steps between two attempts.
        check_every: check the trigger on every N-th optimizer step only (with a loss weighting the
            per-task Jacobian is then paid for on those steps only).
        every: ``N > 0`` also forces an attempt at the steps with ``step % N == N // 2`` whatever the
            trigger says (a fixed teleport budget, e.g. where the trigger is silent); the other limits
            still apply.
        on_trigger: whether the trigger's decision starts a teleport. ``False``: only ``every`` and
            ``request_teleport()`` do (a fixed budget at fixed steps, e.g. to compare teleporters and
            controls at the same steps); the trigger is still checked and counted.
    """

    warmup_epochs: int = 0
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    max_per_epoch: int | None = 1
    min_steps_between: int = 0
    check_every: int = 1
    every: int = 0
    on_trigger: bool = True

    def __post_init__(self) -> None:
        check_int("warmup_epochs", self.warmup_epochs, 0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_float("warmup_fraction", self.warmup_fraction, minimum=0.0, maximum=1.0)
        check_int("max_per_epoch", self.max_per_epoch, 0, optional=True)
        check_int("min_steps_between", self.min_steps_between, 0)
        check_int("check_every", self.check_every, 1)
        check_int("every", self.every, 0)
        check_bool("on_trigger", self.on_trigger)

    def checks(self, step: int) -> bool:
        """Whether the trigger is checked at optimizer step ``step``."""
        return step % self.check_every == 0

    def forces(self, step: int) -> bool:
        """Whether ``every`` forces an attempt at ``step``."""
        return bool(self.every) and step % self.every == self.every // 2

    def allows(self, *, epoch: int, step: int, total_steps: float, attempts_this_epoch: int,
               last_step: int | None) -> bool:
        """Whether an attempt is allowed now (``total_steps``: the run's optimizer steps, may be inf)."""
        if epoch < self.warmup_epochs or step < self.warmup_steps:
            return False
        if self.warmup_fraction and step < self.warmup_fraction * total_steps:
            return False
        if self.max_per_epoch is not None and attempts_this_epoch >= self.max_per_epoch:
            return False
        return last_step is None or step - last_step >= self.min_steps_between
