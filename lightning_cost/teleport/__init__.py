"""The pieces of COST's teleport: trigger (eqs. 3-4), objective (eqs. 7-11), adapter, HTR (eqs. 12-13)."""

from lightning_cost.teleport.adapter import TeleportAdapter
from lightning_cost.teleport.callback import SymmetryTeleportCallback
from lightning_cost.teleport.htr import apply_htr, htr_sigma
from lightning_cost.teleport.objective import balance_ratios, loss_invariance, sample_sphere, sharpness
from lightning_cost.teleport.trigger import (
    ConflictTrigger,
    TriggerResult,
    conflict_cosines,
    conflict_cosines_from_gram,
)

__all__ = [
    "ConflictTrigger",
    "SymmetryTeleportCallback",
    "TeleportAdapter",
    "TriggerResult",
    "apply_htr",
    "balance_ratios",
    "conflict_cosines",
    "conflict_cosines_from_gram",
    "htr_sigma",
    "loss_invariance",
    "sample_sphere",
    "sharpness",
]
