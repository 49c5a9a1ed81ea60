"""The per-step conflict counter: how often COST's trigger condition (eqs. 3-4) holds during training.

One class serves the runner (trigger ratio per epoch and per run), the teleport statistics (the
distribution of the number of conflicting tasks, Fig. 5a) and the agreement measurement of the
representation trigger. It decides nothing itself: every decision is
:class:`lightning_cost.teleport.trigger.ConflictTrigger`'s, on the record the multi-task core left
for the step (``mtl_step.jacobian``, or its Gramian ``mtl_step.gramian`` when the method formed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L

from lightning_cost.teleport.trigger import ConflictTrigger

__all__ = ["RULES", "ConflictCounter", "StepConflicts"]

#: the trigger rules counted: the paper's eq. 4 (ceil(K/2) tasks with cos < 0) and the authors' any-task rule
RULES = ("majority", "any")


@dataclass(frozen=True)
class StepConflicts:
    """One counted step: ``conflicting[rule]`` tasks oppose the mean gradient under ``rule``
    (``cos < 0`` for ``majority``, ``cos <= 0`` for ``any``) and ``fired[rule]`` says whether the
    trigger would teleport."""

    step: int
    epoch: int
    conflicting: dict[str, int]
    fired: dict[str, bool]
    cosines: list[float] | None = None


@dataclass
class _EpochTally:
    checked: int = 0
    fired: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))


class ConflictCounter(L.Callback):
    """Counts, on every optimizer step that has per-task gradients, whether each rule would fire.

    Args:
        on, reduce: what :class:`ConflictTrigger` reads (``"parameters"``: the exact Jacobian;
            ``"representation"``: gradients w.r.t. the shared representation).
        request: ask the module for what the trigger reads on every step (``request_jacobian`` /
            ``request_representation_jacobian``). Off by default: a run is then measured as it is,
            and steps of a loss weighting without a Jacobian are simply not counted.
        keep_cosines: keep each step's ``cos(g_i, g_0)`` in :attr:`steps`.

    Steps are read in ``on_before_optimizer_step`` (once per optimizer step, also under gradient
    accumulation); non-finite and skipped steps are not counted. Put it before a teleport callback
    in the trainer's list to count the step's own gradients, as the teleport's trigger does.
    """

    def __init__(self, on: str = "parameters", reduce: str = "flatten", request: bool = False,
                 keep_cosines: bool = False) -> None:
        self.triggers = {rule: ConflictTrigger(rule, on=on, reduce=reduce) for rule in RULES}
        self.request, self.keep_cosines = request, keep_cosines
        self.steps: list[StepConflicts] = []
        self._epochs: dict[int, _EpochTally] = {}

    # ------------------------------------------------------------------ hooks
    def _request(self, pl_module: Any, enabled: bool) -> None:
        if self.triggers["majority"].on == "representation":
            pl_module.request_representation_jacobian(enabled)
        elif enabled:
            pl_module.request_jacobian(True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.request:
            self._request(pl_module, True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.request:
            self._request(pl_module, False)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        record = getattr(pl_module, "mtl_step", None)
        if record is None or record.skipped or not record.finite:
            return
        if self.triggers["majority"].on == "representation" and record.representation_jacobian is None:
            return
        first = self.triggers["majority"].check(record)
        if first is None:  # no Jacobian this step (a loss weighting that was not asked for one)
            return
        results = {"majority": first, "any": self.triggers["any"].decide(first.cosines)}
        self.add(int(trainer.global_step), int(trainer.current_epoch),
                 {r: res.num_conflicting for r, res in results.items()}, {r: res.fire for r, res in results.items()},
                 first.cosines.tolist() if self.keep_cosines else None)

    # ------------------------------------------------------------------ tallies
    def add(self, step: int, epoch: int, conflicting: dict[str, int], fired: dict[str, bool],
            cosines: list[float] | None = None) -> None:
        """Count one step (the hook's path; public so that a record can be replayed)."""
        self.steps.append(StepConflicts(step, epoch, dict(conflicting), dict(fired), cosines))
        tally = self._epochs.setdefault(epoch, _EpochTally())
        tally.checked += 1
        for rule in RULES:
            tally.fired[rule] += int(fired[rule])

    @property
    def checked(self) -> int:
        """Steps counted so far."""
        return len(self.steps)

    def ratio(self, rule: str) -> float:
        """Share of the counted steps on which ``rule`` fires (NaN when no step was counted)."""
        fired = sum(t.fired[rule] for t in self._epochs.values())
        return fired / self.checked if self.checked else float("nan")

    def per_epoch(self) -> list[dict[str, Any]]:
        """One dict per epoch with counted steps: ``epoch``, ``checked`` and, per rule,
        ``fired_<rule>`` and ``trigger_ratio_<rule>``."""
        rows = []
        for epoch, t in sorted(self._epochs.items()):
            row: dict[str, Any] = {"epoch": epoch, "checked": t.checked}
            for rule in RULES:
                row[f"fired_{rule}"] = t.fired[rule]
                row[f"trigger_ratio_{rule}"] = t.fired[rule] / t.checked
            rows.append(row)
        return rows

    def histogram(self, rule: str = "majority") -> dict[int, int]:
        """How many counted steps had 0, 1, ... conflicting tasks under ``rule``."""
        counts: dict[int, int] = {}
        for s in self.steps:
            counts[s.conflicting[rule]] = counts.get(s.conflicting[rule], 0) + 1
        return dict(sorted(counts.items()))
