"""COST's teleport from a plain PyTorch loop (no Trainer): :class:`Teleport` and :func:`teleport_once`.

The same attempt as :class:`~lightning_cost.SymmetryTeleportCallback`'s
(:func:`~lightning_cost.teleport.attempt.attempt_teleport`): move the shared weights to a point with
the same task losses (eq. 5) and better task gradients (eq. 6), then carry the optimizer state over
(HTR, eqs. 12-13, or exact transport). The loop decides when; the callback's trigger and schedule are
not involved::

    tele = lightning_cost.Teleport("rescale")  # transfer: the teleporter's default ("transport")
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        lightning_cost.backward(task_losses((x, y)), shared=model.trunk.parameters(), method="upgrad")
        if step % 100 == 50:
            record = tele(model, task_losses, [(x, y)], optimizer, shared=model.trunk, step=step)
            if record.applied:
                continue  # this step's gradient belongs to the old point: no optimizer.step()
        tele.before_step(optimizer, shared=model.trunk)  # HTR's pending sigma (eq. 13), if any
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_cost.functional import _stack_losses
from lightning_cost.jacobian import JacobianEngine, JacobianMode
from lightning_cost.teleport._checks import check_bool, check_int
from lightning_cost.teleport.attempt import attempt_teleport, flat_grad, resolve_parts
from lightning_cost.teleport.evaluation import TaskLossEvaluator
from lightning_cost.teleport.records import TeleportRecord
from lightning_cost.teleport.teleporter import Teleporter
from lightning_cost.teleport.transfer import StateTransfer
from lightning_cost.teleport.trigger import ConflictTrigger

__all__ = ["Teleport", "teleport_once"]

TaskLosses = Callable[[Any], Tensor | Sequence[Tensor] | Mapping[str, Tensor]]
Shared = nn.Module | Iterable[nn.Parameter]


class _TaskLossModule(nn.Module):
    """``model`` with ``evaluate_task_losses(batch, batch_idx)`` from the user's ``task_losses(batch)``.

    ``model`` is a submodule, so the evaluator's ``functional_call`` overrides swap the parameters of
    the very object the closure calls: it sees the teleporters' trial points.
    """

    def __init__(self, model: nn.Module, task_losses: TaskLosses, shared: nn.Module | None,
                 engine: JacobianEngine) -> None:
        super().__init__()
        self.model = model
        self._fn, self._shared = task_losses, (shared,)  # a tuple: not a second registered submodule
        self.mtl_jacobian_engine = engine
        self.task_names: list[str] = []  # set by every evaluation (before any message reads it)

    def evaluate_task_losses(self, batch: Any, batch_idx: int = 0) -> Tensor:
        losses, _, names = _stack_losses(self._fn(batch))
        self.task_names = names
        return losses

    def shared_module(self) -> nn.Module | None:
        return self._shared[0]

    def forward(self, batch: Any) -> Tensor:
        return self.evaluate_task_losses(batch)


class Teleport:
    """COST's teleport for a loop without the Trainer (module docstring), one call per attempt.

    Args:
        teleporter: ``"rescale"`` (an exact symmetry), ``"lora"`` (the paper's search, eqs. 5-11),
            the controls ``"null"`` and ``"random_move"``, a mapping ``{"name": ..., **settings}``, or a
            :class:`~lightning_cost.teleport.teleporter.Teleporter`.
        transfer: the optimizer-state policy after a teleport (``"htr"``, ``"transport"``, ``"keep"``,
            ``"reset"``, ``"reset_step"``, ``"restart_if_opposed"`` or a
            :class:`~lightning_cost.teleport.transfer.StateTransfer`); ``None``: the teleporter's default.
        trigger: the rule by which records count conflicting tasks (eq. 4): ``"majority"``, ``"any"``,
            a mapping of settings or a :class:`~lightning_cost.teleport.trigger.ConflictTrigger`. It
            never decides whether to teleport: the loop does.
        measure: also measure the task gradients after each teleport (free for an exact symmetry).
        seed: of the teleporter's own random stream (the global one is never used).
        jacobian_mode: of the :class:`~lightning_cost.jacobian.JacobianEngine` measuring the task gradients.

    ``history`` holds every attempt's :class:`~lightning_cost.teleport.records.TeleportRecord`.
    """

    def __init__(self, teleporter: str | Mapping[str, Any] | Teleporter = "rescale",
                 transfer: str | StateTransfer | None = None,
                 trigger: str | Mapping[str, Any] | ConflictTrigger = "majority", measure: bool = True,
                 seed: int = 0, jacobian_mode: JacobianMode = "auto") -> None:
        self.teleporter, self.trigger, self.transfer = resolve_parts(teleporter, trigger, transfer)
        if self.trigger.on != "parameters":
            raise ValueError("a plain-loop Teleport counts conflicts on the shared parameters' Jacobian; "
                             "trigger on='representation' is for the callback")
        check_bool("measure", measure)
        check_int("seed", seed)
        self.measure, self.seed = measure, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.engine = JacobianEngine(jacobian_mode)
        self.history: list[TeleportRecord] = []
        self._module: _TaskLossModule | None = None
        self._params: list[nn.Parameter] = []

    def __call__(self, model: nn.Module, task_losses: TaskLosses, batches: list[Any], optimizer: Any, *,
                 shared: Shared, last_gradient: Tensor | None = None, step: int = 0,
                 epoch: int = 0) -> TeleportRecord:
        """Teleport the trainable ``shared`` weights of ``model`` once; returns the attempt's record.

        ``task_losses(batch)`` returns the ``K >= 2`` task losses of ``batch`` computed with ``model``
        (a ``[K]`` tensor, a sequence or a mapping of scalars), ``batches`` is a non-empty list of
        batches (``L*`` and the Jacobian are means over them). With ``record.applied`` the weights
        moved (or a control was accepted) and the transfer rewrote the optimizer state: the loop must
        skip this step's ``optimizer.step()`` (its gradient belongs to the old point, as the callback
        drops the teleporting batch's step); every ``.grad`` the optimizer holds is set to ``None``,
        so a step taken anyway changes nothing. A rejected move is rolled back (``record.reason``).

        ``last_gradient`` is eq. 12's ``g'`` (flattened over the trainable ``shared`` parameters), read
        only by ``transfer="htr"`` and ``"restart_if_opposed"``; ``None``: their current ``.grad`` (the
        update ``lightning_cost.backward`` left there), or none (``sigma = 0``) if they have no gradient.
        """
        params = self._prepare(model, task_losses, batches, optimizer, shared, step, epoch)
        module = cast(_TaskLossModule, self._module)
        g_prev = self._last_gradient(params, last_gradient)  # eq. 12's g' (checked whatever the policy)
        if not self.transfer.reads_last_gradient:
            g_prev = None
        rec = TeleportRecord(step=step, epoch=epoch, teleporter=self.teleporter.name, transfer=self.transfer.policy)
        attempt_teleport(module, params, optimizer, TaskLossEvaluator(module), batches, rec,
                         teleporter=self.teleporter, transfer=self.transfer, trigger=self.trigger,
                         generator=self.generator, measure=self.measure, last_gradient=g_prev)
        rec.trigger_conflicts = rec.before.conflicts if rec.before is not None else None
        self.history.append(rec)
        if rec.applied:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return rec

    def before_step(self, optimizer: Any, shared: Shared | None = None) -> None:
        """Call right before every ``optimizer.step()``: applies HTR's pending ``sigma`` (eq. 13) with the
        step's gradient (``shared``: the teleported parameters; ``None``: those of the last call). A step
        whose shared parameters have no gradient keeps it pending, as the callback does."""
        params = self._params if shared is None else _trainable(shared)
        if self.transfer.pending_sigma is None or all(p.grad is None for p in params):
            return
        self.transfer.before_step(optimizer, params)

    @property
    def pending_sigma(self) -> float | None:
        """HTR's ``sigma`` (eq. 12) waiting for the next :meth:`before_step`."""
        return self.transfer.pending_sigma

    def _prepare(self, model: nn.Module, task_losses: TaskLosses, batches: Any, optimizer: Any, shared: Shared,
                 step: int, epoch: int) -> list[nn.Parameter]:
        """Check the arguments; (re)build the loss module when the model, losses or shared part change."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(task_losses):
            raise TypeError("task_losses must be a function of one batch returning the task losses")
        if not isinstance(batches, list):
            raise TypeError(f"batches must be a list of batches (e.g. [batch]), got {type(batches).__name__}")
        if not batches:
            raise ValueError("batches is empty: the teleport needs at least one batch to measure the losses on")
        check_int("step", step, 0)
        check_int("epoch", epoch, 0)
        params = _trainable(shared)
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for p in params):
            raise ValueError("shared must be parameters of model (the teleport moves them through model)")
        held = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
        if not any(id(p) in held for p in params):
            raise ValueError("the optimizer holds none of the shared parameters")
        self.transfer.check_optimizer(optimizer)
        trunk = shared if isinstance(shared, nn.Module) else None
        m = self._module
        if m is None or m.model is not model or m._fn is not task_losses or m.shared_module() is not trunk \
                or [id(p) for p in params] != [id(p) for p in self._params]:
            self._module = _TaskLossModule(model, task_losses, trunk, self.engine)
            self.teleporter.setup(self._module, params)
        self._params = params
        return params

    @staticmethod
    def _last_gradient(params: list[nn.Parameter], given: Tensor | None) -> Tensor | None:
        size = sum(p.numel() for p in params)
        if given is not None:
            if not isinstance(given, Tensor) or given.numel() != size:
                raise ValueError(f"last_gradient must be a tensor of the {size} trainable shared weights' gradient, "
                                 f"got {tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__}")
            return given.detach().reshape(-1).float()
        return flat_grad(params)


def teleport_once(model: nn.Module, task_losses: TaskLosses, batches: list[Any], optimizer: Any, *, shared: Shared,
                  teleporter: str | Mapping[str, Any] | Teleporter = "rescale", transfer: str | None = None,
                  last_gradient: Tensor | None = None, measure: bool = True, seed: int = 0) -> TeleportRecord:
    """One teleport with a fresh :class:`Teleport` (same arguments). ``transfer="htr"`` is refused: its
    ``sigma`` is applied at the next step, so it needs a kept :class:`Teleport` and its ``before_step``."""
    tele = Teleport(teleporter, transfer, measure=measure, seed=seed)
    if tele.transfer.policy == "htr":
        raise ValueError("transfer='htr' applies its sigma at the next optimizer step: keep a Teleport object and "
                         "call its before_step(optimizer) before that step (or pass another transfer)")
    return tele(model, task_losses, batches, optimizer, shared=shared, last_gradient=last_gradient)


def _trainable(shared: Shared) -> list[nn.Parameter]:
    """The trainable shared parameters, in order (frozen ones never move)."""
    items = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    if not items:
        raise ValueError("no shared parameters were given")
    for p in items:
        if not isinstance(p, nn.Parameter):
            raise TypeError(f"shared must be an nn.Module or an iterable of its parameters, got a {type(p).__name__}")
    params = [p for p in items if p.requires_grad]
    if not params:
        raise ValueError("no shared parameter requires grad: nothing to teleport")
    return params
