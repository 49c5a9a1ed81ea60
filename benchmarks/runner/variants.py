"""COST variants: named presets of :class:`~lightning_cost.SymmetryTeleportCallback` arguments.

A config names its presets (``cost_variants``) and picks the ones to run (``cost``)::

    cost_variants:
      paper: {}                                   # the callback's defaults: eq. 4 trigger, LoRA, HTR
      authors: {trigger: any, schedule: {warmup_fraction: 0.25, max_per_epoch: 1},
                teleporter: {name: lora, inner_steps: 100}, transfer: restart_if_opposed}
      rescale: {trigger: any, schedule: {warmup_fraction: 0.25, max_per_epoch: 1},
                teleporter: {name: rescale, objective: conflict}}
    cost: [none, paper, authors]

``none`` is the base method without a callback. ``cost_kw`` holds arguments shared by every preset
(a preset's own values win, dicts merged key by key). The paper's Table 4 ablation is a set of
presets too: ``{teleporter: {use_lt: true, use_lg: false}, transfer: keep}`` and so on.

A claim that a variant helps needs its *matched control*: the same callback (trigger, schedule,
state transfer, every other argument) with the ``null`` teleporter, which never moves the weights,
so the control is exactly the dropped step and the optimizer-state change at the same kind of steps.
A preset ``control_of: <variant>`` is that control (:func:`matched_control` of the named variant's
spec); any other key of the preset is merged over it::

    cost_variants:
      lora: {schedule: {every: 50, on_trigger: false}, teleporter: {name: lora, inner_steps: 20}}
      lora_control: {control_of: lora}          # the same, teleporter {name: null}, transfer htr
    cost: [none, lora, lora_control]

:func:`cost_spec` keeps ``control_of`` in the control's spec (so a reader of a run can pair it with its
variant); :func:`build_teleport` drops it before building the callback.

:func:`build_teleport` is the one place a spec becomes a callback; :func:`teleport_records` the one
place the callback's history is read.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["CONTROL_OF", "DEFAULT_COST_VARIANTS", "deep_merge", "parse_cost", "cost_spec", "matched_control",
           "build_teleport", "teleport_records", "teleport_counts"]

#: the preset key that makes a variant the matched control of another
CONTROL_OF = "control_of"

#: presets available without a config (a config's ``cost_variants`` add to and override them)
DEFAULT_COST_VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "authors": {"trigger": "any", "schedule": {"warmup_fraction": 0.25, "max_per_epoch": 1},
                "teleporter": {"name": "lora", "inner_steps": 100}, "transfer": "restart_if_opposed"},
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
    """The callback arguments of ``variant`` (``cost_kw`` under the preset), or ``None`` for ``none``.

    A preset with ``control_of: <name>`` is :func:`matched_control` of ``<name>``'s spec with the preset's
    other keys merged over it; ``control_of`` stays in the result.
    """
    if variant == "none":
        return None
    preset = dict(variants[variant])
    if CONTROL_OF not in preset:
        return deep_merge(cost_kw, preset)
    of = preset.pop(CONTROL_OF)
    if not isinstance(of, str) or of == "none" or of not in variants:
        raise ValueError(f"COST variant {variant!r}: control_of must name another preset, got {of!r}; "
                         f"presets: {', '.join(variants)}")
    if of == variant or CONTROL_OF in variants[of]:
        raise ValueError(f"COST variant {variant!r}: control_of names {of!r}, which is itself a control (or the "
                         "variant itself); name the teleporting variant")
    return {**deep_merge(matched_control(cost_spec(of, cost_kw, variants)), preset), CONTROL_OF: of}


def matched_control(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The matched control of a COST variant's ``spec``: the same arguments, teleporter ``{"name": "null"}``.

    The transfer is pinned to the one the variant runs: its own ``transfer``, else its teleporter's
    default (``lora``: ``htr``, ``rescale``: ``transport``), so the control changes the optimizer state
    as the variant does (:mod:`lightning_cost.teleport.null` for what each transfer does without a move).
    """
    from lightning_cost.teleport import Teleporter, teleporter_class

    if "control" in spec:
        raise ValueError(f"a callback control ({spec['control']!r}) has no matched control; give a COST variant's spec")
    out = {k: copy.deepcopy(v) for k, v in spec.items() if k not in (CONTROL_OF, "teleporter")}
    teleporter = spec.get("teleporter", "lora")
    if out.get("transfer") is None:
        if isinstance(teleporter, Teleporter):
            out["transfer"] = teleporter.default_transfer
        else:
            name = teleporter if isinstance(teleporter, str) else teleporter.get("name", "lora")
            out["transfer"] = teleporter_class(name).default_transfer
    out["teleporter"] = {"name": "null"}
    return out


def build_teleport(spec: Mapping[str, Any], seed: int) -> Any:
    """The teleport callback of a COST variant's ``spec`` (:func:`cost_spec`), seeded with ``seed``.

    ``spec`` holds :class:`~lightning_cost.SymmetryTeleportCallback`'s arguments (``teleporter``,
    ``trigger``, ``schedule``, ``transfer``, ``teleport_batches``, ...); the callback validates them.
    The control teleporters are teleporters of the library's registry (``{"name": "null"}``,
    ``{"name": "random_move", "relative_size": ...}``); ``control_of`` is dropped. Two callback controls
    (:mod:`lightning_cost.teleport.controls`) are presets too: ``{"control": "drop_step"}`` or ``"reset_state"`` at
    the steps ``schedule.every`` forces.
    """
    from lightning_cost import SymmetryTeleportCallback

    if "control" in spec:
        from lightning_cost.teleport.controls import build_control

        return build_control(spec["control"], every=int(spec.get("schedule", {}).get("every", 0)))
    args = {k: v for k, v in spec.items() if k != CONTROL_OF}
    return SymmetryTeleportCallback(**{**args, "seed": seed})


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
