"""Base classes shared by every multi-task method.

Two families, as in the paper's Sec. 5 list of baselines:

* :class:`Aggregator`: a method that acts on the per-task gradients of the shared
  parameters. It maps the ``K x P`` Jacobian ``J`` (row ``i`` is ``g_i``) to one
  update direction ``d`` of length ``P`` via :meth:`Aggregator.aggregate`, usable
  outside Lightning.
* :class:`GramianAggregator`: an aggregator whose update is a linear combination
  ``d = J^T w`` of the task gradients, with ``w`` a function of the Gramian
  ``G = J J^T`` only (:meth:`GramianAggregator.weights`). The ``K x K`` Gramian is
  all the solver ever sees, so the solve costs the same for any ``P``.
* :class:`LossWeighting`: a method that only re-weights the task losses
  (LS, SI, RLW, DWA, UW, FAMO). It needs no Jacobian: the training objective is
  :meth:`LossWeighting.forward` of the ``K`` losses and one ordinary backward
  gives every gradient.

Every method is an ``nn.Module`` so that its state (DWA's loss history, FAMO's
logits, UW's log-variances) travels with the LightningModule's checkpoint.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

__all__ = [
    "AggregationError",
    "Aggregator",
    "GramianAggregator",
    "LossWeighting",
    "check_jacobian",
    "check_jacobian_shape",
    "check_losses",
    "check_positive_losses",
    "gramian",
]


class AggregationError(RuntimeError):
    """A method could not produce an update (e.g. its solver failed).

    Raised instead of silently falling back to equal weights. The multi-task
    mixin catches it, logs a warning and skips the optimizer step.
    """


#: Columns per block of :func:`gramian`: each block's products are summed in one BLAS call, blocks
#: are added in float32/64. Measured on this project's CPU (K = 10, P = 11.2M, float32): one
#: ``J @ J.T`` took 350-435 ms with a relative error of 2.5e-3 on ``||g_i||^2`` (the BLAS sums the
#: 11M products in one long chain); 65536-column blocks took 180 ms with 1.4e-6.
GRAMIAN_BLOCK = 65536


def gramian(jacobian: Tensor, block: int = GRAMIAN_BLOCK) -> Tensor:
    """``G = J J^T`` (``K x K``, at least float32), summed over blocks of ``block`` columns.

    Blocking keeps the long sums over ``P`` short, so ``G`` keeps float32 accuracy at any ``P``
    (and it is faster on CPU); for ``P <= block`` it is one matrix product.
    """
    j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
    p = j.shape[1]
    if p <= block:
        return j @ j.T
    out = torch.zeros((j.shape[0], j.shape[0]), dtype=j.dtype, device=j.device)
    for start in range(0, p, block):
        x = j[:, start : start + block]
        out.addmm_(x, x.T)
    return out


def check_jacobian_shape(jacobian: Tensor) -> None:
    """Validate the type and shape of a ``K x P`` Jacobian (2-D, ``K >= 2``, ``P >= 1``) without
    reading its entries."""
    if not isinstance(jacobian, Tensor):
        raise TypeError(f"jacobian must be a torch.Tensor, got {type(jacobian).__name__}")
    if jacobian.ndim != 2:
        raise ValueError(f"jacobian must have shape [K, P] (one row per task), got shape {tuple(jacobian.shape)}")
    k, p = jacobian.shape
    if k < 2:
        raise ValueError(f"multi-task aggregation needs at least 2 tasks, got K={k}")
    if p < 1:
        raise ValueError("jacobian has no columns (P=0): there are no shared parameters")


def check_jacobian(jacobian: Tensor) -> None:
    """Validate a ``K x P`` Jacobian: 2-D, ``K >= 2``, ``P >= 1``, finite (one pass over ``J``)."""
    check_jacobian_shape(jacobian)
    if not torch.isfinite(jacobian).all():
        bad = (~torch.isfinite(jacobian)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"jacobian has non-finite entries in the rows of tasks {bad}")


def check_losses(losses: Tensor) -> None:
    """Validate a vector of ``K >= 2`` finite task losses."""
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if losses.ndim != 1:
        raise ValueError(f"losses must have shape [K], got shape {tuple(losses.shape)}")
    if losses.shape[0] < 2:
        raise ValueError(f"multi-task weighting needs at least 2 tasks, got K={losses.shape[0]}")
    # K is small: K Python floats are tested faster than a torch.isfinite kernel plus its .all()
    if not all(map(math.isfinite, losses.detach().tolist())):
        raise ValueError(f"losses must be finite, got {losses.detach().tolist()}")


def check_positive_losses(losses: Tensor, method: str, why: str) -> None:
    """:func:`check_losses`, and every loss strictly positive (``method`` takes ``why``)."""
    check_losses(losses)
    values = losses.detach().tolist()
    bad = [i for i, v in enumerate(values) if not v > 0]
    if bad:
        raise ValueError(f"{method} needs strictly positive losses ({why}); tasks {bad} have losses "
                         f"{[values[i] for i in bad]}")


_gramian = gramian  # for methods whose argument is named ``gramian``


class Aggregator(nn.Module, ABC):
    """A method that maps the per-task gradients ``J`` (``K x P``) to one direction."""

    #: Whether the training core must compute the per-task Jacobian for this method.
    requires_jacobian: bool = True
    #: Whether the method reads the task losses (GradNorm, DB-MTL, MoCo): the multi-task core then
    #: calls :meth:`observe_losses` before each aggregation, and hands it all ``K`` rows of ``J``
    #: (zero rows included) so that its per-task state stays aligned with the tasks.
    uses_losses: bool = False

    @abstractmethod
    def aggregate(self, jacobian: Tensor) -> Tensor:
        """Return the update direction (length ``P``) for the Jacobian ``[K, P]``."""

    def observe_losses(self, losses: Tensor) -> None:
        """Called by the multi-task core once per aggregated optimizer step, before :meth:`aggregate`
        (or :meth:`GramianAggregator.weights`), with the ``K`` globally averaged, detached task losses.

        The default does nothing; a method with ``uses_losses = True`` keeps them for the next
        aggregation (a direct caller of :meth:`aggregate` must call this first).
        """

    def forward(self, jacobian: Tensor) -> Tensor:
        return self.aggregate(jacobian)


class GramianAggregator(Aggregator):
    """An aggregator with ``d = J^T w`` and ``w = weights(J J^T)``.

    :meth:`aggregate` reads ``J`` twice: once for ``G = J J^T`` (:func:`gramian`, in ``J``'s dtype,
    at least float32; skipped when the caller passes ``G``) and once for ``J^T w``. It does not scan ``J`` for non-finite
    entries separately: a NaN or infinity in row ``i`` makes ``G_ii`` (a sum of squares) NaN or
    infinite, so ``J`` is finite whenever ``G`` is, and only a non-finite ``G`` sends ``J``
    through :func:`check_jacobian` (which then names the rows). Built-in methods reject a
    non-finite ``G`` inside :meth:`weights` (class attribute ``validates_gramian = True``); for
    any other subclass :meth:`aggregate` checks ``G`` before calling :meth:`weights`.
    """

    #: Whether :meth:`weights` itself raises ``ValueError`` for a non-finite Gramian.
    validates_gramian: bool = False

    @abstractmethod
    def weights(self, gramian: Tensor) -> Tensor:
        """Return the ``K`` task weights from the ``K x K`` Gramian ``G = J J^T``."""

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        """``J^T weights(G)``. ``gramian``, if given, must be ``J J^T`` (at least float32): the
        multi-task core passes the one it already computed, saving a ``K x K x P`` product."""
        check_jacobian_shape(jacobian)
        # at least float32 for the K x K Gramian: half-precision inner products lose the solve
        j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
        if gramian is None:
            gramian = _gramian(j)
        elif gramian.shape != (j.shape[0], j.shape[0]):
            raise ValueError(f"gramian must have shape {(j.shape[0], j.shape[0])}, got {tuple(gramian.shape)}")
        if not self.validates_gramian and not bool(torch.isfinite(gramian).all()):
            check_jacobian(jacobian)  # raises for a non-finite J; a finite J whose G overflowed goes on
        try:
            w = self.weights(gramian)
        except ValueError:
            if not bool(torch.isfinite(gramian).all()):
                check_jacobian(jacobian)  # a non-finite J: say so, naming its rows
            raise
        return (w.to(j.dtype) @ j).to(jacobian.dtype)


class LossWeighting(nn.Module, ABC):
    """A method that scalarises the ``K`` task losses; it needs no Jacobian."""

    requires_jacobian: bool = False

    @abstractmethod
    def forward(self, losses: Tensor) -> Tensor:
        """Return the scalar training objective for the ``K`` task losses."""

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d objective / d L_k`` at ``losses`` (detached): the weight each task's gradient gets.

        This default differentiates :meth:`forward` with autograd; the built-in methods override
        it with the closed form of the same derivative (no graph, a few small kernels).
        """
        x = losses.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (w,) = torch.autograd.grad(self.forward(x), x)
        return w.detach()

    def observe(self, losses: Tensor) -> None:
        """Called once per optimizer step with the (globally averaged, detached) task losses.

        Stateful methods (FAMO) update their state here; the default does nothing.
        """

    def on_epoch_end(self) -> None:
        """Called at the end of each training epoch (DWA uses it); the default does nothing."""
