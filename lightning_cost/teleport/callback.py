"""``SymmetryTeleportCallback``: COST (paper Sec. 4) as a Lightning callback."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from lightning_cost.distributed import all_reduce_mean, all_reduce_mean_, broadcast_
from lightning_cost.protocol import MultiTaskModule, StepRecord
from lightning_cost.teleport.adapter import TeleportAdapter
from lightning_cost.teleport.htr import apply_htr, htr_sigma
from lightning_cost.teleport.objective import balance_ratios, loss_invariance, sample_sphere, sharpness
from lightning_cost.teleport.trigger import ConflictTrigger

__all__ = ["SymmetryTeleportCallback"]

log = logging.getLogger(__name__)


class _Rejected(Exception):
    pass


class SymmetryTeleportCallback(L.Callback):
    r"""Teleport the shared backbone to a less conflicting, loss-equivalent point (COST).

    **Trigger** (``on_after_backward``, eqs. 3-4): from the step's global per-task gradients of the
    shared parameters, count the tasks with ``cos(g_i, g_0) < 0``; teleport when the count is at
    least ``ceil(K/2)`` (``trigger="majority"``; ``"any"``: any task with ``cos <= 0``, the authors' code). Under gradient
    accumulation only the micro-batch that steps is checked; steps with non-finite gradients are
    never checked; every DDP rank sees the same global Jacobian and decides the same. With a
    gradient aggregator (FairGrad, MGDA, ...) the trigger reads what the core already computed: the
    aggregator's Gramian ``J J^T`` (``mtl_step.gramian``, the same tensor) when it has one, else
    ``mtl_step.jacobian``. It adds K cosines, no backward pass.

    **Representation trigger** (``trigger_on="representation"``, optional, approximate): the same
    rule on the per-task gradients w.r.t. the shared *representation* (the trunk's output
    ``z``, ``[B, D]``) instead of the shared parameters, from their ``K x K`` Gram matrix
    (:func:`~lightning_cost.teleport.trigger.conflict_cosines_from_gram`).
    ``representation_reduce="flatten"`` compares the ``B*D`` per-sample gradients
    (``G_ij = sum_b <dL_i/dz_b, dL_j/dz_b>``), ``"mean"`` their batch sums
    (``<sum_b dL_i/dz_b, sum_b dL_j/dz_b>``). A parameter gradient of the trunk's last layer is
    ``sum_b dL_i/dz_b h_b^T``, so its inner products weigh the sample pairs by ``<h_b, h_b'>``:
    ``flatten`` keeps only the diagonal, ``mean`` gives every pair weight 1; neither is exact. It is
    cheap: with a loss weighting no parameter Jacobian is computed on the checked steps (one
    batched backward through the heads to ``z``), and the Jacobian of eq. 10 and ``g'`` of eq. 12
    are computed only when a teleport happens. The module must expose ``z``:
    :class:`~lightning_cost.MultiTaskMixin` hooks the output of the module passed as ``shared`` to
    ``configure_multitask`` (or takes what ``training_step`` gives to ``mark_representation``).
    Measured agreement with the exact trigger and cost: see ``trigger_on`` below.

    **Teleport**: LoRA (PEFT) on the shared supported layers and dense deltas on other shared
    parameters (:class:`~lightning_cost.teleport.adapter.TeleportAdapter`), trained for
    ``inner_steps`` Adam steps on ``L_lora = L_t - gamma * L_g`` (eq. 11) with
    ``L_t = mean_i |L_i - L_i*|`` (eq. 7), ``L_i*`` the losses at the pre-teleport point on the
    teleport data, and ``L_g = max_j |(1/K) sum_i R_i L_i(theta + dtheta + eps_j)|`` (eq. 9) over
    ``num_perturbations`` draws ``eps_j`` on the sphere of radius ``radius``, ``R`` from eq. 10.
    The max is found without gradients and only the arg-max perturbation is back-propagated
    (the gradient of a max is the gradient of its arg-max term). ``sharpness="difference"`` uses
    eq. 8's ``L(theta+dtheta+eps) - L(theta+dtheta)`` instead of eq. 9's plain perturbed loss.
    The adapter is then merged in place (the optimizer's Parameter objects are kept),
    ``requires_grad`` flags and all buffers (BatchNorm statistics) are restored. Forwards at
    ``theta + dtheta`` use the merged weight ``W + s B A`` (PEFT's LoRA branch switched off,
    :class:`~lightning_cost.teleport.adapter.TeleportAdapter`), computed once per inner step for the
    ``n~ + 2`` evaluations.

    **The teleporting batch**: its gradient was computed at the pre-teleport point, so no optimizer
    step is taken on it (all its gradients are dropped); the next batch trains at the new point.

    **Transaction**: if the inner loop produces non-finite values, or a task loss after the merge
    is further than ``loss_tolerance * |L_i*| + abs_tolerance`` from ``L_i*``, the shared weights
    and buffers are restored bit for bit, the optimizer state is untouched, the record is marked
    ``accepted=False`` and the batch steps as usual.

    **HTR** (eqs. 12-13): ``sigma = cos(dtheta, g')`` with ``g'`` the aggregated gradient at the
    pre-teleport point; applied to the optimizer's state of the shared parameters right before the
    next optimizer step (:func:`~lightning_cost.teleport.htr.apply_htr`).

    **Cost** (``python -m benchmarks.perf.cost_budget``; MultiMNIST LeNet, batch 256, one CPU thread):
    with a gradient aggregator the trigger costs 1.04x a FairGrad step (1.08x on Yeast, K = 14); with
    a loss weighting the exact trigger needs the Jacobian (LS step x1.6 on MultiMNIST, x3.3 on
    Yeast; ``check_every`` and ``trigger_on="representation"`` cut that). A teleport costs about
    ``0.55 s + 0.7 s x inner_steps`` there (7.4 s at the default 10 inner steps, about 30 FairGrad
    steps; about 1.7x less than through PEFT's LoRA branch, whose forward costs 1.7x the merged
    weight's on this conv net), so on the main MultiMNIST job (64 steps) one forced teleport per
    epoch takes FairGrad + COST to 1.8x FairGrad's training time with 10 inner steps, 1.25-1.3x
    with ``inner_steps=3, inner_lr=3e-3`` and 1.05-1.1x with ``inner_steps=1, inner_lr=1e-2``
    (1.1-1.2x at 2 per epoch). The fewer, larger inner steps move the weights as far
    (``|dtheta|/|theta|`` 0.6 % and 2.5 % vs 0.4 %), keep the losses (drift 0.06 % and 0.3 % vs
    0.015 %) and leave the gradient norm as unchanged (x0.999, x0.995 vs x1.001) as 10 steps do;
    the defaults stay at 10 steps at the outer lr because the Delta-m% of one seed cannot tell them
    apart (all forced-teleport runs are worse than FairGrad there; at the default settings the
    trigger never fires on MultiMNIST, so FairGrad + COST is FairGrad, at 1.0x its time).

    **Observability**: ``history`` holds one record per teleport (see :meth:`_record`), and
    ``epoch_stats`` one per epoch (checked steps, conflicting steps, trigger ratio, teleports).
    Scalars go to the trainer's loggers under ``teleport/``.

    Args:
        gamma: weight of ``L_g`` in eq. 11.
        inner_steps: inner optimisation steps per teleport (per teleport batch).
        inner_lr: inner Adam learning rate (``None``: the main optimizer's first learning rate,
            as the authors do).
        rank, alpha: LoRA rank and ``lora_alpha``.
        num_perturbations: ``n~`` in eq. 9.
        radius: ``delta``, the norm of each perturbation over all shared parameters.
        ratio: ``"paper"`` (eq. 10) or ``"authors"`` for ``R``.
        sharpness: ``"paper"`` (eq. 9) or ``"difference"`` (eq. 8).
        trigger: ``"majority"`` (eq. 4) or ``"any"`` (the authors' code).
        warmup_epochs, warmup_steps: no teleport before both are reached.
        max_teleports_per_epoch: at most this many (accepted or rejected) teleports per epoch;
            ``None`` for no limit.
        min_steps_between: at least this many optimizer steps between two teleports.
        check_every: check the trigger on every N-th optimizer step only. For loss-weighting methods
            the Jacobian is then computed on those steps only (the others do one ordinary backward),
            which removes most of the trigger's cost when K is large.
        teleport_batches: 0 teleports on the current batch; ``N > 0`` on ``N`` batches drawn from
            the training loader (plus the current one).
        loss_tolerance, abs_tolerance: acceptance test on every task loss after the merge.
        use_lt, use_lg, use_htr: ablation switches (paper Table 4).
        htr_bias_correction: apply eq. 13 to Adam's bias-corrected moments (default) rather than to
            the raw ones (:func:`~lightning_cost.teleport.htr.apply_htr`). Both agree once
            ``1 - b2^t`` is close to 1 (thousands of steps: the paper's 200-epoch runs, where the
            authors teleport from epoch 50); earlier, the raw rule inflates Adam's ``v_hat`` up to
            ``1 / (1 - b2^t)``. Measured on the main MultiMNIST job (FairGrad, forced teleports,
            seed 0), Delta-m% corrected vs raw: 28.9 vs 39.6 and 25.6 vs 41.4 (3 inner steps, 4 and 8
            teleports per epoch), 36.9 vs 42.0 and 20.1 vs 20.9 (1 inner step, 4 and 1 per epoch).
            (Without HTR those runs are better still: eq. 13 with the measured ``sigma`` of about 0.1
            replaces 90 % of Adam's history by one gradient.)
        use_lora: ``False`` uses dense deltas on every shared parameter instead of LoRA.
        batched_perturbations: evaluate the ``n~`` perturbed losses of eq. 9 in one
            :func:`torch.func.vmap` pass over stacked weights instead of ``n~`` forwards (the same
            ``L_g`` up to float rounding; tested against the loop). Off by default: on one CPU thread
            it took 1.98x the loop's time on the MultiMNIST LeNet (batch 256) and 0.52x on the Yeast
            MLP (batch 64); turn it on for small models or where kernel launches dominate (GPU).
            Modules that ``vmap`` cannot trace (``.item()``, data-dependent control flow) need it off.
        trigger_on: ``"parameters"`` (default, exact: eqs. 3-4 on the shared parameters' Jacobian) or
            ``"representation"`` (approximate, see above). Measured (``python -m
            benchmarks.perf.cost_budget --sections levers agreement``): step cost with LS 1.14x /
            1.09x (flatten / mean) instead of 1.6x for the exact trigger on MultiMNIST, 1.42x / 1.37x
            instead of 3.3x on Yeast. Agreement with the exact decision, per step: 100 % on MultiMNIST
            (64 steps, neither fires) and on Yeast with the ceil(K/2) rule (115 steps; ``mean``:
            98 %); Yeast with the any-task rule: ``flatten`` 90 % (fires on half the steps the exact
            rule fires on, never wrongly), ``mean`` 26 % (fires on 90 % of the steps). Where
            conflicts are frequent (a synthetic 4-task bottleneck, exact rule firing on 38 % of the
            steps) it is a poor proxy: ``flatten`` fires on 1 % (agreement 63 %), ``mean`` on 77 %
            (agreement 54 %). Use it to make the trigger cheap where the exact one is mostly silent.
        representation_reduce: ``"flatten"`` (default) or ``"mean"``, see above.
        teleport_every: ``N > 0`` also forces a teleport at the steps with ``global_step % N == N // 2``
            (``N/2``, ``3N/2``, ...), whatever the trigger says (``max_teleports_per_epoch``,
            warm-up and spacing still apply): a fixed teleport budget, e.g. where the trigger is
            silent (MultiMNIST, K = 2). 0 (default): the trigger alone decides.
        seed: seed of the perturbation draws (the same on every rank).
    """

    def __init__(
        self,
        gamma: float = 0.05,
        inner_steps: int = 10,
        inner_lr: float | None = None,
        rank: int = 5,
        alpha: float | None = None,
        num_perturbations: int = 5,
        radius: float = 1e-2,
        ratio: Literal["paper", "authors"] = "paper",
        sharpness: Literal["paper", "difference"] = "paper",
        trigger: Literal["majority", "any"] = "majority",
        warmup_epochs: int = 0,
        warmup_steps: int = 0,
        max_teleports_per_epoch: int | None = 1,
        min_steps_between: int = 0,
        check_every: int = 1,
        teleport_batches: int = 0,
        loss_tolerance: float = 0.05,
        abs_tolerance: float = 1e-4,
        use_lt: bool = True,
        use_lg: bool = True,
        use_htr: bool = True,
        htr_bias_correction: bool = True,
        use_lora: bool = True,
        batched_perturbations: bool = False,
        trigger_on: Literal["parameters", "representation"] = "parameters",
        representation_reduce: Literal["flatten", "mean"] = "flatten",
        teleport_every: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if gamma < 0 or inner_steps < 1 or num_perturbations < 1 or radius <= 0:
            raise ValueError("need gamma >= 0, inner_steps >= 1, num_perturbations >= 1 and radius > 0")
        if inner_lr is not None and inner_lr <= 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}")
        if ratio not in ("paper", "authors") or sharpness not in ("paper", "difference"):
            raise ValueError("ratio must be 'paper'|'authors' and sharpness 'paper'|'difference'")
        if max_teleports_per_epoch is not None and max_teleports_per_epoch < 0:
            raise ValueError("max_teleports_per_epoch must be >= 0 or None")
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if trigger_on not in ("parameters", "representation") or representation_reduce not in ("flatten", "mean"):
            raise ValueError("trigger_on must be 'parameters'|'representation' and representation_reduce "
                             "'flatten'|'mean'")
        if teleport_every < 0:
            raise ValueError(f"teleport_every must be >= 0, got {teleport_every}")
        if min(warmup_epochs, warmup_steps, min_steps_between, teleport_batches) < 0:
            raise ValueError("warm-up, spacing and teleport_batches must be >= 0")
        if loss_tolerance < 0 or abs_tolerance < 0:
            raise ValueError("tolerances must be >= 0")
        if not (use_lt or use_lg):
            raise ValueError("at least one of use_lt and use_lg must be on")
        self.gamma, self.inner_steps, self.inner_lr = gamma, inner_steps, inner_lr
        self.rank, self.alpha, self.use_lora = rank, alpha, use_lora
        self.batched_perturbations = batched_perturbations
        self.trigger_on, self.representation_reduce = trigger_on, representation_reduce
        self.teleport_every = teleport_every
        self.num_perturbations, self.radius = num_perturbations, radius
        self.ratio, self.sharpness = ratio, sharpness
        self.trigger = ConflictTrigger(trigger, on=trigger_on, reduce=representation_reduce)
        self.warmup_epochs, self.warmup_steps = warmup_epochs, warmup_steps
        self.max_teleports_per_epoch, self.min_steps_between = max_teleports_per_epoch, min_steps_between
        self.teleport_batches = teleport_batches
        self.check_every = check_every
        self.loss_tolerance, self.abs_tolerance = loss_tolerance, abs_tolerance
        self.use_lt, self.use_lg, self.use_htr = use_lt, use_lg, use_htr
        self.htr_bias_correction = htr_bias_correction
        self.seed = seed
        self._dropout_off = False  # set during a teleport when dropout layers were switched off
        # state (checkpointed)
        self.history: list[dict[str, Any]] = []
        self.epoch_stats: list[dict[str, Any]] = []
        self.num_teleports = 0
        self.num_rejected = 0
        self.last_teleport_step: int | None = None
        self._epoch = {"checked": 0, "conflicting": 0, "teleports": 0}
        self._pending_sigma: float | None = None
        # transient
        self._batch: Any = None
        self._batch_idx = 0
        self._drop_step = False
        self.force_next = False  # set True to teleport at the next checked step regardless of the trigger
        self._last_terms: tuple[float, float] = (float("nan"), float("nan"))

    # ------------------------------------------------------------------ setup
    @property
    def state_key(self) -> str:
        return self._generate_state_key(trigger=self.trigger.rule, gamma=self.gamma)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, MultiTaskModule):
            raise TypeError(
                "SymmetryTeleportCallback needs a LightningModule implementing lightning_cost.MultiTaskModule "
                "(e.g. one built with MultiTaskMixin)"
            )
        if type(trainer.strategy) is not SingleDeviceStrategy and not isinstance(trainer.strategy, DDPStrategy):
            raise RuntimeError(
                f"SymmetryTeleportCallback supports single-device and DDP training; {type(trainer.strategy).__name__} "
                "shards or wraps parameters (FSDP, DeepSpeed, ...) and is not supported"
            )
        if not pl_module.automatic_optimization:
            raise RuntimeError("SymmetryTeleportCallback needs automatic optimization")
        if self.trigger_on == "representation":
            if not callable(getattr(pl_module, "request_representation_jacobian", None)):
                raise TypeError("trigger_on='representation' needs a module with request_representation_jacobian() "
                                "(e.g. one built with MultiTaskMixin)")
            pl_module.request_representation_jacobian(True)
        else:
            pl_module.request_jacobian(True)
        if self.use_lora:
            import peft.tuners.lora  # noqa: F401  (a one-time import of ~2 s; paid here, not in the first teleport)

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = {"checked": 0, "conflicting": 0, "teleports": 0}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        request = getattr(pl_module, "request_representation_jacobian", None)
        if stage == "fit" and self.trigger_on == "representation" and callable(request):
            request(False)  # removes the forward hook

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx
        n = self.teleport_every
        if n and trainer.global_step % n == n // 2:
            self.force_next = True
        if self.check_every > 1:
            wanted = self._checks(trainer) or self.force_next
            if self.trigger_on == "representation":
                pl_module.request_representation_jacobian(wanted)
            else:
                pl_module.request_jacobian(wanted)

    def _checks(self, trainer: L.Trainer) -> bool:
        return trainer.global_step % self.check_every == 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # only the micro-batch that steps counts
        if not (self._checks(trainer) or self.force_next):
            return
        record: StepRecord | None = getattr(pl_module, "mtl_step", None)
        if record is None or not record.finite or record.skipped:
            return
        result = self.trigger.check(record)
        if result is None:
            return
        self._epoch["checked"] += 1
        self._epoch["conflicting"] += int(result.fire)
        if (result.fire or self.force_next) and self._allowed(trainer):
            self.force_next = False
            self._teleport(trainer, pl_module, record, result)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._drop_step:  # the teleporting batch: its gradient belongs to the old point
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._drop_step = False
            return
        if self._pending_sigma is None:
            return
        record = getattr(pl_module, "mtl_step", None)
        shared = pl_module.shared_parameters()
        grads = [p.grad for p in shared if p.grad is not None]
        if (record is not None and record.skipped) or not grads or not all(torch.isfinite(g).all() for g in grads):
            return  # this step will not be taken: keep HTR for the next one
        apply_htr(optimizer, shared, self._pending_sigma, bias_corrected=self.htr_bias_correction)
        self._pending_sigma = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checked = self._epoch["checked"]
        stats = {
            "epoch": trainer.current_epoch,
            **self._epoch,
            "trigger_ratio": self._epoch["conflicting"] / checked if checked else 0.0,
        }
        self.epoch_stats.append(stats)
        self._log(trainer, {
            "teleport/trigger_ratio": stats["trigger_ratio"],
            "teleport/epoch_teleports": float(stats["teleports"]),
            "teleport/count": float(self.num_teleports),
        })

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "epoch_stats": self.epoch_stats,
            "num_teleports": self.num_teleports,
            "num_rejected": self.num_rejected,
            "last_teleport_step": self.last_teleport_step,
            "epoch_counts": dict(self._epoch),
            "pending_sigma": self._pending_sigma,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.epoch_stats = list(state_dict["epoch_stats"])
        self.num_teleports = int(state_dict["num_teleports"])
        self.num_rejected = int(state_dict["num_rejected"])
        self.last_teleport_step = state_dict["last_teleport_step"]
        self._epoch = dict(state_dict["epoch_counts"])
        self._pending_sigma = state_dict["pending_sigma"]

    # ------------------------------------------------------------------ the teleport
    def _allowed(self, trainer: L.Trainer) -> bool:
        if trainer.current_epoch < self.warmup_epochs or trainer.global_step < self.warmup_steps:
            return False
        if self.max_teleports_per_epoch is not None and self._epoch["teleports"] >= self.max_teleports_per_epoch:
            return False
        if self.last_teleport_step is not None and trainer.global_step - self.last_teleport_step < self.min_steps_between:
            return False
        return True

    def _teleport_data(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Any]:
        batches = [self._batch]
        if self.teleport_batches:
            loader = trainer.train_dataloader
            it = iter(loader)
            for _ in range(self.teleport_batches):
                try:
                    b = next(it)
                except StopIteration:
                    break
                b = pl_module._apply_batch_transfer_handler(b, dataloader_idx=0)
                batches.append(b)
        return batches

    def _losses(self, trainer: L.Trainer, pl_module: Any, batches: Sequence[Any], adapter: TeleportAdapter | None = None,
                eps: list[Tensor] | None = None, overrides: dict[str, Tensor] | None = None,
                batched: bool = False) -> Tensor:
        """Mean task losses over ``batches`` (local, differentiable).

        With ``batched=True``, ``eps`` holds ``[n, *shape]`` tensors and the result is ``[n, K]``
        (one vectorised pass per batch, :meth:`TeleportAdapter.call_batched`).
        """
        total = None
        for b in batches:
            with trainer.precision_plugin.forward_context():
                if adapter is None:
                    out = pl_module.evaluate_task_losses(b, self._batch_idx)
                elif batched:
                    assert eps is not None
                    out = adapter.call_batched(pl_module.evaluate_task_losses, b, self._batch_idx, eps=eps,
                                               overrides=overrides)
                else:
                    out = adapter.call(pl_module.evaluate_task_losses, b, self._batch_idx, eps=eps, overrides=overrides)
            out = out.float()
            total = out if total is None else total + out
        return total / len(batches)

    def _jacobian(self, trainer: L.Trainer, pl_module: Any, batches: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """Global task losses and per-task shared gradients at the current weights."""
        shared = [p for p in pl_module.shared_parameters()]
        flags = [p.requires_grad for p in shared]
        for p in shared:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                losses = self._losses(trainer, pl_module, batches)
                rows = []
                for i in range(losses.shape[0]):
                    gs = torch.autograd.grad(losses[i], shared, retain_graph=i < losses.shape[0] - 1, allow_unused=True)
                    rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, shared, strict=True)]))
        finally:
            for p, f in zip(shared, flags, strict=True):
                p.requires_grad_(f)
        return all_reduce_mean(losses.detach()), all_reduce_mean_(torch.stack(rows))

    def _teleport(self, trainer: L.Trainer, pl_module: Any, record: StepRecord, before: Any) -> None:
        """Teleport with every dropout layer switched off, so that each evaluation of the task losses is
        the same function of the weights: with dropout on, ``L_t`` (eq. 7) and the acceptance test would
        compare losses under different random masks (measured on the Tox21/QM8 fingerprint MLP, dropout
        0.1: every teleport rejected with a 3-18 % "drift" that was mask noise). BatchNorm keeps using
        the batch statistics (its buffers are restored); each layer's mode is restored afterwards."""
        dropouts = [m for m in pl_module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
        for m in dropouts:
            m.eval()
        self._dropout_off = bool(dropouts)
        try:
            self._teleport_impl(trainer, pl_module, record, before)
        finally:
            for m in dropouts:
                m.train()
            self._dropout_off = False

    def _teleport_impl(self, trainer: L.Trainer, pl_module: Any, record: StepRecord, before: Any) -> None:
        start = time.perf_counter()
        shared = pl_module.shared_parameters()
        weights0 = [p.detach().clone() for p in shared]
        buffers0 = [(b, b.detach().clone()) for b in pl_module.buffers()]
        grad_flags = [(p, p.requires_grad) for p in pl_module.parameters()]
        modes = [(m, m.training) for m in pl_module.modules()]

        def restore_buffers() -> None:
            with torch.no_grad():
                for b, saved in buffers0:
                    b.copy_(saved)

        jacobian, g_prev = record.jacobian, record.direction
        if jacobian is None:  # representation trigger with a loss weighting: the parameter Jacobian only now
            _, jacobian = self._jacobian(trainer, pl_module, [self._batch])
            restore_buffers()
        if g_prev is None:  # g' of eq. 12: the step's gradient, as Lightning's backward left it (scale-free cosine)
            grads = [p.grad for p in shared]
            if any(g is not None for g in grads):
                g_prev = torch.cat([(g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                                    for g, p in zip(grads, shared, strict=True)])
        norms_before = jacobian.norm(dim=1)
        if self.trigger_on == "representation":
            before = (before, self.trigger(jacobian))
        batches = self._teleport_data(trainer, pl_module)
        with torch.no_grad():
            # the step's losses are L* unless dropout was on when they were computed (they used other masks)
            reuse = len(batches) == 1 and not self._dropout_off
            target = record.losses.float() if reuse else all_reduce_mean(self._losses(trainer, pl_module, batches))
        ratios = balance_ratios(norms_before.float(), self.ratio).to(target.device)

        def restore_weights() -> None:
            with torch.no_grad():
                for p, saved in zip(shared, weights0, strict=True):
                    p.copy_(saved)

        adapter = TeleportAdapter(pl_module, shared, rank=self.rank, alpha=self.alpha, use_lora=self.use_lora)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.num_teleports)
        reason = ""
        losses_after: Tensor | None = None
        inner_trace: list[float] = []
        inner_terms: list[list[float]] = []
        try:
            adapter.inject()
            params = adapter.parameters()
            for p in adapter.lora_parameters():
                broadcast_(p.data)  # identical LoRA initialisation on every rank
            lr = self.inner_lr if self.inner_lr is not None else trainer.optimizers[0].param_groups[0]["lr"]
            inner = torch.optim.Adam(params, lr=lr)
            shapes = [p.shape for p in shared]
            with torch.enable_grad():
                for _ in range(self.inner_steps):
                    objective = self._inner_objective(trainer, pl_module, adapter, batches, target, ratios, shapes,
                                                      generator)
                    grads = torch.autograd.grad(objective, params, allow_unused=True)
                    for p, g in zip(params, grads, strict=True):
                        p.grad = all_reduce_mean_(g.detach().clone() if g is not None else torch.zeros_like(p))
                    if not all(torch.isfinite(p.grad).all() for p in params):
                        raise _Rejected("non-finite gradient in the inner loop")
                    inner.step()
                    inner.zero_grad(set_to_none=True)
                    inner_trace.append(float(objective.detach()))
                    inner_terms.append(list(self._last_terms))
            adapter.merge()
        except _Rejected as err:
            reason = str(err)
        finally:
            adapter.discard()  # no-op after a merge; removes the adapters after a failure
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            restore_buffers()
            for m, mode in modes:
                m.training = mode

        if not reason:
            if not all(torch.isfinite(p).all() for p in shared):
                reason = "non-finite weights after the merge"
            else:
                with torch.no_grad():
                    losses_after = all_reduce_mean(self._losses(trainer, pl_module, batches).detach())
                restore_buffers()
                bound = self.loss_tolerance * target.abs() + self.abs_tolerance
                if not torch.isfinite(losses_after).all():
                    reason = "non-finite losses after the merge"
                elif ((losses_after - target).abs() > bound).any():
                    reason = "loss drift above tolerance: " + ", ".join(
                        f"{t}: {float(a):.4g} vs {float(b):.4g}"
                        for t, a, b in zip(pl_module.task_names, losses_after, target, strict=True)
                    )
        accepted = not reason
        sigma = None
        after = None
        moved: tuple[float, float] | None = None
        if accepted:
            delta = torch.cat([(p.detach() - w).reshape(-1) for p, w in zip(shared, weights0, strict=True)])
            sigma = htr_sigma(delta, g_prev) if g_prev is not None else 0.0
            theta_norm = float(torch.sqrt(sum((w.double() ** 2).sum() for w in weights0)))
            moved = (float(delta.double().norm()), float(delta.double().norm()) / max(theta_norm, 1e-30))
            _, jac_after = self._jacobian(trainer, pl_module, batches)
            restore_buffers()
            after = (jac_after.norm(dim=1), self.trigger(jac_after))
            if self.use_htr:
                self._pending_sigma = sigma
            self._drop_step = True
            self.num_teleports += 1
        else:
            restore_weights()
            restore_buffers()
            self.num_rejected += 1
            log.warning("lightning_cost: teleport rejected and rolled back (%s)", reason)
        self._epoch["teleports"] += 1
        self.last_teleport_step = trainer.global_step
        rec = self._record(trainer, pl_module, target, losses_after, norms_before, before, after, sigma, accepted,
                           reason, time.perf_counter() - start, inner_trace)
        rec["inner_terms"] = inner_terms
        if moved is not None:
            rec["displacement_norm"], rec["displacement_rel"] = moved
        self.history.append(rec)
        self._log(trainer, {
            "teleport/accepted": float(accepted),
            "teleport/count": float(self.num_teleports),
            "teleport/seconds": rec["seconds"],
            **({"teleport/loss_drift": rec["loss_drift"],
                "teleport/grad_norm_ratio": rec["grad_norm_after"] / max(rec["grad_norm_before"], 1e-30),
                "teleport/conflicts_before": float(rec["conflicts_before"]),
                "teleport/conflicts_after": float(rec["conflicts_after"]),
                "teleport/sigma": float(sigma or 0.0)} if accepted else {}),
        })

    def _inner_objective(self, trainer: L.Trainer, pl_module: Any, adapter: TeleportAdapter, batches: Sequence[Any],
                         target: Tensor, ratios: Tensor, shapes: list[torch.Size], generator: torch.Generator) -> Tensor:
        """``L_lora = L_t - gamma * L_g`` (eq. 11) at the adapter's current ``dtheta``."""
        base = adapter.overrides()  # theta + dtheta, once for the n~ + 2 evaluations of this step
        losses = self._losses(trainer, pl_module, batches, adapter, overrides=base)
        objective = loss_invariance(losses, target) if self.use_lt else losses.new_zeros(())
        if not torch.isfinite(losses).all():
            raise _Rejected("non-finite task losses in the inner loop")
        lg = float("nan")
        if self.use_lg:
            device = losses.device
            draws = [sample_sphere(shapes, self.radius, generator, device) for _ in range(self.num_perturbations)]
            with torch.no_grad():
                values = self._perturbed_sharpness(trainer, pl_module, adapter, batches, base, draws, losses, ratios)
            best = draws[int(values.argmax())]
            lp = self._losses(trainer, pl_module, batches, adapter, best, overrides=base)
            term = self._sharpness(lp, losses, ratios)
            objective = objective - self.gamma * term
            lg = float(term.detach())
        self._last_terms = (float(loss_invariance(losses.detach(), target)), lg)  # (L_t, L_g) for the record
        return objective

    def _perturbed_sharpness(self, trainer: L.Trainer, pl_module: Any, adapter: TeleportAdapter,
                             batches: Sequence[Any], base: dict[str, Tensor], draws: list[list[Tensor]],
                             losses: Tensor, ratios: Tensor) -> Tensor:
        """The ``n~`` terms of eq. 9 (no gradient): a loop of forwards, or one vectorised pass."""
        if self.batched_perturbations:
            stacked = [torch.stack(parts) for parts in zip(*draws, strict=True)]
            lp = self._losses(trainer, pl_module, batches, adapter, stacked, overrides=base, batched=True)
            return torch.stack([self._sharpness(lp[j], losses.detach(), ratios) for j in range(len(draws))])
        values = []
        for eps in draws:
            lp = self._losses(trainer, pl_module, batches, adapter, eps, overrides=base)
            values.append(self._sharpness(lp, losses.detach(), ratios))
        return torch.stack(values)

    def _sharpness(self, perturbed: Tensor, unperturbed: Tensor, ratios: Tensor) -> Tensor:
        if self.sharpness == "difference":
            return sharpness(perturbed - unperturbed, ratios)
        return sharpness(perturbed, ratios)

    # ------------------------------------------------------------------ records and logs
    def _record(self, trainer: L.Trainer, pl_module: Any, target: Tensor, losses_after: Tensor | None,
                norms_before: Tensor, before: Any, after: Any, sigma: float | None, accepted: bool, reason: str,
                seconds: float, inner_trace: list[float]) -> dict[str, Any]:
        trig_view = None
        if isinstance(before, tuple):  # representation trigger: (its decision, the parameter view)
            trig_view, before = before
        rec: dict[str, Any] = {
            "trigger_on": self.trigger_on,
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "accepted": accepted,
            "reason": reason,
            "seconds": seconds,
            "losses_before": [float(x) for x in target],
            "losses_after": [float(x) for x in losses_after] if losses_after is not None else None,
            "grad_norms_before": [float(x) for x in norms_before],
            "grad_norm_before": float(norms_before.norm()),
            "conflicts_before": before.num_conflicting,
            "cosines_before": [float(x) for x in before.cosines],
            "sigma": sigma,
            "inner_objective": inner_trace,
        }
        if trig_view is not None:
            rec["trigger_conflicts"] = trig_view.num_conflicting
            rec["trigger_cosines"] = [float(x) for x in trig_view.cosines]
        if losses_after is not None:
            rel = (losses_after - target).abs() / target.abs().clamp_min(1e-12)
            rec["loss_drift"] = float(rel.mean())
        if after is not None:
            norms_after, trig_after = after
            rec.update({
                "grad_norms_after": [float(x) for x in norms_after],
                "grad_norm_after": float(norms_after.norm()),
                "conflicts_after": trig_after.num_conflicting,
                "cosines_after": [float(x) for x in trig_after.cosines],
            })
        return rec

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))},
                               step=trainer.global_step)
