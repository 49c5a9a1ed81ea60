"""``SymmetryTeleportCallback``: COST (paper Sec. 4) as a Lightning callback, composed of small parts.

At every checked optimizer step: *when* (:class:`~lightning_cost.teleport.trigger.ConflictTrigger`,
eqs. 3-4, within a :class:`~lightning_cost.teleport.schedule.TeleportSchedule`), *how* (a
:class:`~lightning_cost.teleport.teleporter.Teleporter`: the paper's LoRA search, eqs. 5-11, or an
exact rescaling symmetry), *after* (a :class:`~lightning_cost.teleport.transfer.StateTransfer`: HTR,
eqs. 12-13, or exact transport), and *records*
(:class:`~lightning_cost.teleport.records.TeleportLog`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_cost.protocol import MultiTaskModule, StepRecord
from lightning_cost.teleport._checks import check_bool, check_int
from lightning_cost.teleport.attempt import attempt_teleport, flat_grad, resolve_parts
from lightning_cost.teleport.evaluation import TaskLossEvaluator
from lightning_cost.teleport.records import TeleportLog, TeleportRecord
from lightning_cost.teleport.schedule import TeleportSchedule
from lightning_cost.teleport.teleporter import Teleporter
from lightning_cost.teleport.transfer import StateTransfer
from lightning_cost.teleport.trigger import ConflictTrigger, TriggerResult

__all__ = ["SymmetryTeleportCallback"]


class SymmetryTeleportCallback(L.Callback):
    r"""Teleport the shared weights to a loss-equivalent point with better task gradients (COST).

    Checked in ``on_before_optimizer_step``, so only on batches that step (the last micro-batch under
    gradient accumulation), from the step's global, unscaled record (``mtl_step``); steps with
    non-finite or skipped gradients are never checked. The teleporting batch takes no optimizer step
    (its gradient belongs to the old point); the next batch trains at the new point. A rejected
    teleport, or any exception during one, restores the weights, buffers and optimizer state.

    Args:
        teleporter: ``"lora"`` (the paper's, :class:`~lightning_cost.teleport.lora.LoRATeleporter`),
            ``"rescale"`` (an exact symmetry, :class:`~lightning_cost.teleport.symmetry.rescale.RescaleTeleporter`),
            the controls ``"null"`` (no move: the transfer and dropped step alone,
            :class:`~lightning_cost.teleport.null.NullTeleporter`) and ``"random_move"``
            (:class:`~lightning_cost.teleport.random_move.RandomMove`), a mapping
            ``{"name": ..., **settings}``, or a :class:`Teleporter`.
        trigger: ``"majority"`` (eq. 4), ``"any"`` (the authors' code), a mapping of
            :class:`ConflictTrigger` settings, or a trigger.
        schedule: warm-up, spacing, cap per epoch, ``check_every``, forced teleports
            (:class:`TeleportSchedule` or a mapping of its settings).
        transfer: the optimizer-state policy after a teleport (``"htr"``, ``"transport"``, ``"keep"``,
            ``"reset"``, ``"reset_step"``, ``"restart_if_opposed"``, or a :class:`StateTransfer`); ``None``: the
            teleporter's default.
        teleport_batches: 0 teleports on the step's batch; ``N > 0`` also on ``N`` batches drawn from the
            training loader (``L*``, the Jacobian of eq. 10 and the effect are measured on all of them).
        measure: also compute the per-task gradients after each teleport for its record (one Jacobian,
            free for an exact symmetry).
        seed: seed of the callback's own random stream (the global one is never used).
        name: distinguishes the checkpoint state of several instances.
    """

    def __init__(self, teleporter: str | Mapping[str, Any] | Teleporter = "lora",
                 trigger: str | Mapping[str, Any] | ConflictTrigger = "majority",
                 schedule: TeleportSchedule | Mapping[str, Any] | None = None,
                 transfer: str | StateTransfer | None = None, teleport_batches: int = 0, measure: bool = True,
                 seed: int = 0, name: str | None = None) -> None:
        super().__init__()
        self.teleporter, self.trigger, self.transfer = resolve_parts(teleporter, trigger, transfer)
        self.schedule = schedule if isinstance(schedule, TeleportSchedule) else TeleportSchedule(**(schedule or {}))
        check_int("teleport_batches", teleport_batches, 0)
        check_bool("measure", measure)
        check_int("seed", seed)
        self.teleport_batches, self.measure, self.seed, self.name = teleport_batches, measure, seed, name
        self.records = TeleportLog()
        self.generator = torch.Generator().manual_seed(seed)
        self._requested = self._forced = False
        self._batch: Any = None
        self._batch_idx = 0
        self._total_steps = float("inf")

    # ------------------------------------------------------------------ public state
    @property
    def history(self) -> list[TeleportRecord]:
        return self.records.history

    @property
    def epoch_stats(self) -> list[dict[str, Any]]:
        return self.records.epoch_stats

    @property
    def num_teleports(self) -> int:
        """Applied teleports: accepted ones that moved the weights (a control teleporter's: accepted ones)."""
        return self.records.num_teleports

    @property
    def num_rejected(self) -> int:
        return self.records.num_rejected

    def request_teleport(self) -> None:
        """Teleport at the next optimizer step whatever the trigger says (the schedule still applies)."""
        self._requested = True

    # ------------------------------------------------------------------ setup
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name else type(self).__qualname__

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_setup(trainer, pl_module, self.trigger)
        if self.trigger.on == "representation":
            cast(Any, pl_module).request_representation_jacobian(True)  # checked by _check_setup
        else:
            cast(MultiTaskModule, pl_module).request_jacobian(True)
        self.teleporter.setup(pl_module, _teleported(pl_module))
        pure = getattr(pl_module, "has_pure_losses", callable(getattr(pl_module, "compute_task_losses", None)))
        if not pure:
            rank_zero_warn("SymmetryTeleportCallback re-evaluates the task losses through training_step during each "
                           "teleport, so its side effects (metric updates, counters) run there too; define a pure "
                           "compute_task_losses(batch) on the module to avoid that")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total_steps = float(trainer.estimated_stepping_batches)
        for optimizer in trainer.optimizers:
            self.transfer.check_optimizer(optimizer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        request = getattr(pl_module, "request_representation_jacobian", None)
        if stage == "fit" and self.trigger.on == "representation" and callable(request):
            request(False)  # removes the forward hook

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records.start_epoch()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records.end_epoch(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        self._forced = self.schedule.forces(trainer.global_step)
        if self.schedule.check_every > 1:
            wanted = self._checks(trainer.global_step)
            if self.trigger.on == "representation":
                cast(Any, pl_module).request_representation_jacobian(wanted)
            else:
                cast(MultiTaskModule, pl_module).request_jacobian(wanted)

    def _checks(self, step: int) -> bool:
        return self.schedule.checks(step) or self._forced or self._requested

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        checks = self._checks(trainer.global_step)
        if not checks and self.transfer.pending_sigma is None:
            return  # nothing due at this step (and nothing per parameter is read)
        record: StepRecord | None = getattr(pl_module, "mtl_step", None)
        params = _teleported(pl_module)
        if record is None or not record.finite or record.skipped or not _finite_grads(params):
            return  # this step will not be taken: a pending transfer waits for the next one
        if checks:
            result = self.trigger.check(record)
            if result is not None:
                self.records.count_check(result.fire)
                forced = self._forced or self._requested
                if ((result.fire and self.schedule.on_trigger) or forced) and self._allowed(trainer):
                    self._requested = False
                    if self._teleport(trainer, pl_module, optimizer, params, record, result, forced):
                        for group in optimizer.param_groups:
                            for p in group["params"]:
                                p.grad = None  # the teleporting batch takes no step
                        return
        self.transfer.before_step(optimizer, params)

    def _allowed(self, trainer: L.Trainer) -> bool:
        return self.schedule.allows(epoch=trainer.current_epoch, step=trainer.global_step,
                                    total_steps=self._total_steps, attempts_this_epoch=self.records.attempts_this_epoch,
                                    last_step=self.records.last_step)

    # ------------------------------------------------------------------ the teleport
    def _teleport(self, trainer: L.Trainer, pl_module: Any, optimizer: Any, params: list[nn.Parameter],
                  record: StepRecord, result: TriggerResult, forced: bool) -> bool:
        """One attempt (:func:`~lightning_cost.teleport.attempt.attempt_teleport`) on the step's batches, in the
        trainer's forward context; True when it was applied (the weights moved, or a control was accepted):
        the step is then dropped."""
        g_prev = None  # eq. 12's g': HTR's share and the authors' restart rule read it
        if self.transfer.reads_last_gradient:
            g_prev = record.direction if record.direction is not None else flat_grad(params)
        rec = TeleportRecord(step=int(trainer.global_step), epoch=int(trainer.current_epoch),
                             teleporter=self.teleporter.name, forced=forced,
                             trigger_conflicts=result.num_conflicting, transfer=self.transfer.policy)
        known = (record.losses.float(), record.jacobian) if record.jacobian is not None else None
        attempt_teleport(pl_module, params, optimizer, TaskLossEvaluator.for_trainer(trainer, pl_module, self._batch_idx),
                         self._teleport_data(trainer), rec, teleporter=self.teleporter, transfer=self.transfer,
                         trigger=self.trigger, generator=self.generator, measure=self.measure, last_gradient=g_prev,
                         known=known)
        self.records.add(rec, trainer)
        return rec.applied

    def _teleport_data(self, trainer: L.Trainer) -> list[Any]:
        """The step's batch and ``teleport_batches`` more from the training loader (global RNG untouched)."""
        batches = [self._batch]
        if self.teleport_batches:
            with torch.random.fork_rng(devices=[]):
                it = iter(cast(Any, trainer.train_dataloader))  # set while fitting
                for _ in range(self.teleport_batches):
                    try:
                        batches.append(trainer.strategy.batch_to_device(next(it)))
                    except StopIteration:
                        break
        return batches

    # ------------------------------------------------------------------ resume
    def _settings(self) -> dict[str, Any]:
        out = {"teleporter": self.teleporter.name, "trigger": dataclasses.asdict(self.trigger),
               "schedule": dataclasses.asdict(self.schedule), "transfer": self.transfer.policy,
               "teleport_batches": self.teleport_batches, "seed": self.seed}
        config = getattr(self.teleporter, "config", None)
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            out["teleporter_config"] = dataclasses.asdict(config)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"log": self.records.state_dict(), "pending_sigma": self.transfer.pending_sigma,
                "generator": self.generator.get_state(), "settings": self._settings(), "requested": self._requested}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = _differences(state_dict.get("settings", {}), self._settings())
        if changed:
            rank_zero_warn("SymmetryTeleportCallback resumed with changed settings (" + "; ".join(changed) + "); "
                           "its counters and history are kept")
        self.records.load_state_dict(state_dict["log"])
        self.transfer.pending_sigma = state_dict["pending_sigma"]
        self.generator.set_state(state_dict["generator"])
        self._requested = bool(state_dict.get("requested", False))


def _check_setup(trainer: L.Trainer, pl_module: Any, trigger: ConflictTrigger) -> None:
    if not isinstance(pl_module, MultiTaskModule):
        raise TypeError("SymmetryTeleportCallback needs a LightningModule implementing lightning_cost.MultiTaskModule "
                        "(e.g. one built with MultiTaskMixin)")
    if type(trainer.strategy) is not SingleDeviceStrategy and not isinstance(trainer.strategy, DDPStrategy):
        raise RuntimeError(f"SymmetryTeleportCallback supports single-device and DDP training; "
                           f"{type(trainer.strategy).__name__} shards or wraps parameters (FSDP, DeepSpeed, ...) and "
                           "is not supported")
    if not cast(Any, pl_module).automatic_optimization:  # a LightningModule's
        raise RuntimeError("SymmetryTeleportCallback needs automatic optimization")
    if trigger.on == "representation" and not callable(getattr(pl_module, "request_representation_jacobian", None)):
        raise TypeError("a trigger on='representation' needs a module with request_representation_jacobian() "
                        "(e.g. one built with MultiTaskMixin)")


def _teleported(pl_module: Any) -> list[nn.Parameter]:
    """The weights a teleport may move: the shared parameters that are trained (frozen ones never move)."""
    return [p for p in pl_module.shared_parameters() if p.requires_grad]


def _finite_grads(params: list[nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
