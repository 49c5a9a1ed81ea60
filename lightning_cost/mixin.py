"""The multi-task core: a LightningModule mixin that owns per-task gradients and aggregation.

Usage::

    class Net(MultiTaskMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.trunk = ...
            self.heads = nn.ModuleDict(...)
            self.configure_multitask(tasks=["left", "right"], shared=self.trunk, method="fairgrad")

        def training_step(self, batch, batch_idx):
            x, y = batch
            z = self.trunk(x)
            return {"left": F.cross_entropy(self.heads["left"](z), y[:, 0]),
                    "right": F.cross_entropy(self.heads["right"](z), y[:, 1])}

``training_step`` returns the K task losses, as a mapping ``{task name: scalar}`` (keys must be
exactly the configured task names) or as a ``[K]`` tensor in task order. The mixin turns them
into the update:

* **Loss weightings** (LS, SI, RLW, DWA, UW, FAMO) with no Jacobian requested: the method's
  scalar objective is returned and Lightning does one ordinary backward. No Jacobian is paid for.
* **Gradient aggregators** (MGDA, PCGrad, ..., or any method when the teleport callback has
  requested the Jacobian): the exact per-task gradients come from the module's
  :class:`~lightning_cost.jacobian.JacobianEngine` (``mtl_jacobian_engine``): by default one
  vector-Jacobian product with K one-hot cotangents, batched by ``vmap``, falling back for good to
  K products over one graph if an op has no batching rule (``jacobian_mode``). They give the
  ``K x P`` Jacobian ``J`` of the shared parameters and each task's gradient of the other
  parameters. Under DDP ``J`` is averaged over ranks, so every rank aggregates the same global
  Jacobian and takes the same decision. The aggregator turns ``J`` into the shared direction
  ``d``; task-specific parameters get ``sum_k c_k grad L_k`` (``c_k = 1`` for gradient
  aggregators, the method's loss weights for loss weightings). The update reaches ``.grad``
  through Lightning's own backward of a linear surrogate (:mod:`lightning_cost.update`), so
  gradient accumulation, fp16 loss scaling, clipping and DDP's reducer work unchanged. The value
  returned is the method's objective (for display); only its gradient is the surrogate's.

The mixin needs Lightning's automatic optimization: with ``automatic_optimization = False`` its
``training_step`` raises a ``RuntimeError`` instead of being silently bypassed.

Non-finite losses or gradients: the step is skipped with a warning and the weights are left
untouched. With a fp16 ``GradScaler`` the non-finite gradients are handed to the scaler instead,
which skips the step and lowers its scale, as in ordinary mixed-precision training. An aggregator
that cannot produce an update (:class:`AggregationError`, e.g. a failed solve) also skips the step
with a warning; ``mtl_skipped_steps`` counts skipped steps, and a run of ``max_skipped_steps``
consecutive ones raises :class:`TrainingStalledError`. Warnings are printed by global rank 0 only.

Per-task gradients w.r.t. the shared representation (for the teleport's representation
trigger) are described in :mod:`lightning_cost.representation`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_cost.aggregators import (
    Aggregator,
    GramianAggregator,
    LossWeighting,
    aggregator_class,
    build_aggregator,
)
from lightning_cost.gramian_engine import GramianConfig, GramianEngine
from lightning_cost.jacobian import JacobianEngine, JacobianMode
from lightning_cost.protocol import StepRecord
from lightning_cost.representation import RepresentationGradients
from lightning_cost.step import MultiTaskStep, TrainingStalledError

__all__ = ["MultiTaskMixin", "TrainingStalledError"]


class MultiTaskMixin(MultiTaskStep, RepresentationGradients):
    """Turns a LightningModule with a shared part and K task heads into a multi-task trainer.

    Put it *before* ``LightningModule`` in the bases and call :meth:`configure_multitask` in
    ``__init__``. Implements :class:`lightning_cost.protocol.MultiTaskModule`.

    Optional hook: a *pure* ``compute_task_losses(self, batch) -> Mapping[str, Tensor] | Tensor``
    (the K task losses of ``batch``, with no side effects). When the class defines it,
    :meth:`evaluate_task_losses` (which the teleport calls many times per teleport) uses it instead
    of re-running ``training_step`` with its metric updates, counters and logging.
    """

    # ------------------------------------------------------------------ configuration
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in ("on_before_optimizer_step", "on_save_checkpoint", "on_load_checkpoint"):
            user_hook = cls.__dict__.get(hook)
            if user_hook is not None and not getattr(user_hook, "_mtl_wrapped", False):
                setattr(cls, hook, _mixin_first(hook, user_hook))

        user_step = cls.__dict__.get("training_step")
        if user_step is None or getattr(user_step, "_mtl_wrapped", False):
            return

        @functools.wraps(user_step)
        def training_step(self: MultiTaskMixin, *args: Any, **kwargs: Any) -> Any:
            if getattr(self, "_mtl_inside_step", False):  # nested call (super() or evaluate_task_losses)
                return user_step(self, *args, **kwargs)
            return self._mtl_training_step(user_step, *args, **kwargs)

        training_step._mtl_wrapped = True  # type: ignore[attr-defined]
        cls.training_step = training_step  # type: ignore[attr-defined]

    def configure_multitask(
        self,
        tasks: Sequence[str],
        shared: nn.Module | Iterable[nn.Parameter],
        method: str | Aggregator | LossWeighting = "ls",
        *,
        jacobian_mode: JacobianMode = "auto",
        engine: Literal["auto", "gramian", "jacobian"] = "auto",
        gramian: GramianConfig | Mapping[str, Any] | None = None,
        max_skipped_steps: int | None = None,
        **hparams: Any,
    ) -> None:
        """Declare the tasks, the shared parameters and the multi-task method.

        Args:
            tasks: the K task names (K >= 2), the keys ``training_step`` returns.
            shared: the shared module (all its parameters) or an iterable of shared parameters.
                They must be parameters of this module.
            method: a registry name (``lightning_cost.aggregators.REGISTERED``) or a method instance.
            jacobian_mode: how the K per-task gradients are computed when a Jacobian is needed
                (:class:`~lightning_cost.jacobian.JacobianEngine`). ``"loop"``: K vector-Jacobian
                products over one graph. ``"batched"``: one VJP with K one-hot cotangents: the same
                numbers, faster where the backward is made of many small ops (small models, many
                tasks), at the price of K x the backward's intermediate memory. ``"auto"``
                (default): batched, falling back to the loop for the rest of training if an op
                has no batching rule.
            engine: where the per-task gradients of a Gramian method (MGDA, CAGrad, IMTL-G, Nash-MTL,
                PCGrad, FairGrad) come from. ``"gramian"``: the
                :class:`~lightning_cost.gramian_engine.GramianEngine` (``G = J J^T`` and ``J^T w``
                per layer, ``J`` never formed, ``mtl_step.jacobian`` is ``None``); ``"jacobian"``:
                the Jacobian engine (``J`` formed). ``"auto"`` (default): the Gramian engine for
                Gramian methods, the Jacobian engine for the rest. Under DDP the exact Jacobian path
                is always used (the global Gramian needs cross-rank terms).
            gramian: the Gramian engine's settings (:class:`~lightning_cost.gramian_engine.GramianConfig`
                or its fields as a mapping).
            max_skipped_steps: a run of this many consecutive skipped steps (non-finite values,
                failed solves) raises :class:`TrainingStalledError` instead of training on with
                no updates. ``None`` (default): the larger of 50 and 10 % of an epoch's training
                batches (when the trainer knows that number); ``0``: never.
            **hparams: hyper-parameters for the method when ``method`` is a name.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("MultiTaskMixin must be mixed into a LightningModule (an nn.Module)")
        tasks, config = _checked_settings(tasks, engine, gramian, max_skipped_steps)
        self.mtl_jacobian_engine = JacobianEngine(jacobian_mode)
        self.mtl_gramian_engine = GramianEngine(config, jacobian=self.mtl_jacobian_engine)
        self._mtl_engine = engine
        self._mtl_gram_captured = False
        self._mtl_shared_names: list[str] = self._mtl_shared_parameter_names(shared)
        self.task_names: list[str] = tasks
        self.mtl_method = self._mtl_build_method(method, len(tasks), hparams)  # a submodule: checkpointed
        if engine == "gramian" and not isinstance(self.mtl_method, GramianAggregator):
            raise ValueError(f"engine='gramian' needs a Gramian method (d = J^T w(G)); {type(self.mtl_method).__name__} "
                             "reads the Jacobian itself or weights the losses: use engine='auto' or 'jacobian'")
        self._mtl_max_skipped = max_skipped_steps
        self._mtl_reset_step_state()
        self._mtl_init_representation(shared)

    def _mtl_reset_step_state(self) -> None:
        """No step taken yet: no record, no skipped step, nothing requested."""
        self.mtl_step: StepRecord | None = None
        self.mtl_skipped_steps = 0
        self._mtl_skip_run = 0
        self._mtl_jacobian_requested = False
        self._mtl_inside_step = False
        self._mtl_silent = False
        self._mtl_epoch_seen: int | None = None
        self._mtl_drop_grads = False

    def _mtl_shared_parameter_names(self, shared: nn.Module | Iterable[nn.Parameter]) -> list[str]:
        shared_params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
        if not shared_params:
            raise ValueError("no shared parameters were given")
        ids = {id(p) for p in shared_params}
        names = [n for n, p in self.named_parameters() if id(p) in ids]  # type: ignore[attr-defined]
        if len(names) != len(ids):
            raise ValueError("every shared parameter must be a parameter of this module")
        return names

    @staticmethod
    def _mtl_build_method(method: str | Aggregator | LossWeighting, k: int,
                          hparams: dict[str, Any]) -> Aggregator | LossWeighting:
        if isinstance(method, str):
            if "num_tasks" in inspect.signature(aggregator_class(method)).parameters:
                hparams.setdefault("num_tasks", k)  # e.g. UW creates one parameter per task
            method = build_aggregator(method, **hparams)
        elif hparams:
            raise ValueError("hyper-parameters can only be given with a method name")
        if not isinstance(method, (Aggregator, LossWeighting)):
            raise TypeError(f"method must be an Aggregator or a LossWeighting, got {type(method).__name__}")
        return method

    @property
    def mtl_jacobian_mode(self) -> str:
        """The Jacobian engine's mode; setting another mode replaces the engine."""
        return self.mtl_jacobian_engine.mode

    @mtl_jacobian_mode.setter
    def mtl_jacobian_mode(self, mode: JacobianMode) -> None:
        if mode != self.mtl_jacobian_engine.mode:
            self.mtl_jacobian_engine = JacobianEngine(mode)

    # ------------------------------------------------------------------ protocol
    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared parameters, in a fixed order (the column order of the Jacobian)."""
        named = dict(self.named_parameters())  # type: ignore[attr-defined]
        return [named[n] for n in self._mtl_shared_names]

    def request_jacobian(self, enabled: bool = True) -> None:
        """Compute the per-task Jacobian every step even when the method does not need it."""
        self._mtl_jacobian_requested = bool(enabled)

    @property
    def needs_jacobian(self) -> bool:
        return bool(self.mtl_method.requires_jacobian or self._mtl_jacobian_requested)

    @property
    def has_pure_losses(self) -> bool:
        """Whether the class defines ``compute_task_losses(batch)`` (see the class docstring)."""
        return callable(getattr(type(self), "compute_task_losses", None))

    def evaluate_task_losses(self, batch: Any, batch_idx: int = 0) -> Tensor:
        """The ``[K]`` task losses on ``batch``, differentiable, with logging muted.

        From ``compute_task_losses(batch)`` when the class defines it, else from ``training_step``.
        """
        self._mtl_inside_step, self._mtl_silent = True, True
        try:
            if self.has_pure_losses:
                return self._mtl_stack(self.compute_task_losses(batch), "compute_task_losses")  # type: ignore[attr-defined]
            return self._mtl_stack(self.training_step(batch, batch_idx))  # type: ignore[attr-defined]
        finally:
            self._mtl_inside_step, self._mtl_silent = False, False

    def log(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102 - LightningModule.log, muted during evaluations
        if not getattr(self, "_mtl_silent", False):
            super().log(*args, **kwargs)  # type: ignore[misc]

    def log_dict(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        if not getattr(self, "_mtl_silent", False):
            super().log_dict(*args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ the step
    def _mtl_stack(self, out: Any, source: str = "training_step") -> Tensor:
        return self._mtl_split(out, source)[0]

    def _mtl_split(self, out: Any, source: str = "training_step") -> tuple[Tensor, list[Tensor] | None]:
        """The ``[K]`` task losses and, when they came as a mapping, the same K scalars separately
        (the Gramian engine's two-stage product needs each task's own graph)."""
        if isinstance(out, Mapping):
            keys = set(out)
            if keys != set(self.task_names):
                raise ValueError(f"{source} must return exactly the task losses {self.task_names}; got keys {sorted(keys)}")
            losses = [out[t] for t in self.task_names]
            for t, v in zip(self.task_names, losses, strict=True):
                if not isinstance(v, Tensor) or v.numel() != 1:
                    raise ValueError(f"the loss of task {t!r} must be a scalar tensor, got {v!r}")
            parts = [v.reshape(()).float() for v in losses]
            return torch.stack(parts), parts
        if isinstance(out, Tensor):
            if out.ndim != 1 or out.shape[0] != len(self.task_names):
                raise ValueError(f"{source} returned a tensor of shape {tuple(out.shape)}; expected [{len(self.task_names)}]")
            return out.float(), None
        raise TypeError(f"a MultiTaskMixin {source} must return a mapping {{task: loss}} or a [K] tensor, "
                        f"got {type(out).__name__}")

    def _mtl_training_step(self, user_step: Any, *args: Any, **kwargs: Any) -> Tensor | None:
        if not getattr(self, "automatic_optimization", True):
            raise RuntimeError(
                "MultiTaskMixin needs automatic optimization: it hands the multi-task update to Lightning's own "
                "backward of the value training_step returns, which manual optimization ignores. Set "
                "automatic_optimization = True, or, to keep manual optimization, drop the mixin and compute the "
                "update yourself: lightning_cost.JacobianEngine().jacobian(losses, params) and an aggregator's "
                "aggregate(J)."
            )
        self._mtl_inside_step = True
        self._mtl_start_capture()
        self._mtl_gram_captured = use_gram = self.needs_jacobian and self.mtl_uses_gramian_engine
        module, boundary_name = cast(nn.Module, self), self._mtl_shared_module_name
        boundary = module.get_submodule(boundary_name) if boundary_name is not None else None
        capture = self.mtl_gramian_engine.capture(module, self.shared_parameters(), len(self.task_names), boundary) \
            if use_gram else nullcontext()
        try:
            with capture:
                losses, task_losses = self._mtl_split(user_step(self, *args, **kwargs))
        finally:
            self._mtl_inside_step = False
            reps = self._mtl_end_capture()
        method = self.mtl_method
        epoch = int(getattr(self, "current_epoch", 0))
        if self._mtl_epoch_seen is not None and epoch != self._mtl_epoch_seen and isinstance(method, LossWeighting):
            method.on_epoch_end()
        self._mtl_epoch_seen = epoch
        out = self._mtl_jacobian_step(losses, reps, task_losses) if self.needs_jacobian \
            else self._mtl_weighting_step(losses, reps)
        if self.mtl_step is not None and not self.mtl_step.skipped:
            self._mtl_skip_run = 0
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps the Gramian engine's first-step decision in the checkpoint, so that a resumed run takes
        the same engine as the uninterrupted one (re-checking could decide otherwise, e.g. under bf16),
        and the last epoch a step saw, so that a loss weighting's epoch is closed as it would have been.

        If you override this hook, it still runs first (the mixin wraps your override).
        """
        engine = self.mtl_gramian_engine
        checkpoint[_CHECKPOINT_KEY] = {"gramian_verified": engine.verified, "gramian_disabled": engine.disabled_reason,
                                       "epoch_seen": self._mtl_epoch_seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores what :meth:`on_save_checkpoint` kept (checkpoints without it are re-checked)."""
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is not None:
            engine = self.mtl_gramian_engine
            engine.verified, engine.disabled_reason = bool(saved["gramian_verified"]), saved["gramian_disabled"]
            self._mtl_epoch_seen = saved.get("epoch_seen")  # a resume at an epoch's end then closes that epoch

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drops the gradients of a skipped step so that the optimizer leaves every weight untouched.

        If you override this hook, it still runs first (the mixin wraps your override).
        """
        if getattr(self, "_mtl_drop_grads", False):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._mtl_drop_grads = False


_CHECKPOINT_KEY = "lightning_cost"


def _mixin_first(hook: str, user_hook: Any) -> Any:
    """``user_hook`` (a subclass's override of a hook the mixin needs) with the mixin's own hook run first."""

    @functools.wraps(user_hook)
    def wrapped(self: MultiTaskMixin, first: Any, *args: Any, **kwargs: Any) -> Any:
        getattr(MultiTaskMixin, hook)(self, first)
        return user_hook(self, first, *args, **kwargs)

    wrapped._mtl_wrapped = True  # type: ignore[attr-defined]
    return wrapped


def _checked_settings(tasks: Sequence[str], engine: str, gramian: GramianConfig | Mapping[str, Any] | None,
                      max_skipped_steps: int | None) -> tuple[list[str], GramianConfig | None]:
    """``configure_multitask``'s arguments checked: the task names as a list, the Gramian engine's config."""
    tasks = list(tasks)
    if len(tasks) < 2:
        raise ValueError(f"multi-task training needs at least 2 tasks, got {tasks}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    if max_skipped_steps is not None and (not isinstance(max_skipped_steps, int) or max_skipped_steps < 0):
        raise ValueError(f"max_skipped_steps must be None or an int >= 0, got {max_skipped_steps!r}")
    if engine not in ("auto", "gramian", "jacobian"):
        raise ValueError(f"engine must be 'auto', 'gramian' or 'jacobian', got {engine!r}")
    config = GramianConfig(**gramian) if isinstance(gramian, Mapping) else gramian
    if config is not None and not isinstance(config, GramianConfig):
        raise TypeError(f"gramian must be a GramianConfig or a mapping of its fields, got {type(gramian).__name__}")
    return tasks, config
