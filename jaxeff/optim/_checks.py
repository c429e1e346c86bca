"""Validation of optimizer hyperparameters that is safe under ``optax.inject_hyperparams``.

``inject_hyperparams`` calls the optimizer factory again inside every (jitted) ``update`` with
its numeric hyperparameters as traced scalars, so a Python ``if`` on them raises
``TracerBoolConversionError``. These checks look only at concrete values (Python numbers,
numpy scalars and 0-d arrays, concrete ``jax.Array`` scalars) and let tracers, schedules and
other callables through unchecked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def concrete_scalar(value: Any) -> float | None:
    """``float(value)`` for a concrete real scalar; None for tracers, callables and the rest."""
    if isinstance(value, bool) or callable(value) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        if np.issubdtype(np.asarray(value).dtype, np.complexfloating):
            return None
        return float(value)
    return None


def check_range(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ``ValueError`` if ``value`` is concrete and outside the interval (NaN included).

    The interval is ``[low, high]`` with the ends excluded by ``low_open`` / ``high_open``;
    None leaves that side unbounded.
    """
    v = concrete_scalar(value)
    if v is None:
        return
    ok = not math.isnan(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{owner}: {name} must be in {lo}, {hi}, got {value!r}")


def is_concrete_zero(value: Any) -> bool:
    """True only for a concrete scalar equal to 0 (a traced value may be anything)."""
    return concrete_scalar(value) == 0.0
