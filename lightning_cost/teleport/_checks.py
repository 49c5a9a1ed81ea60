"""Argument checks shared by the teleport's settings objects: one clear message per bad argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_cost._precision import AUTO

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "check_tolerance"]


def check_int(name: str, value: Any, minimum: int | None = None, optional: bool = False) -> None:
    """An integer (not a bool, not a float with an integer value) of at least ``minimum``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an integer or None" if optional else "an integer"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_float(name: str, value: Any, minimum: float | None = None, positive: bool = False,
                maximum: float | None = None, optional: bool = False, allow_inf: bool = False) -> None:
    """A finite real number (``+-inf`` too if ``allow_inf``), ``> 0`` if ``positive``, within ``[minimum, maximum]``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if math.isnan(value) or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_tolerance(name: str, value: Any, allow_inf: bool = False) -> None:
    """``"auto"`` (follow the precision of the computation checked) or a real number ``>= 0``."""
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{name} must be 'auto' or a real number >= 0, got {value!r}")
        return
    check_float(name, value, minimum=0.0, allow_inf=allow_inf)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
