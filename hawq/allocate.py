"""Hessian-aware bit allocation: the HAWQ v1 rule, the ILP (PuLP/CBC), the Pareto frontier.

Blocks i (rows of the ``hawq.hessian.table`` table) with n_i quantized weights get weight bits
b_i from a candidate set, minimising sum_i Omega_i(b_i), Omega_i(b) = s_i ||Q_b(W_i) - W_i||^2
(s_i = lambda_i for ``sensitivity="eigenvalue"``, Tr(H_i)/n_i for ``"trace"``; see
``hawq.omega``), subject to limits on size and BOPs; ties and pins restrict the choice.

Size model: size(b) = F + sum_i n_i b_i / 8 bytes, where n_i counts the Conv/Linear
``weight`` elements of block i and F the float32 bytes that do not depend on the bits
(biases, BN, scales, unquantized layers), taken from ``hawq.size``. MB = 2^20 bytes.
Weight compression counts the blocks' weights only: 32 sum_i n_i / sum_i n_i b_i.
BOPs of block i at b bits: MACs_i * b * act_bits (summed over the blocks); a module whose input
runs at other bits (``input_act_bits`` for the network's first layer, ``last_act_bits`` for the
last) counts its MACs scaled by a_m / act_bits, so the totals stay exact.

This module is the one entry point of allocation: it re-exports the public names of the
solvers (``Problem``, ``InfeasibleAllocation``, ``check_feasible``, ``weight_bit_budget``,
``pareto_frontier``, ``PARETO_SCHEMA``) from the private ``hawq.bit_solvers`` and of the result
table (``ALLOCATION_SCHEMA``, ``to_bit_config``) from ``hawq.bit_table``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from hawq.bit_solvers import (
    METHODS,
    PARETO_SCHEMA,
    InfeasibleAllocation,
    Problem,
    check_feasible,
    expand_units,
    pareto_frontier,
    solve,
    weight_bit_budget,
)
from hawq.bit_table import ALLOCATION_SCHEMA, bits_table, to_bit_config
from hawq.omega import (
    SENSITIVITY_MODES,
    BlockRecord,
    block_records,
    block_weights,
    omega_matrix,
    sensitivity,
)
from hawq.quant.bitconfig import REGEX_PREFIX, BitConfig
from hawq.size import layer_costs, model_size_bytes
from hawq.validation import (
    INT_BITS,
    check_bits,
    check_clip_bits,
    check_number,
    check_percentile,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOCATION_SCHEMA",
    "PARETO_SCHEMA",
    "AllocConfig",
    "Allocation",
    "InfeasibleAllocation",
    "Problem",
    "allocate",
    "allocate_model",
    "build_problem",
    "check_feasible",
    "pareto_frontier",
    "problem_from_model",
    "to_bit_config",
    "weight_bit_budget",
]


@dataclass(frozen=True, kw_only=True)
class AllocConfig:
    """How to allocate bits. Give at most one of ``size_limit_mb`` and ``compression``.

    ``pins`` maps a block name, module FQN or ``"re:<regex>"`` (full match against block
    names and module FQNs, as in ``BitConfig``) to fixed bits (2..8, or 32 = float); pinning
    a module pins its whole block. ``ties`` lists groups of such names whose blocks must
    share one bit width.

    ``input_act_bits`` / ``last_act_bits``: input-activation bits of the first module of the
    first block (the network input) and of the last module of the last block (None =
    ``act_bits``); 8 by default, as the HAWQ reference code keeps them.
    ``percentile`` / ``mse_clip`` / ``clip_bits``: weight clipping, as in ``BitConfig``.
    ``size_tolerance`` t (0 < t < 1, needs a size limit or compression): the allocation's
    weight bits lie in [(1 - t) B, B] for the limit's budget B, so allocations of any method
    or sensitivity have the same size to within t (``InfeasibleAllocation`` if none does).
    """

    method: str = "ilp"
    sensitivity: str = "trace"
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    size_limit_mb: float | None = None
    compression: float | None = None
    bops_limit: float | None = None
    act_bits: int = 8
    pins: Mapping[str, int] = field(default_factory=dict)
    ties: tuple[tuple[str, ...], ...] = ()
    input_act_bits: int | None = 8
    last_act_bits: int | None = 8
    per_channel: bool = True
    percentile: float | None = None
    clip_bits: int | None = None
    mse_clip: bool = False
    size_tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ValueError(
                f"sensitivity must be one of {SENSITIVITY_MODES}, got {self.sensitivity!r}"
            )
        bits = tuple(self.candidate_bits)
        if not bits or len(set(bits)) != len(bits) or any(b not in INT_BITS for b in bits):
            raise ValueError(
                f"candidate_bits must be distinct integers in 2..8, got {self.candidate_bits!r}"
            )
        object.__setattr__(self, "candidate_bits", tuple(sorted(bits)))
        for name in ("size_limit_mb", "compression", "bops_limit"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=0, low_open=True)
        if self.size_limit_mb is not None and self.compression is not None:
            raise ValueError("give at most one of size_limit_mb and compression, not both")
        if self.size_tolerance is not None:
            tol = self.size_tolerance
            check_number("size_tolerance", tol, low=0, high=1, low_open=True, high_open=True)
            if self.size_limit_mb is None and self.compression is None:
                raise ValueError("size_tolerance needs size_limit_mb or compression")
        check_bits("act_bits", self.act_bits)
        for key, b in dict(self.pins).items():
            _check_name(key, "pins")
            check_bits(f"pins[{key!r}]", b)
        object.__setattr__(self, "pins", dict(self.pins))
        ties = tuple(tuple(g) for g in self.ties)
        for g in ties:
            if len(g) < 2:
                raise ValueError(f"each group in ties needs >= 2 names, got {g!r}")
            for name in g:
                _check_name(name, "ties")
        object.__setattr__(self, "ties", ties)
        check_percentile("percentile", self.percentile)
        check_clip_bits("clip_bits", self.clip_bits)
        for name in ("input_act_bits", "last_act_bits"):
            if getattr(self, name) is not None:
                check_bits(name, getattr(self, name))
        if not isinstance(self.mse_clip, bool):
            raise ValueError(f"mse_clip must be a bool, got {self.mse_clip!r}")
        if self.mse_clip and self.percentile is not None:
            raise ValueError("set either percentile or mse_clip (MSE-optimal clipping), not both")

    @property
    def quant_options(self) -> dict[str, object]:
        """The ``to_bit_config`` keyword arguments of this config (bits and clipping)."""
        return {
            "act_bits": self.act_bits,
            "input_act_bits": self.input_act_bits,
            "last_act_bits": self.last_act_bits,
            "per_channel": self.per_channel,
            "percentile": self.percentile,
            "clip_bits": self.clip_bits,
            "mse_clip": self.mse_clip,
        }


def _check_name(name: object, field_name: str) -> None:
    if not isinstance(name, str) or not name or name == REGEX_PREFIX:
        raise ValueError(f"{field_name} names must be non-empty strings, got {name!r}")
    if name.startswith(REGEX_PREFIX):
        try:
            re.compile(name[len(REGEX_PREFIX) :])
        except re.error as exc:
            raise ValueError(f"{field_name} name {name!r} is not a valid regex: {exc}") from exc


def _matches(key: str, block: BlockRecord) -> bool:
    if key.startswith(REGEX_PREFIX):
        pat = re.compile(key[len(REGEX_PREFIX) :])
        return bool(pat.fullmatch(block.block)) or any(pat.fullmatch(m) for m in block.modules)
    return key == block.block or key in block.modules


def _resolve(key: str, records: Sequence[BlockRecord], what: str) -> list[int]:
    hit = [i for i, r in enumerate(records) if _matches(key, r)]
    if not hit:
        raise ValueError(
            f"{what} {key!r} matches no block or module; blocks are {[r.block for r in records]}"
        )
    return hit


def build_problem(
    table: object,
    omega: np.ndarray,
    bits: Sequence[int],
    config: AllocConfig,
    *,
    n_weights: Sequence[int] | None = None,
    macs: Sequence[float] | None = None,
    fixed_bytes: float = 0.0,
) -> Problem:
    """A ``Problem`` from a sensitivity table (or records) and its Omega matrix over ``bits``.

    ``n_weights`` defaults to the table's ``n_params``; ``macs`` (per block) enable BOPs.
    """
    records = tuple(block_records(table))
    n = len(records)
    bits = tuple(int(b) for b in bits)
    omega = np.asarray(omega, dtype=np.float64)
    if omega.shape != (n, len(bits)):
        raise ValueError(f"omega must have shape (blocks, bits) = {(n, len(bits))}")
    if not np.isfinite(omega).all() or (omega < 0).any():
        raise ValueError("omega must be finite and >= 0")
    needed = set(config.candidate_bits) | set(config.pins.values())
    if not needed <= set(bits):
        raise ValueError(f"omega covers bits {bits} but candidates and pins need {sorted(needed)}")
    nw = np.array([r.n_params for r in records] if n_weights is None else n_weights, np.int64)
    if nw.shape != (n,) or (nw <= 0).any():
        raise ValueError(f"n_weights must be {n} positive integers")
    mac = None if macs is None else np.asarray(macs, dtype=np.float64)
    if mac is not None and (mac.shape != (n,) or (mac < 0).any()):
        raise ValueError(f"macs must be {n} non-negative numbers")
    if fixed_bytes < 0:
        raise ValueError(f"fixed_bytes must be >= 0, got {fixed_bytes}")

    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in config.ties:
        idx = [i for key in group for i in _resolve(key, records, "tie name")]
        for i in idx[1:]:
            parent[find(i)] = find(idx[0])
    pinned: dict[int, int] = {}
    for key, b in config.pins.items():
        for i in _resolve(key, records, "pin"):
            if pinned.get(i, b) != b:
                raise ValueError(
                    f"block {records[i].block!r} is pinned to both {pinned[i]} and {b}"
                )
            pinned[i] = b
    roots: dict[int, list[int]] = {}
    for i in range(n):
        roots.setdefault(find(i), []).append(i)
    units = tuple(tuple(m) for m in roots.values())
    unit_bits = []
    for members in units:
        pins = {pinned[i] for i in members if i in pinned}
        if len(pins) > 1:
            names = [records[i].block for i in members]
            raise ValueError(f"tied blocks {names} are pinned to different bits {sorted(pins)}")
        unit_bits.append(tuple(pins) if pins else config.candidate_bits)
    return Problem(
        records=records,
        bits=bits,
        omega=omega,
        n_weights=nw,
        macs=mac,
        fixed_bytes=float(fixed_bytes),
        act_bits=config.act_bits,
        sensitivity=sensitivity(records, config.sensitivity),
        units=units,
        unit_bits=tuple(unit_bits),
    )


def problem_from_model(
    model: nn.Module,
    table: object,
    config: AllocConfig,
    *,
    example_input: torch.Tensor | None = None,
) -> Problem:
    """Omega (over candidate and pinned bits), weight counts, MACs and fixed bytes of a model.

    ``example_input`` is needed for MACs (BOPs). The fixed bytes F are
    ``hawq.size.model_size_bytes`` (block modules at 8 bits, or 32 where pinned so, and
    ``act_bits``) minus those weights' bytes: biases, scales, activation ranges, BN, ....
    """
    records = block_records(table)
    bits = sorted(set(config.candidate_bits) | {b for b in config.pins.values() if b != 32})
    omega = omega_matrix(
        model,
        records,
        bits,
        sensitivity=config.sensitivity,
        per_channel=config.per_channel,
        percentile=config.percentile,
        clip_bits=config.clip_bits,
        mse_clip=config.mse_clip,
    )
    if any(b == 32 for b in config.pins.values()):  # float: no perturbation
        bits.append(32)
        omega = np.hstack([omega, np.zeros((len(records), 1))])
    n_weights = [sum(w.numel() for w in block_weights(model, r.modules)) for r in records]
    macs = None
    if example_input is not None:
        per_layer = {c.name: float(c.macs) for c in layer_costs(model, example_input)}
        missing = [m for r in records for m in r.modules if m not in per_layer]
        if missing:
            raise ValueError(f"hawq.size.layer_costs has no MACs for modules {missing}")
        act = _input_bits(records, config)
        macs = [sum(per_layer[m] * act.get(m, 1.0) for m in r.modules) for r in records]
    problem = build_problem(records, omega, bits, config, n_weights=n_weights, macs=macs)
    ref = expand_units(problem, [32 if b == (32,) else 8 for b in problem.unit_bits])
    ref_config = to_bit_config(bits_table(problem, ref), **config.quant_options)
    fixed = model_size_bytes(model, ref_config) - problem.weight_bits(ref) / 8
    return replace(problem, fixed_bytes=max(float(fixed), 0.0))


def _input_bits(records: Sequence[BlockRecord], config: AllocConfig) -> dict[str, float]:
    """MAC weights a_m / act_bits of the first and last module (BOPs at their own input bits)."""
    out = {}
    for m, a in ((records[0].modules[0], config.input_act_bits),
                 (records[-1].modules[-1], config.last_act_bits)):  # fmt: skip
        if a is not None:
            out[m] = a / config.act_bits
    return out


@dataclass(frozen=True)
class Allocation:
    """Bits per block (``table`` rows in table order; ``bits`` by block name), the totals,
    and the ``BitConfig`` giving every block module its bits and ``act_bits``."""

    table: pa.Table
    bits: dict[str, int]
    size_mb: float
    compression: float
    total_omega: float
    bops: float | None
    bit_config: BitConfig


def _allocation(problem: Problem, bits: np.ndarray, config: AllocConfig) -> Allocation:
    table = bits_table(problem, bits)
    return Allocation(
        table=table,
        bits=dict(zip(problem.blocks, (int(b) for b in bits), strict=True)),
        size_mb=problem.size_mb(bits),
        compression=problem.compression(bits),
        total_omega=problem.total_omega(bits),
        bops=problem.bops(bits),
        bit_config=to_bit_config(table, **config.quant_options),
    )


def allocate(problem: Problem, config: AllocConfig) -> Allocation:
    """Solve ``problem`` with ``config.method`` under the config's size/compression/BOPs."""
    bits = solve(
        problem,
        method=config.method,
        size_limit_mb=config.size_limit_mb,
        compression=config.compression,
        bops_limit=config.bops_limit,
        size_tolerance=config.size_tolerance,
    )
    out = _allocation(problem, bits, config)
    logger.info(
        "%s allocation: %.4g MB (%.3gx), total Omega %.4g, bits %s",
        config.method,
        out.size_mb,
        out.compression,
        out.total_omega,
        out.bits,
    )
    return out


def allocate_model(
    model: nn.Module,
    table: object,
    config: AllocConfig,
    *,
    example_input: torch.Tensor | None = None,
) -> Allocation:
    """``allocate(problem_from_model(model, table, config, example_input=...), config)``."""
    return allocate(problem_from_model(model, table, config, example_input=example_input), config)
