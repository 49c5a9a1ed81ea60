"""Teleporters by name: ``build_teleporter("lora", inner_steps=20)``."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_cost.teleport.teleporter import Teleporter

__all__ = ["TELEPORTERS", "build_teleporter"]

#: name -> (module, teleporter class, settings class)
_REGISTRY = {
    "lora": ("lightning_cost.teleport.lora", "LoRATeleporter", "LoRAConfig"),
    "rescale": ("lightning_cost.teleport.rescale", "RescaleTeleporter", "RescaleConfig"),
}
TELEPORTERS = tuple(_REGISTRY)


def build_teleporter(name: str, **settings: Any) -> Teleporter:
    """The teleporter registered as ``name`` with its settings object built from ``settings``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown teleporter {name!r}; available: {', '.join(TELEPORTERS)}")
    module, cls, config = _REGISTRY[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls)(getattr(mod, config)(**settings))
