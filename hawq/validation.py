"""Validators of user-given values: bit widths, bounded numbers, integers, seeds.

Each raises :class:`InvalidValue` (a ``ValueError``) whose message names the field first:
``"{name}: {value!r} must be ..."``; ``problem`` holds the text after the name, so a caller
with its own error type (the pipeline's ``ConfigError``) can re-raise it at its key path.
Each returns the value (as ``int``/``float``) when it is valid.
"""

from __future__ import annotations

import math

FLOAT_BITS = 32
"""A layer kept in floating point (no quantization)."""
INT_BITS = tuple(range(2, 9))
VALID_BITS = (*INT_BITS, FLOAT_BITS)
SEED_LIMIT = 2**63
"""Seeds are integers in ``0 .. SEED_LIMIT - 1`` (what ``torch.Generator.manual_seed`` takes)."""

__all__ = [
    "FLOAT_BITS",
    "INT_BITS",
    "SEED_LIMIT",
    "VALID_BITS",
    "InvalidValue",
    "check_bits",
    "check_clip_bits",
    "check_int",
    "check_number",
    "check_percentile",
    "check_seed",
]


class InvalidValue(ValueError):
    """A value outside its allowed set: ``str(exc) == f"{name}: {problem}"``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.name, self.problem))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bits(name: str, bits: object) -> int:
    """``bits`` must be an integer in 2..8, or 32 (float)."""
    if not _is_int(bits):
        raise InvalidValue(name, f"{bits!r} must be an integer in 2..8 (or 32 for float)")
    if bits not in VALID_BITS:
        raise InvalidValue(name, f"{bits!r} is outside 2..8 (use 32 to keep a layer in float)")
    return int(bits)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    if low is not None and high is not None:
        return f"in {lo}{low:g}, {high:g}{hi}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` must be a finite real number within ``[low, high]`` (``*_open``: excluded).

    Example: ``check_number("lr", lr, low=0, low_open=True)`` -> ``"lr: 0 must be > 0"``.
    """
    bounds = _bounds(low, high, low_open, high_open)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise InvalidValue(name, f"{value!r} must be a finite number {bounds}".rstrip())
    if low is not None and (value <= low if low_open else value < low):
        raise InvalidValue(name, f"{value!r} must be {bounds}")
    if high is not None and (value >= high if high_open else value > high):
        raise InvalidValue(name, f"{value!r} must be {bounds}")
    return float(value)


def check_int(name: str, value: object, *, low: int = 0) -> int:
    """``value`` must be an ``int`` (not a ``bool``) ``>= low``."""
    if not _is_int(value) or value < low:
        raise InvalidValue(name, f"{value!r} must be an integer >= {low}")
    return int(value)


def check_seed(name: str, value: object) -> int:
    """``value`` must be an integer seed in ``0 .. 2**63 - 1``."""
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise InvalidValue(name, f"{value!r} must be in 0 .. 2**63 - 1 (an integer)")
    return int(value)


def check_percentile(name: str, value: object) -> float | None:
    """A clipping percentile of ``|w|`` in ``(0, 100]``, or ``None`` (clip at ``max|w|``)."""
    if value is None:
        return None
    return check_number(name, value, low=0, high=100, low_open=True)


def check_clip_bits(name: str, value: object) -> int | None:
    """Clip weights only at bit widths ``<= value`` (an integer in 2..8), or ``None`` (all)."""
    if value is None:
        return None
    if not _is_int(value) or value not in INT_BITS:
        raise InvalidValue(name, f"{value!r} must be an integer in 2..8 or null (clip at all bits)")
    return int(value)
