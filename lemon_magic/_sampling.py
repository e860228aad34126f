"""Checks of the sampling parameters the Python API and the magics take (issue 20)."""

from __future__ import annotations

import math

from lemon_magic.errors import InvalidOptions

__all__ = ("check_sampling",)


def check_sampling(temperature: object = None, top_p: object = None) -> None:
    """:raises InvalidOptions: a temperature that is not a finite number ≥ 0 (0: greedy), or a
    ``top_p`` that is not a number from 0 to 1."""
    if temperature is not None and not (_number(temperature) and temperature >= 0):  # type: ignore[operator]
        raise InvalidOptions(f"temperature must be a number ≥ 0 (0: deterministic), got {temperature!r}")
    if top_p is not None and not (_number(top_p) and 0 <= top_p <= 1):  # type: ignore[operator]
        raise InvalidOptions(f"top_p must be a number from 0 to 1, got {top_p!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
