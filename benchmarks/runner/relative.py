"""A warm-up relative to convergence: COST acts while the run is still open.

The paper's schedule (eq. 4 from the first step) and the authors' (from 1/4 of the epoch cap) are
fixed in steps. On a small set the base run's best validation epoch can come well before 1/4 of the
cap, so a teleport after it cannot change the checkpoint that is tested. A preset's schedule may
instead say ``warmup_of_base_best: f`` (``0 <= f < 1``): no teleport before the fraction ``f`` of the
steps that the paired base run (same method and seed, no COST) took to reach its selected checkpoint.
The runner resolves it per seed into ``warmup_steps`` from the base run's record, so the base must
be finished first (it comes first in every grid).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["RELATIVE_KEY", "needs_base", "resolve_warmup"]

RELATIVE_KEY = "warmup_of_base_best"


def needs_base(spec: Mapping[str, Any] | None) -> bool:
    """Whether the preset's warm-up is relative to its base run's best checkpoint."""
    return bool(spec) and RELATIVE_KEY in (spec.get("schedule") or {})  # type: ignore[union-attr]


def resolve_warmup(spec: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """``spec`` with ``warmup_of_base_best`` replaced by ``warmup_steps`` from the ``base`` record:
    ``floor(f x (best_epoch + 1) x steps per epoch)`` (the checkpoint is taken at an epoch's end)."""
    out = copy.deepcopy(dict(spec))
    schedule = dict(out.get("schedule") or {})
    f = schedule.pop(RELATIVE_KEY)
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f < 1):
        raise ValueError(f"schedule.{RELATIVE_KEY} must be a number in [0, 1), got {f!r}")
    if base is None:
        raise ValueError(f"schedule.{RELATIVE_KEY} needs the finished base run (same method and seed, cost none); "
                         "run the grid with cost 'none' first")
    total, epochs = base.get("total_steps"), base.get("config", {}).get("epochs")
    best = base.get("best_epoch", -1)
    if not isinstance(total, (int, float)) or not math.isfinite(total) or not epochs or best < 0:
        raise ValueError(f"the base run's record has no step count or best epoch for schedule.{RELATIVE_KEY}: "
                         "rerun the base with this version of the runner")
    per_epoch = total / epochs
    schedule["warmup_steps"] = max(int(schedule.get("warmup_steps", 0)), math.floor(f * (best + 1) * per_epoch))
    out["schedule"] = schedule
    return out
