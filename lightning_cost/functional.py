"""The multi-task update without the Trainer: :func:`backward`, called in place of ``loss.backward()``.

A plain PyTorch loop (or Lightning Fabric) gets exactly the update :class:`~lightning_cost.MultiTaskMixin`
gives under a ``Trainer`` (with ``engine="jacobian"``)::

    method = lightning_cost.aggregators.build_aggregator("upgrad")
    for x, y in loader:
        optimizer.zero_grad()
        z = model.trunk(x)
        losses = [F.mse_loss(head(z).squeeze(-1), y[:, i]) for i, head in enumerate(model.heads)]
        lightning_cost.backward(losses, shared=model.trunk.parameters(), method=method)
        optimizer.step()

It runs the mixin's own step (:class:`~lightning_cost.step.MultiTaskStep`) on the given losses: for a
gradient aggregator (or ``jacobian=True``), the ``K x P`` Jacobian of the shared parameters from a
:class:`~lightning_cost.jacobian.JacobianEngine`, the method's direction (tasks with a zero shared
gradient left out, :func:`~lightning_cost.update.aggregate_nonzero_rows`) and the backward of the
linear surrogate (:func:`~lightning_cost.update.linear_surrogate`); for a loss weighting, one ordinary
backward of the method's objective. So ``.grad`` accumulates as after ``loss.backward()`` (gradient
accumulation works), and a DDP-wrapped model's reducer averages it over ranks as under the Trainer:
the Jacobian and the losses are averaged over ranks first, so every rank computes the same direction.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_cost.aggregators import Aggregator, LossWeighting, aggregator_class, build_aggregator
from lightning_cost.jacobian import JacobianEngine, JacobianMode
from lightning_cost.protocol import StepRecord
from lightning_cost.step import MultiTaskStep

__all__ = ["backward", "is_stateful"]

#: One Jacobian engine per method instance, so that ``"auto"``'s fallback to the loop is remembered
#: across calls (a fresh engine would retry, and warn, every step).
_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[str, JacobianEngine]] = weakref.WeakKeyDictionary()


def is_stateful(method: Aggregator | LossWeighting) -> bool:
    """Whether ``method`` keeps state from one step to the next (trained parameters, a random stream,
    running statistics, observed losses): such a method must be built once and passed as an instance."""
    if any(True for _ in method.parameters()) or "_extra_state" in method.state_dict():
        return True
    if getattr(method, "uses_losses", False):
        return True
    if isinstance(method, LossWeighting):
        cls = type(method)
        return cls.observe is not LossWeighting.observe or cls.on_epoch_end is not LossWeighting.on_epoch_end
    return False


def backward(
    losses: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    shared: Iterable[Tensor],
    method: str | Aggregator | LossWeighting = "ls",
    *,
    jacobian: bool = False,
    jacobian_mode: JacobianMode = "auto",
    retain_graph: bool = False,
    **hparams: Any,
) -> StepRecord:
    """Backpropagate the multi-task update of ``losses`` into ``.grad``, in place of ``loss.backward()``.

    Args:
        losses: the ``K >= 2`` task losses: a ``[K]`` tensor, a sequence of ``K`` scalar tensors or a
            mapping ``{task name: scalar}`` (the names are used in messages).
        shared: the shared parameters (e.g. ``model.trunk.parameters()``); those that require grad are
            the columns of the Jacobian and get the method's direction. Every other tensor that
            requires grad and that the losses reach (the task heads) gets ``sum_k c_k grad L_k``:
            ``c_k = 1`` for a gradient aggregator, the method's loss weights for a loss weighting,
            as under the mixin.
        method: a registry name (``lightning_cost.aggregators.REGISTERED``, built fresh on every call
            with ``**hparams``) or a method instance. A method that keeps state across steps (FAMO, UW,
            DWA, RLW, PCGrad, GradVac, Nash-MTL, ...: see :func:`is_stateful`) must be passed as an
            instance built once, so that its state carries over between calls; its name raises
            ``ValueError``. The parameters of a method (UW's log-variances) get their gradient here
            too, so they must be in the optimizer. A loss weighting's ``on_epoch_end`` (DWA) is the
            caller's to call at the end of each epoch.
        jacobian: compute the Jacobian even for a loss weighting (``record.jacobian``; the
            coefficients of ``record.extras["weights"]`` give the same update through ``J``), as the
            mixin does when the teleport requests it.
        jacobian_mode: the :class:`~lightning_cost.jacobian.JacobianEngine`'s mode (one engine per
            method instance is kept across calls).
        retain_graph: keep the losses' graph (for a later backward through it).
        **hparams: the method's hyper-parameters, with a name only.

    Returns:
        The :class:`~lightning_cost.StepRecord` the mixin builds for this step: global losses, the
        Jacobian and direction (on the Jacobian path), ``extras["weights"]`` for a loss weighting on
        the Jacobian path, and ``skipped=True`` for a skipped step.

    A step whose losses or gradients are non-finite, or whose aggregation fails
    (:class:`~lightning_cost.aggregators.AggregationError`), is skipped as under the mixin: a warning is
    logged and, after the (zero) backward that DDP needs, the ``.grad`` of the shared parameters, of the
    others the losses reach and of the method's parameters is set to ``None``, so that
    ``optimizer.step()`` leaves them untouched (gradients accumulated before this call are dropped too).
    Unlike the mixin, no run of skipped steps raises :class:`~lightning_cost.TrainingStalledError`:
    check ``record.skipped``. Not supported: fp16 loss scaling (a ``GradScaler``; bf16 is fine),
    strategies that need ``fabric.backward`` (DeepSpeed, FSDP) and the Gramian engine.
    """
    losses_vec, parts, names = _stack_losses(losses)
    method_obj, shared_trainable = _method(method, losses_vec.shape[0], hparams), _trainable_shared(shared)
    shared_ids, method_params = {id(p) for p in shared_trainable}, list(method_obj.parameters())
    others = _check_graph(losses_vec, parts, names, shared_ids, shared_ids | {id(p) for p in method_params})
    step = _FunctionalStep(method_obj, names, shared_trainable, others, _engine(method_obj, jacobian_mode))
    record = step.run(losses_vec, exact=method_obj.requires_jacobian or jacobian, retain_graph=retain_graph)
    if step.drops_grads:  # a skipped step: the optimizer must leave these weights untouched
        for p in [*shared_trainable, *others, *method_params]:
            p.grad = None
    return record


def _trainable_shared(shared: Iterable[Tensor]) -> list[Tensor]:
    """The shared tensors that require grad; a clear error for an empty or non-tensor ``shared``."""
    shared_list = [p for p in shared]
    if not shared_list:
        raise ValueError("no shared parameters were given")
    for p in shared_list:
        if not isinstance(p, Tensor):
            raise TypeError(f"shared must be an iterable of tensors (parameters), got a {type(p).__name__}")
    shared_trainable = [p for p in shared_list if p.requires_grad]
    if not shared_trainable:
        raise ValueError("no shared parameter requires grad: nothing to aggregate")
    return shared_trainable


class _FunctionalStep(MultiTaskStep):
    """The mixin's step logic over given parameters, outside any module or Trainer."""

    def __init__(self, method: Aggregator | LossWeighting, names: list[str], shared: list[Tensor],
                 others: list[Tensor], engine: JacobianEngine) -> None:
        self.task_names = names
        self.mtl_method = method
        self.mtl_step = None
        self.mtl_skipped_steps = 0
        self.mtl_jacobian_engine = engine
        self._mtl_engine = "jacobian"
        self._mtl_gram_captured = False
        self._mtl_max_skipped = 0  # no state across calls: the caller reads record.skipped
        self._mtl_skip_run = 0
        self._mtl_drop_grads = False
        self._shared, self._others = shared, others

    def shared_parameters(self) -> list[nn.Parameter]:
        return self._shared  # type: ignore[return-value]

    def parameters(self) -> list[Tensor]:
        """The tensors ``_mtl_trainable_split`` splits into shared and others."""
        return [*self._shared, *self._others]

    def _mtl_trainer(self) -> Any:
        return None

    def run(self, losses: Tensor, *, exact: bool, retain_graph: bool) -> StepRecord:
        """The mixin's step on ``losses``, backpropagated into ``.grad``: through the Jacobian when ``exact``
        (a gradient aggregator, or a loss weighting whose Jacobian was asked for), else the weighted sum."""
        if exact:
            out = self._mtl_exact_step(losses, (), retain=retain_graph)
        else:
            out = self._mtl_weighting_step(losses)
        assert out is not None
        out.backward(retain_graph=retain_graph)
        assert self.mtl_step is not None
        return self.mtl_step

    @property
    def drops_grads(self) -> bool:
        """Whether the step was skipped, so that no weight may move."""
        return self._mtl_drop_grads


def _stack_losses(losses: Tensor | Sequence[Tensor] | Mapping[str, Tensor]
                  ) -> tuple[Tensor, list[Tensor] | None, list[str]]:
    """The ``[K]`` losses as the mixin stacks them (float), the K scalars when given separately, the names."""
    if isinstance(losses, Mapping):
        names = [str(n) for n in losses]
        values: Sequence[Any] = list(losses.values())
    elif isinstance(losses, Tensor):
        if losses.ndim != 1:
            raise ValueError(f"losses must be a [K] tensor of task losses, got shape {tuple(losses.shape)}")
        names, values = [f"task {i}" for i in range(losses.shape[0])], []
    elif isinstance(losses, Sequence):
        values = list(losses)
        names = [f"task {i}" for i in range(len(values))]
    else:
        raise TypeError(f"losses must be a [K] tensor, a sequence or a mapping of scalar losses, got "
                        f"{type(losses).__name__}")
    if len(names) < 2:
        raise ValueError(f"multi-task training needs at least 2 task losses, got {len(names)}")
    if isinstance(losses, Tensor):
        return losses.float(), None, names
    for name, v in zip(names, values, strict=True):
        if not isinstance(v, Tensor) or v.numel() != 1:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"the loss of {name} must be a scalar tensor, got {shape}")
    parts = [v.reshape(()).float() for v in values]
    return torch.stack(parts), parts, names


def _method(method: str | Aggregator | LossWeighting, k: int, hparams: dict[str, Any]) -> Aggregator | LossWeighting:
    if isinstance(method, str):
        try:
            cls = aggregator_class(method)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
        if "num_tasks" in inspect.signature(cls).parameters:
            hparams.setdefault("num_tasks", k)
        built = build_aggregator(method, **hparams)
        if is_stateful(built):
            raise ValueError(
                f"method {method!r} ({type(built).__name__}) keeps state across steps, which a name rebuilt on "
                f"every call would lose: build it once, method = lightning_cost.aggregators.build_aggregator("
                f"{method!r}), pass that instance on every call (and add its parameters, if any, to the optimizer)")
        return built
    if hparams:
        raise ValueError("hyper-parameters can only be given with a method name")
    if not isinstance(method, (Aggregator, LossWeighting)):
        raise TypeError(f"method must be a name, an Aggregator or a LossWeighting, got {type(method).__name__}")
    return method


def _engine(method: nn.Module, mode: JacobianMode) -> JacobianEngine:
    engines = _ENGINES.setdefault(method, {})
    if mode not in engines:
        engines[mode] = JacobianEngine(mode)
    return engines[mode]


def _check_graph(losses: Tensor, parts: list[Tensor] | None, names: list[str], shared_ids: set[int],
                 excluded: set[int]) -> list[Tensor]:
    """Check that every task loss reaches a shared parameter; return the other tensors that require
    grad and that the losses reach (the leaves of their graph), in a fixed order."""
    if losses.grad_fn is None:
        raise ValueError("the losses do not require grad: compute them from the model's parameters, "
                         "outside torch.no_grad()")
    roots: list[Any]
    if parts is not None:
        roots = [p.grad_fn for p in parts]
    elif type(losses.grad_fn).__name__ == "StackBackward0" and len(losses.grad_fn.next_functions) == len(names):
        roots = [node for node, _ in losses.grad_fn.next_functions]  # torch.stack of the K losses: each task's graph
    else:
        roots = []  # one [K] graph: whether each task reaches the shared parameters cannot be told apart
    for name, root in zip(names, roots, strict=False):
        if root is None or not _reaches(root, shared_ids):
            raise ValueError(f"the loss of {name} is not connected to the shared parameters (no gradient path "
                             "from it to any shared parameter that requires grad)")
    others: dict[int, Tensor] = {}
    found_shared = False
    for var in _leaves(losses.grad_fn):
        if id(var) in shared_ids:
            found_shared = True
        elif id(var) not in excluded and var.requires_grad:
            others.setdefault(id(var), var)
    if not found_shared:
        raise ValueError("the losses are not connected to the shared parameters (no gradient path from them to "
                         "any shared parameter that requires grad)")
    return list(others.values())


def _reaches(root: Any, targets: set[int]) -> bool:
    """Whether the autograd graph below ``root`` accumulates into one of the ``targets`` (by id)."""
    return any(id(var) in targets for var in _leaves(root))


def _leaves(root: Any) -> Iterator[Tensor]:
    """The tensors the autograd graph below ``root`` accumulates into (each node visited once)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            yield var
        stack.extend(n for n, _ in node.next_functions)
