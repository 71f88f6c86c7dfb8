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


# The prior sigmas the kernels' float32 constants hold: 1 / (2 prior_sigma^2) overflows below about 5e-20, and
# sigma / prior_sigma underflows for a large prior sigma.
PRIOR_SIGMA_RANGE = (1e-18, 1e18)


def check_prior_sigma(value) -> float:
    """``value`` as a float; TypeError if it is not a real number, ValueError outside ``PRIOR_SIGMA_RANGE``."""
    value = check_positive_float("prior_sigma", value)
    low, high = PRIOR_SIGMA_RANGE
    if not low <= value <= high:
        raise ValueError(f"prior_sigma must be in [{low:g}, {high:g}] (the KL's float32 constants), got {value:g}")
    return value
