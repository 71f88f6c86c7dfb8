"""Argument checks shared by the ops and the integration layer: errors that name the argument and what was expected."""
from __future__ import annotations

import math
import numbers


def check_choice(name: str, value, choices) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_float(name: str, value) -> float:
    """``value`` as a float; TypeError if it is not a real number, ValueError unless positive and finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not 0 < value < math.inf:  # comparisons, not math.isfinite: they also take torch.compile's symbolic floats
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value
