"""lightning-cost: COST symmetry teleportation and multi-task aggregators for PyTorch Lightning."""

__version__ = "0.1.0"
