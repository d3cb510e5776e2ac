"""Bit-allocation solvers on plain numbers: the HAWQ v1 monotone rule and the exact ILP.

Blocks i = 1..n with n_i quantized weights choose a weight bit width b_i; tied blocks form
one unit, a pinned unit has one allowed width. With Omega_i(b) from ``hawq.omega``::

    minimise   sum_i Omega_i(b_i)
    subject to floor <= sum_i n_i b_i <= budget        (weight bits; from a size limit)
               sum_i MACs_i * b_i * a <= BOPs limit    (a: activation bits; optional)

``solve_ilp``: binary x_{u,b}, one width per unit, solved exactly by CBC (PuLP).
``solve_v1`` (HAWQ v1): free units sorted by S descending get non-increasing widths; the
C(m+k-1, k-1) monotone sequences are enumerated through prefix sums (beyond
``MAX_ENUMERATION`` the same restricted problem goes to the ILP with order constraints).
The optional ``floor`` = ceil((1 - size_tolerance) budget) makes every method land at the
target size from below (same-size comparisons of allocations); ``InfeasibleAllocation`` when
no allowed assignment lies in [floor, budget]. ``check_feasible`` turns the limits into the
weight-bit budget and raises
``InfeasibleAllocation`` (with the smallest feasible size) when they are too low; ``solve`` and
``pareto_frontier`` check once, then run the solvers. Private to allocation: import the public
names from ``hawq.allocate``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pulp
import pyarrow as pa

from hawq.omega import BlockRecord
from hawq.size import MB

logger = logging.getLogger(__name__)

METHODS = ("v1", "ilp")
MAX_ENUMERATION = 1_000_000
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


def _no_point_in_window(
    problem: Problem, floor: int, budget: int, how: str
) -> InfeasibleAllocation:
    lo, hi = ((problem.fixed_bytes + w / 8) / BYTES_PER_MB for w in (floor, budget))
    low = problem.min_bits()
    return InfeasibleAllocation(
        f"{how}: no allowed assignment has a size in [{lo:.6g}, {hi:.6g}] MB ({floor}.."
        f"{budget} weight bits); raise size_tolerance or change the size limit.",
        min_size_mb=problem.size_mb(low),
        max_compression=problem.compression(low),
        min_bops=problem.bops(low) or 0.0,
    )


def _unit_arrays(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit and bit column: total Omega, weight bits, BOPs (zeros without MACs)."""
    bits = np.array(problem.bits, dtype=np.int64)
    cost, wbits, bops = (np.zeros((len(problem.units), len(bits))) for _ in range(3))
    wbits = wbits.astype(np.int64)
    for u, members in enumerate(problem.units):
        m = list(members)
        cost[u] = problem.omega[m].sum(axis=0)
        wbits[u] = int(problem.n_weights[m].sum()) * bits
        if problem.macs is not None:
            bops[u] = problem.macs[m].sum() * bits * problem.act_bits
    return cost, wbits, bops


def expand_units(problem: Problem, unit_choice: Sequence[int]) -> np.ndarray:
    """Bits per block from one width per unit."""
    out = np.zeros(len(problem.records), dtype=np.int64)
    for members, b in zip(problem.units, unit_choice, strict=True):
        out[list(members)] = b
    return out


def _cbc(
    problem: Problem,
    budget: int | None,
    bops_limit: float | None,
    monotone: Sequence[int],
    floor: int | None = None,
) -> np.ndarray | None:
    """CBC's optimum; None if the constraints are infeasible."""
    cost, wbits, bops = _unit_arrays(problem)
    scale = float(cost.max()) or 1.0
    lp = pulp.LpProblem("hawq_bits", pulp.LpMinimize)
    x = {
        (u, b): lp.add_variable(f"x_{u}_{b}", cat=pulp.LpBinary)
        for u, allowed in enumerate(problem.unit_bits)
        for b in allowed
    }
    col = {b: j for j, b in enumerate(problem.bits)}
    lp += pulp.lpSum(cost[u, col[b]] / scale * v for (u, b), v in x.items())
    for u, allowed in enumerate(problem.unit_bits):
        lp += pulp.lpSum(x[u, b] for b in allowed) == 1
    used = pulp.lpSum(int(wbits[u, col[b]]) * v for (u, b), v in x.items())
    if budget is not None:
        lp += used <= budget
    if floor is not None:
        lp += used >= floor
    if bops_limit is not None:
        lp += pulp.lpSum(bops[u, col[b]] / bops_limit * v for (u, b), v in x.items()) <= 1
    for u, v in itertools.pairwise(monotone):
        lp += pulp.lpSum(b * x[u, b] for b in problem.unit_bits[u]) >= pulp.lpSum(
            b * x[v, b] for b in problem.unit_bits[v]
        )
    with warnings.catch_warnings():  # the bundled CBC is the one solver shipped offline
        warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, gapRel=0.0)
    status = lp.solve(solver)
    if pulp.LpStatus[status] == "Infeasible":
        return None
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC did not find an optimal allocation: {pulp.LpStatus[status]}")
    choice = [
        max(problem.unit_bits[u], key=lambda b, u=u: x[u, b].value() or 0.0)
        for u in range(len(problem.units))
    ]
    return expand_units(problem, choice)


def solve_ilp(
    problem: Problem,
    budget: int | None,
    bops_limit: float | None = None,
    *,
    monotone: Sequence[int] = (),
    floor: int | None = None,
) -> np.ndarray:
    """Exact minimiser of total Omega under the limits (CBC); bits per block.

    ``monotone`` lists units whose widths must be non-increasing in that sequence; ``floor``
    is the fewest weight bits allowed. CBC's feasibility tolerance may admit a point a hair
    over a limit; the limit is then tightened by the excess and the problem solved again.
    The limits must be feasible (``check_feasible``); an empty [floor, budget] window raises
    ``InfeasibleAllocation``.
    """
    b_eff, o_eff, f_eff = budget, bops_limit, floor
    for _ in range(4):
        out = _cbc(problem, b_eff, o_eff, monotone, f_eff)
        if out is None and floor is None:
            raise RuntimeError("CBC found the allocation problem infeasible")
        if out is None:
            raise _no_point_in_window(problem, floor, budget, "ilp")
        used = problem.weight_bits(out)
        ok_size = budget is None or used <= budget
        ok_floor = floor is None or used >= floor
        ok_bops = bops_limit is None or problem.bops(out) <= bops_limit * (1 + BOPS_RTOL)
        if ok_size and ok_bops and ok_floor:
            return out
        if not ok_size:
            b_eff -= used - budget
        if not ok_floor:
            f_eff += floor - used
        if not ok_bops:
            o_eff -= problem.bops(out) - bops_limit
        logger.debug("CBC point over the limits; re-solving with tighter limits")
    raise RuntimeError("CBC kept returning assignments over the limits")


def v1_order(problem: Problem) -> list[int]:
    """Free (unpinned) units by S descending (stable); a unit's S is the n-weighted mean."""
    n = np.array([r.n_params for r in problem.records], dtype=np.float64)
    free = [u for u, b in enumerate(problem.unit_bits) if len(b) > 1]
    key = {}
    for u in free:
        m = list(problem.units[u])
        key[u] = float((problem.sensitivity[m] * n[m]).sum() / n[m].sum())
    return sorted(free, key=lambda u: -key[u])


def solve_v1(
    problem: Problem,
    budget: int | None,
    bops_limit: float | None = None,
    *,
    floor: int | None = None,
) -> np.ndarray:
    """HAWQ v1: the least-Omega assignment whose bits are non-increasing in S; bits per block.

    The limits must be feasible (``check_feasible``); with ``floor``, only sequences with at
    least that many weight bits count (``InfeasibleAllocation`` if there is none).
    """
    order = v1_order(problem)
    cand = sorted({b for u in order for b in problem.unit_bits[u]}, reverse=True)
    m, k = len(order), len(cand)
    n_seq = math.comb(m + k - 1, k - 1) if m else 1
    if n_seq > MAX_ENUMERATION:
        logger.info("v1: %d monotone sequences; solving the restricted ILP instead", n_seq)
        return solve_ilp(problem, budget, bops_limit, monotone=order, floor=floor)
    cost, wbits, bops = _unit_arrays(problem)
    choice = [b[0] if len(b) == 1 else 0 for b in problem.unit_bits]
    if m == 0:
        out = expand_units(problem, choice)
        if floor is not None and problem.weight_bits(out) < floor:
            raise _no_point_in_window(problem, floor, budget or 0, "v1")
        return out
    cols = [problem.bits.index(b) for b in cand]
    fixed = [u for u in range(len(problem.units)) if u not in set(order)]
    fcol = [problem.bits.index(choice[u]) for u in fixed]

    def prefix(a: np.ndarray) -> tuple[np.ndarray, float]:
        p = np.vstack([np.zeros((1, k), a.dtype), np.cumsum(a[np.ix_(order, cols)], axis=0)])
        return p, a[fixed, fcol].sum() if fixed else 0

    (pc, fc), (pw, fw), (pb, fb) = prefix(cost), prefix(wbits), prefix(bops)
    cuts = np.array(
        list(itertools.combinations_with_replacement(range(m + 1), k - 1)), dtype=np.int64
    ).reshape(-1, k - 1)
    bounds = np.hstack([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), m)])

    def total(p: np.ndarray) -> np.ndarray:
        return sum(p[bounds[:, j + 1], j] - p[bounds[:, j], j] for j in range(k))

    tc, tw, tb = total(pc) + fc, total(pw) + fw, total(pb) + fb
    ok = np.ones(len(cuts), dtype=bool)
    if budget is not None:
        ok &= tw <= budget
    if bops_limit is not None:
        ok &= tb <= bops_limit * (1 + BOPS_RTOL)
    if floor is not None:
        ok &= tw >= floor
        if not ok.any():
            raise _no_point_in_window(problem, floor, budget or 0, "v1")
    best = np.flatnonzero(ok)[np.lexsort((tw[ok], tc[ok]))[0]]
    for j in range(k):
        for u in order[bounds[best, j] : bounds[best, j + 1]]:
            choice[u] = cand[j]
    return expand_units(problem, choice)


def solve(
    problem: Problem,
    *,
    method: str = "ilp",
    size_limit_mb: float | None = None,
    compression: float | None = None,
    bops_limit: float | None = None,
    size_tolerance: float | None = None,
) -> np.ndarray:
    """Bits per block by ``method`` ("v1" or "ilp") under the given limits (checked first);
    with ``size_tolerance`` t the weight bits lie in [ceil((1 - t) budget), budget]."""
    solver = _solver(method)
    budget = check_feasible(
        problem,
        size_limit_mb=size_limit_mb,
        compression=compression,
        bops_limit=bops_limit,
        size_tolerance=size_tolerance,
    )
    return solver(problem, budget, bops_limit, floor=weight_bit_floor(budget, size_tolerance))


def _solver(method: str) -> Callable[..., np.ndarray]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return solve_ilp if method == "ilp" else solve_v1


PARETO_SCHEMA = pa.schema(
    [
        ("limit_mb", pa.float64()),
        ("size_mb", pa.float64()),
        ("compression", pa.float64()),
        ("total_omega", pa.float64()),
        ("bits", pa.list_(pa.int64())),
        ("pareto", pa.bool_()),
    ]
)


def pareto_frontier(
    problem: Problem,
    *,
    method: str = "ilp",
    bops_limit: float | None = None,
    limits_mb: Sequence[float] | None = None,
    n_points: int = 16,
) -> pa.Table:
    """Allocate at each size limit (default: ``n_points`` evenly from the smallest to the
    largest achievable size); one row per limit, ``bits`` in block order (block names in the
    schema metadata ``blocks``), ``pareto`` = no other row has <= size and <= Omega with
    one of them strictly smaller. ``bops_limit`` applies to every point."""
    if limits_mb is None:
        if n_points < 2:
            raise ValueError(f"n_points must be >= 2, got {n_points}")
        lo, hi = problem.size_mb(problem.min_bits()), problem.size_mb(problem.max_bits())
        limits_mb = np.linspace(lo, hi, n_points)
    limits = [float(x) for x in limits_mb]
    if not limits:
        raise ValueError("limits_mb must not be empty")
    solver = _solver(method)
    check_feasible(problem, size_limit_mb=min(limits), bops_limit=bops_limit)
    rows = []
    for lim in limits:  # feasible at the smallest limit: feasible at every one
        bits = solver(problem, weight_bit_budget(problem, size_limit_mb=lim), bops_limit)
        row = (problem.size_mb(bits), problem.compression(bits), problem.total_omega(bits))
        rows.append((lim, *row, bits.tolist()))
    size = np.array([r[1] for r in rows])
    om = np.array([r[3] for r in rows])
    dominated = [
        bool(((size <= s) & (om <= o) & ((size < s) | (om < o))).any())
        for s, o in zip(size, om, strict=True)
    ]
    cols = list(zip(*rows, strict=True))
    meta = {"blocks": json.dumps(problem.blocks), "method": method}
    return pa.table(
        {
            "limit_mb": cols[0],
            "size_mb": cols[1],
            "compression": cols[2],
            "total_omega": cols[3],
            "bits": cols[4],
            "pareto": [not d for d in dominated],
        },
        schema=PARETO_SCHEMA.with_metadata(meta),
    )
