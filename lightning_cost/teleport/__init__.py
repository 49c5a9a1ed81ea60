"""COST's teleport in parts: when (trigger, schedule), how (the exact rescaling in :mod:`.symmetry`, the
paper's LoRA move in :mod:`.lora`, and the null / random-move controls), after (state transfer), records."""

from lightning_cost.teleport.attempt import attempt_teleport
from lightning_cost.teleport.callback import SymmetryTeleportCallback
from lightning_cost.teleport.controls import CONTROLS, DropSteps, ResetState, build_control
from lightning_cost.teleport.evaluation import DROPOUT_LAYERS, Snapshot, TaskLossEvaluator, keep_buffers
from lightning_cost.teleport.htr import apply_htr, htr_sigma
from lightning_cost.teleport.loop import Teleport, teleport_once
from lightning_cost.teleport.lora import (
    LoRAConfig,
    LoRATeleporter,
    TeleportAdapter,
    balance_ratios,
    loss_invariance,
    sample_sphere,
    sharpness,
)
from lightning_cost.teleport.null import NullConfig, NullTeleporter
from lightning_cost.teleport.random_move import RandomMove, RandomMoveConfig
from lightning_cost.teleport.records import GradientStats, TeleportLog, TeleportRecord
from lightning_cost.teleport.registry import TELEPORTERS, build_teleporter, teleporter_class
from lightning_cost.teleport.schedule import TeleportSchedule
from lightning_cost.teleport.symmetry import (
    NoSymmetryError,
    RescaleConfig,
    RescaleSymmetry,
    RescaleTeleporter,
    ScaleGroup,
)
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem, TeleportRejected
from lightning_cost.teleport.transfer import TRANSFERS, StateTransfer, reset_step_count
from lightning_cost.teleport.trigger import (
    ConflictTrigger,
    TriggerResult,
    conflict_cosines,
    conflict_cosines_from_gram,
)

__all__ = [
    "CONTROLS",
    "DropSteps",
    "ResetState",
    "build_control",
    "DROPOUT_LAYERS",
    "TELEPORTERS",
    "TRANSFERS",
    "ConflictTrigger",
    "GradientStats",
    "LoRAConfig",
    "LoRATeleporter",
    "Move",
    "NoSymmetryError",
    "NullConfig",
    "NullTeleporter",
    "RandomMove",
    "RandomMoveConfig",
    "RescaleConfig",
    "RescaleSymmetry",
    "RescaleTeleporter",
    "ScaleGroup",
    "Snapshot",
    "StateTransfer",
    "SymmetryTeleportCallback",
    "TaskLossEvaluator",
    "Teleport",
    "TeleportAdapter",
    "TeleportLog",
    "TeleportProblem",
    "TeleportRecord",
    "TeleportRejected",
    "TeleportSchedule",
    "Teleporter",
    "TriggerResult",
    "apply_htr",
    "attempt_teleport",
    "balance_ratios",
    "build_teleporter",
    "conflict_cosines",
    "conflict_cosines_from_gram",
    "htr_sigma",
    "keep_buffers",
    "loss_invariance",
    "reset_step_count",
    "sample_sphere",
    "sharpness",
    "teleport_once",
    "teleporter_class",
]
