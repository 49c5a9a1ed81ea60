"""The floating-point precision a computation ran in, and tolerances that follow it.

Under mixed precision (``precision="bf16-mixed"`` / ``"16-mixed"``) the forward runs inside
``torch.autocast``: matmuls and convolutions round their outputs to the autocast dtype, whatever the
dtype of the weights. A check that compares two results of such a computation must then allow for
that dtype's rounding, not float32's; :func:`rounding_tolerance` gives the larger of a check's own
tolerance and a number of units of the dtype's resolution ``torch.finfo(dtype).eps``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["AUTO", "autocast_dtype", "coarsest", "rounding_tolerance"]

#: the value of a tolerance setting that follows the precision of the computation it checks
AUTO = "auto"


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type`` here and now, ``None`` if it is off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        try:
            return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        except RuntimeError:  # a device type autocast does not know ("meta"): it cannot be on there
            return None
    legacy: Any = torch  # torch < 2.4: one function pair per device type
    if device_type == "cpu":
        return legacy.get_autocast_cpu_dtype() if legacy.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return legacy.get_autocast_gpu_dtype() if legacy.is_autocast_enabled() else None
    return None


def coarsest(dtypes: Iterable[torch.dtype | None]) -> torch.dtype:
    """The floating dtype with the largest ``eps`` among ``dtypes`` (others and ``None`` ignored);
    ``torch.float32`` if there is none."""
    floats = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps, default=torch.float32)


def rounding_tolerance(floor: float, dtype: torch.dtype, units: float) -> float:
    """``max(floor, units * eps(dtype))``: ``floor`` wherever ``dtype`` resolves finer than it (float32,
    float64), else ``units`` steps of the dtype's relative resolution (bfloat16, float16)."""
    return max(floor, units * torch.finfo(dtype).eps)
