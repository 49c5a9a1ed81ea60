"""COST variants: named presets of :class:`~lightning_cost.SymmetryTeleportCallback` arguments.

A config names its presets (``cost_variants``) and picks the ones to run (``cost``)::

    cost_variants:
      paper: {}                                   # the callback's defaults: eq. 4 trigger, LoRA, HTR
      authors: {trigger: any, schedule: {warmup_fraction: 0.25, max_per_epoch: 1},
                teleporter: {name: lora, inner_steps: 100}}
      rescale: {trigger: any, schedule: {warmup_fraction: 0.25, max_per_epoch: 1},
                teleporter: {name: rescale, objective: conflict}}
    cost: [none, paper, authors]

``none`` is the base method without a callback. ``cost_kw`` holds arguments shared by every preset
(a preset's own values win, dicts merged key by key). The paper's Table 4 ablation is a set of
presets too: ``{teleporter: {use_lt: true, use_lg: false}, transfer: keep}`` and so on.

:func:`build_teleport` is the one place a spec becomes a callback; :func:`teleport_records` the one
place the callback's history is read.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DEFAULT_COST_VARIANTS", "deep_merge", "parse_cost", "cost_spec", "build_teleport", "teleport_records",
           "teleport_counts"]

#: presets available without a config (a config's ``cost_variants`` add to and override them)
DEFAULT_COST_VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "authors": {"trigger": "any", "schedule": {"warmup_fraction": 0.25, "max_per_epoch": 1},
                "teleporter": {"name": "lora", "inner_steps": 100}},
    "rescale": {"trigger": "any", "schedule": {"warmup_fraction": 0.25, "max_per_epoch": 1},
                "teleporter": {"name": "rescale", "objective": "conflict"}},
}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``; where both hold a dict under a key, the dicts are merged the same way."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def parse_cost(values: Sequence[Any] | str, variants: Mapping[str, Any]) -> list[str]:
    """Variant names from ``--cost`` (comma- or space-separated), in order, without repeats.

    ``none`` is always known; any other name must be a preset of ``variants``. YAML reads a bare
    ``on``/``off`` as a boolean: that is refused with the list of presets rather than guessed.
    """
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for v in items:
        if isinstance(v, bool):
            raise ValueError(f"COST variant {v!r}: YAML reads a bare on/off as a boolean; name a preset: "
                             f"none, {', '.join(variants)}")
        for name in (s.strip().lower() for s in str(v).split(",")):
            if not name or name in out:
                continue
            if name != "none" and name not in variants:
                raise ValueError(f"unknown COST variant {name!r}; presets: none, {', '.join(variants)} "
                                 "(add one under cost_variants)")
            out.append(name)
    return out


def cost_spec(variant: str, cost_kw: Mapping[str, Any], variants: Mapping[str, Any]) -> dict[str, Any] | None:
    """The callback arguments of ``variant`` (``cost_kw`` under the preset), or ``None`` for ``none``."""
    if variant == "none":
        return None
    return deep_merge(cost_kw, variants[variant])


def build_teleport(spec: Mapping[str, Any], seed: int) -> Any:
    """The teleport callback of a COST variant's ``spec`` (:func:`cost_spec`), seeded with ``seed``.

    ``spec`` holds :class:`~lightning_cost.SymmetryTeleportCallback`'s arguments (``teleporter``,
    ``trigger``, ``schedule``, ``transfer``, ``teleport_batches``, ...); the callback validates them.
    Two kinds of ablation control (:mod:`benchmarks.controls`) are presets too: ``{"control": "drop_step"}``
    or ``"reset_state"`` at the steps ``schedule.every`` forces, and the teleporter
    ``{"name": "random_move", "relative_size": ...}``.
    """
    from lightning_cost import SymmetryTeleportCallback

    if "control" in spec:
        from benchmarks.controls import build_control

        return build_control(spec["control"], every=int(spec.get("schedule", {}).get("every", 0)))
    teleporter = spec.get("teleporter")
    if isinstance(teleporter, Mapping) and teleporter.get("name") == "random_move":
        from benchmarks.controls import RandomMove, RandomMoveConfig

        settings = {k: v for k, v in teleporter.items() if k != "name"}
        spec = {**spec, "teleporter": RandomMove(RandomMoveConfig(**settings))}
    return SymmetryTeleportCallback(**{**spec, "seed": seed})


def teleport_records(callback: Any, start: int = 0) -> list[dict[str, Any]]:
    """The callback's teleport history from record ``start`` on as plain dicts (``TeleportRecord``
    dataclasses, nested ``before`` / ``after`` gradient statistics included); a control keeps none."""
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
            for r in getattr(callback, "history", [])[start:]]


def teleport_counts(callback: Any) -> tuple[int, int]:
    """``(accepted, rejected)`` teleports of a finished run (a control: the steps it acted on, 0)."""
    if not hasattr(callback, "num_teleports"):
        return int(callback.count), 0
    return int(callback.num_teleports), int(callback.num_rejected)
