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
no allowed assignment lies in [floor, budget]. ``Problem`` and the limit checks live in
``hawq.bit_problem``; ``solve`` and ``pareto_frontier`` check the limits once, then run the
solvers. Private to allocation: import the public names from ``hawq.allocate``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pulp
import pyarrow as pa

from hawq.bit_problem import (
    BOPS_RTOL,
    InfeasibleAllocation,
    Problem,
    check_feasible,
    expand_units,
    no_point_in_window,
    weight_bit_budget,
    weight_bit_floor,
)

logger = logging.getLogger(__name__)

METHODS = ("v1", "ilp")
MAX_ENUMERATION = 1_000_000
__all__ = [
    "METHODS",
    "PARETO_SCHEMA",
    "InfeasibleAllocation",
    "Problem",
    "check_feasible",
    "expand_units",
    "pareto_frontier",
    "solve",
    "solve_ilp",
    "solve_v1",
    "v1_order",
    "weight_bit_budget",
    "weight_bit_floor",
]


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
            raise no_point_in_window(problem, floor, budget, "ilp")
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
            raise no_point_in_window(problem, floor, budget or 0, "v1")
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
            raise no_point_in_window(problem, floor, budget or 0, "v1")
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
