"""COST runs that provably never act, derived from their base run instead of trained.

A COST run with paired seeds starts from its base run's initialisation and sees the same batches; the
callback changes nothing until its first teleport attempt (it reads the step's per-task gradients,
which a Gramian or Jacobian method computes anyway). So where the base run's recorded trigger series
shows that the variant would make no attempt (its rule never fires on a checked step after its
warm-up, and its schedule forces none), the COST run *is* the base run, bit for bit, and its record is
the base's with no teleports and ``derived_from`` naming the base record. ``tests/test_runner.py``
trains such a run and checks it against the derived one.

Derivation is refused (the run is trained) when anything could make the two differ: a forced
schedule (``every``), a trigger on the representation, a method that would compute per-task
gradients only because the callback asks (a loss weighting), a base record without the series, or
settings other than the COST variant's that differ from the base's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["COST_KEYS", "first_attempt", "derived_record"]

#: keys of a run's cache key that only a COST run has or that differ from its base run's
COST_KEYS = ("cost", "cost_spec", "lora")


def _trigger_rule(spec: Mapping[str, Any]) -> str | None:
    """The rule the variant's trigger applies to the parameters' gradients, or ``None`` (not derivable)."""
    trigger = spec.get("trigger", "majority")
    if isinstance(trigger, str):
        return trigger
    if isinstance(trigger, Mapping) and trigger.get("on", "parameters") == "parameters":
        return str(trigger.get("rule", "majority"))
    return None


def first_attempt(base: Mapping[str, Any], spec: Mapping[str, Any]) -> int | None | bool:
    """The first step at which the variant ``spec`` would attempt a teleport in the ``base`` run,
    ``None`` if it never would, ``False`` if the record cannot tell."""
    schedule = dict(spec.get("schedule") or {})
    rule, fired = _trigger_rule(spec), base.get("fired_steps")
    if rule is None or fired is None or rule not in fired or schedule.get("every", 0):
        return False
    if not schedule.get("on_trigger", True):
        return None
    total = base.get("total_steps")
    fraction = float(schedule.get("warmup_fraction", 0.0))
    if fraction and not (isinstance(total, (int, float)) and math.isfinite(total)):
        return False
    check_every = int(schedule.get("check_every", 1))
    for step, epoch in fired[rule]:
        if epoch < int(schedule.get("warmup_epochs", 0)) or step < int(schedule.get("warmup_steps", 0)):
            continue
        if (fraction and step < fraction * total) or step % check_every:
            continue
        return int(step)
    return None


def derived_record(base: Mapping[str, Any] | None, key: Mapping[str, Any], base_key: Mapping[str, Any],
                   base_file: str, needs_gradients: bool) -> dict[str, Any] | None:
    """The COST run's record from its finished ``base`` run when the variant provably never acts
    there (see the module docstring), else ``None``."""
    spec = key.get("cost_spec")
    if base is None or spec is None or not needs_gradients:
        return None
    if {k: v for k, v in key.items() if k not in COST_KEYS} != {k: v for k, v in base_key.items() if k not in COST_KEYS}:
        return None
    if base.get("config", {}).get("cost") != "none" or first_attempt(base, spec) is not None:
        return None
    out = {k: v for k, v in base.items() if k not in ("config", "config_hash", "cost", "control_of")}
    out.update(teleports=0, rejected_teleports=0, teleports_before_best=0, teleport_seconds=0.0,
               teleport_history=[], derived_from=base_file)
    return out
