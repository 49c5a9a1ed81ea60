"""Teleporters by name: ``build_teleporter("lora", inner_steps=20)``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from lightning_cost.teleport.teleporter import Teleporter

__all__ = ["TELEPORTERS", "build_teleporter", "split_spec", "teleporter_class"]

#: name -> (module, teleporter class, settings class)
_REGISTRY = {
    "lora": ("lightning_cost.teleport.lora.teleporter", "LoRATeleporter", "LoRAConfig"),
    "rescale": ("lightning_cost.teleport.symmetry.rescale", "RescaleTeleporter", "RescaleConfig"),
    "null": ("lightning_cost.teleport.null", "NullTeleporter", "NullConfig"),
    "random_move": ("lightning_cost.teleport.random_move", "RandomMove", "RandomMoveConfig"),
}
TELEPORTERS = tuple(_REGISTRY)


def _entry(name: str) -> tuple[Any, str, str]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown teleporter {name!r}; available: {', '.join(TELEPORTERS)}")
    module, cls, config = _REGISTRY[name]
    return importlib.import_module(module), cls, config


def teleporter_class(name: str) -> type[Teleporter]:
    """The class registered as ``name`` (its ``default_transfer`` and ``gives_factors`` without building it)."""
    mod, cls, _ = _entry(name)
    return getattr(mod, cls)


def split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"lora"`` or ``{"name": "lora", **settings}`` as ``(name, settings)``; the name defaults to ``"lora"``."""
    if isinstance(spec, str):
        return spec, {}
    settings = dict(spec)
    return settings.pop("name", "lora"), settings


def build_teleporter(name: str, **settings: Any) -> Teleporter:
    """The teleporter registered as ``name`` with its settings object built from ``settings``."""
    mod, cls, config = _entry(name)
    return getattr(mod, cls)(getattr(mod, config)(**settings))
