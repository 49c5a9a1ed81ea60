"""Task losses over the labels a batch has: missing labels are masked, and a task with none stays in the graph.

Multi-task tables often lack labels (an assay not run on a molecule, an attribute not annotated). A
missing label is ``NaN`` in a float target, or any negative value in an integer class target. The loss of
a task is averaged over its present labels only. A batch with no label at all for a task gives
``(logits * 0).sum()``: zero, with a path to the parameters, so that the per-task Jacobian the
aggregators and the teleport trigger read has a zero row for it instead of raising.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSS_KINDS", "LossKind", "masked_loss", "present_labels", "squeeze_column"]

LossKind = Literal["multiclass", "binary", "regression"]
LOSS_KINDS = ("multiclass", "binary", "regression")


def present_labels(target: Tensor, kind: LossKind) -> Tensor:
    """The boolean mask of the present labels: not ``NaN`` (float targets) and ``>= 0`` (class targets)."""
    _check_kind(kind)
    if kind != "multiclass":
        target = squeeze_column(target)
    if target.is_floating_point():
        mask = ~torch.isnan(target)
        if kind == "multiclass":
            mask = mask & (target >= 0)
        return mask
    return target >= 0


def masked_loss(logits: Tensor, target: Tensor, kind: LossKind, *,
                regression_loss: Literal["mse", "l1"] = "mse") -> Tensor:
    """One task's loss averaged over its present labels.

    Args:
        logits: ``[B, C]`` class scores (``multiclass``), else ``[B]`` or ``[B, 1]``.
        target: ``[B]`` (or ``[B, 1]``) labels, ``NaN`` or negative where missing.
        kind: cross-entropy (``multiclass``), binary cross-entropy with logits (``binary``), or
            ``regression_loss`` (``regression``: mean squared or absolute error).

    Returns:
        A 0-dim tensor; ``(logits * 0).sum()`` when no label is present.
    """
    _check_kind(kind)
    if regression_loss not in ("mse", "l1", "mae"):
        raise ValueError(f"unknown regression_loss {regression_loss!r} (use 'mse' or 'l1')")
    if kind == "multiclass":
        if logits.dim() != 2:
            raise ValueError(f"multiclass logits must be [B, C], got shape {tuple(logits.shape)}")
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
    else:
        logits, target = squeeze_column(logits), squeeze_column(target)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: logits {logits.shape[0]}, target {target.shape[0]}")
    mask = present_labels(target, kind)
    if not bool(mask.any()):
        return (logits * 0).sum()
    lg, tg = logits[mask], target[mask]
    if kind == "multiclass":
        return F.cross_entropy(lg, tg.long())
    tg = tg.to(lg.dtype)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(lg, tg)
    return F.mse_loss(lg, tg) if regression_loss == "mse" else F.l1_loss(lg, tg)


def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")


def squeeze_column(x: Tensor) -> Tensor:
    """A one-output task's ``[B, 1]`` as ``[B]`` (``[B]`` unchanged); a clear error for any other shape."""
    if x.dim() == 2 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 1:
        raise ValueError(f"expected a [B] or [B, 1] tensor, got shape {tuple(x.shape)}")
    return x
