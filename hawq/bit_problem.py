"""The allocation problem on plain numbers and its limits (private to allocation).

``Problem`` holds, per block i, Omega_i(b) over the bit widths, the quantized weight count n_i,
MACs and the bit-independent bytes F; size(b) = F + sum_i n_i b_i / 8 bytes. A size limit or
compression becomes a budget B on sum_i n_i b_i (``weight_bit_budget``); ``size_tolerance`` t
adds the floor ceil((1 - t) B) (``weight_bit_floor``). ``check_feasible`` raises
``InfeasibleAllocation`` with the smallest achievable size when no assignment meets the limits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hawq.omega import BlockRecord
from hawq.size import MB

BOPS_RTOL = 1e-9
BYTES_PER_MB = MB


class InfeasibleAllocation(ValueError):
    """No assignment meets the limits; ``min_size_mb``/``max_compression``/``min_bops`` tell
    the smallest achievable values (all blocks at their lowest allowed bits)."""

    def __init__(self, msg: str, *, min_size_mb: float, max_compression: float, min_bops: float):
        super().__init__(msg)
        self.min_size_mb = min_size_mb
        self.max_compression = max_compression
        self.min_bops = min_bops


@dataclass(frozen=True, kw_only=True)
class Problem:
    """The numbers an allocation needs; ``omega[i, j]`` is block i at ``bits[j]``.

    ``units`` partitions block indices into tie groups; ``unit_bits`` lists each unit's
    allowed bit widths (one for a pinned unit).
    """

    records: tuple[BlockRecord, ...]
    bits: tuple[int, ...]
    omega: np.ndarray
    n_weights: np.ndarray
    macs: np.ndarray | None
    fixed_bytes: float
    act_bits: int
    sensitivity: np.ndarray
    units: tuple[tuple[int, ...], ...]
    unit_bits: tuple[tuple[int, ...], ...]

    @property
    def blocks(self) -> list[str]:
        return [r.block for r in self.records]

    def weight_bits(self, bits: np.ndarray) -> int:
        """sum_i n_i b_i."""
        return int(np.dot(self.n_weights, np.asarray(bits, dtype=np.int64)))

    def size_mb(self, bits: np.ndarray) -> float:
        return (self.fixed_bytes + self.weight_bits(bits) / 8) / BYTES_PER_MB

    def compression(self, bits: np.ndarray) -> float:
        return 32 * int(self.n_weights.sum()) / self.weight_bits(bits)

    def bops(self, bits: np.ndarray) -> float | None:
        if self.macs is None:
            return None
        return float(np.dot(self.macs, np.asarray(bits, dtype=np.float64)) * self.act_bits)

    def total_omega(self, bits: np.ndarray) -> float:
        cols = [self.bits.index(int(b)) for b in bits]
        return float(self.omega[np.arange(len(cols)), cols].sum())

    def min_bits(self) -> np.ndarray:
        """Every unit at its lowest allowed width (the smallest size and BOPs)."""
        return expand_units(self, [min(b) for b in self.unit_bits])

    def max_bits(self) -> np.ndarray:
        """Every unit at its highest allowed width."""
        return expand_units(self, [max(b) for b in self.unit_bits])


def weight_bit_budget(
    problem: Problem, *, size_limit_mb: float | None = None, compression: float | None = None
) -> int | None:
    """The limit on sum_i n_i b_i implied by a size limit (MB) or a compression ratio."""
    if size_limit_mb is not None and compression is not None:
        raise ValueError("give at most one of size_limit_mb and compression, not both")
    if size_limit_mb is not None:
        budget = (size_limit_mb * BYTES_PER_MB - problem.fixed_bytes) * 8
    elif compression is not None:
        budget = 32 * float(problem.n_weights.sum()) / compression
    else:
        return None
    return math.floor(budget * (1 + 1e-12))


def check_feasible(
    problem: Problem,
    *,
    size_limit_mb: float | None = None,
    compression: float | None = None,
    bops_limit: float | None = None,
    size_tolerance: float | None = None,
) -> int | None:
    """The weight-bit budget of the limits; ``InfeasibleAllocation`` if no assignment meets them
    (with ``size_tolerance``: also if even the largest assignment is under the floor).

    The error states the smallest feasible size (and BOPs) and the fix. All units at their
    lowest allowed bits minimise both size and BOPs, so that point is feasible iff any
    assignment is.
    """
    budget = weight_bit_budget(problem, size_limit_mb=size_limit_mb, compression=compression)
    low = problem.min_bits()
    min_mb, max_c, min_bops = problem.size_mb(low), problem.compression(low), problem.bops(low)
    if bops_limit is not None and min_bops is None:
        raise ValueError("bops_limit needs per-block MACs: pass example_input (or macs)")
    pins = {
        problem.records[u[0]].block: b[0]
        for u, b in zip(problem.units, problem.unit_bits, strict=True)
        if len(b) == 1
    }
    free = [min(b) for b in problem.unit_bits if len(b) > 1]
    lowest = f"its lowest candidate bits ({min(free)})" if free else "its pinned bits"
    how = f"with every block at {lowest} and pinned blocks {pins}"
    fix = "add a smaller candidate bit width or remove pins"
    common = dict(min_size_mb=min_mb, max_compression=max_c, min_bops=min_bops or 0.0)
    if budget is not None and problem.weight_bits(low) > budget:
        target = f"compression {compression}x" if size_limit_mb is None else f"{size_limit_mb} MB"
        raise InfeasibleAllocation(
            f"size limit {target} is infeasible: the smallest model these settings allow is "
            f"{min_mb:.6g} MB (weight compression {max_c:.4g}x) {how}. Raise size_limit_mb to "
            f">= {min_mb:.6g} (or lower compression to <= {max_c:.4g}), or {fix}.",
            **common,
        )
    if bops_limit is not None and min_bops > bops_limit * (1 + BOPS_RTOL):
        raise InfeasibleAllocation(
            f"bops_limit {bops_limit:.6g} is infeasible: the fewest BOPs these settings allow "
            f"is {min_bops:.6g} {how} (size {min_mb:.6g} MB). Raise bops_limit to >= "
            f"{min_bops:.6g}, lower act_bits, or {fix}.",
            **common,
        )
    floor = weight_bit_floor(budget, size_tolerance)
    if floor is not None and problem.weight_bits(problem.max_bits()) < floor:
        big = problem.size_mb(problem.max_bits())
        raise InfeasibleAllocation(
            f"size_tolerance {size_tolerance}: even the largest model these settings allow "
            f"({big:.6g} MB) is more than {size_tolerance:.1%} under the size limit; raise "
            f"the compression, lower the size limit, or drop size_tolerance.",
            **common,
        )
    return budget


def weight_bit_floor(budget: int | None, size_tolerance: float | None) -> int | None:
    """ceil((1 - size_tolerance) budget): the fewest weight bits an allocation may use."""
    if size_tolerance is None:
        return None
    if budget is None:
        raise ValueError("size_tolerance needs a size limit (size_limit_mb or compression)")
    return math.ceil(budget * (1 - size_tolerance) * (1 - 1e-12))


def no_point_in_window(problem: Problem, floor: int, budget: int, how: str) -> InfeasibleAllocation:
    lo, hi = ((problem.fixed_bytes + w / 8) / BYTES_PER_MB for w in (floor, budget))
    low = problem.min_bits()
    return InfeasibleAllocation(
        f"{how}: no allowed assignment has a size in [{lo:.6g}, {hi:.6g}] MB ({floor}.."
        f"{budget} weight bits); raise size_tolerance or change the size limit.",
        min_size_mb=problem.size_mb(low),
        max_compression=problem.compression(low),
        min_bops=problem.bops(low) or 0.0,
    )


def expand_units(problem: Problem, unit_choice: Sequence[int]) -> np.ndarray:
    """Bits per block from one width per unit."""
    out = np.zeros(len(problem.records), dtype=np.int64)
    for members, b in zip(problem.units, unit_choice, strict=True):
        out[list(members)] = b
    return out
