"""lightning-cost: COST symmetry teleportation and multi-task aggregators for PyTorch Lightning."""

__version__ = "0.1.0"

from lightning_cost.functional import backward
from lightning_cost.gramian_engine import GramianConfig, GramianEngine
from lightning_cost.jacobian import JacobianEngine
from lightning_cost.losses import masked_loss, present_labels
from lightning_cost.mixin import MultiTaskMixin, TrainingStalledError
from lightning_cost.monitor import ConflictMonitor
from lightning_cost.protocol import MultiTaskModule, StepRecord
from lightning_cost.teleport.callback import SymmetryTeleportCallback
from lightning_cost.teleport.loop import Teleport, teleport_once

__all__ = [
    "ConflictMonitor",
    "GramianConfig",
    "GramianEngine",
    "JacobianEngine",
    "MultiTaskMixin",
    "MultiTaskModule",
    "StepRecord",
    "SymmetryTeleportCallback",
    "Teleport",
    "TrainingStalledError",
    "__version__",
    "backward",
    "masked_loss",
    "present_labels",
    "teleport_once",
]
