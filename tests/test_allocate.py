"""Bit allocation against brute force over every assignment (<= 8 blocks, 3 widths)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from hawq import bit_solvers
from hawq.allocate import (
    AllocConfig,
    InfeasibleAllocation,
    allocate,
    allocate_model,
    build_problem,
    pareto_frontier,
    problem_from_model,
)
from hawq.blocks import partition_blocks
from hawq.models.resnet_cifar import cifar_resnet
from hawq.size import MB, layer_costs, model_size_bytes

BITS = (2, 4, 8)
SEEDS = range(8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def synthetic(seed: int, n: int = 7, fixed: float = 1000.0, decreasing: bool = True):
    """A random sensitivity table, Omega over BITS (random; decreasing in bits like a real
    quantization error, or arbitrary), MACs per block."""
    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "block": [f"b{i}" for i in range(n)],
            "modules": [[f"m{i}.conv", f"m{i}.fc"] for i in range(n)],
            "n_params": rng.integers(200, 20000, n).tolist(),
            "eigenvalue": rng.uniform(0.1, 50, n),
            "trace": rng.uniform(1, 500, n),
        }
    )
    omega = rng.uniform(0, 1, (n, len(BITS))) * rng.uniform(0.01, 10, (n, 1))
    if decreasing:
        omega = -np.sort(-omega, axis=1)
    macs = rng.integers(10_000, 1_000_000, n).astype(float)
    return table, omega, macs, fixed


def brute_force(table, omega, macs, fixed, *, size_mb=None, bops=None, act=8, keep=None):
    """Every assignment (column indices), its size, BOPs and Omega; rows failing limits dropped."""
    n = table.num_rows
    combos = np.array(list(itertools.product(range(len(BITS)), repeat=n)))
    bits = np.array(BITS)[combos]
    n_w = np.array(table.column("n_params").to_pylist())
    size = (fixed + (bits * n_w).sum(1) / 8) / MB
    bop = (bits * macs).sum(1) * act
    om = omega[np.arange(n), combos].sum(1)
    ok = np.ones(len(combos), bool)
    if size_mb is not None:
        ok &= size <= size_mb
    if bops is not None:
        ok &= bop <= bops
    if keep is not None:
        ok &= np.array([keep(b) for b in bits])
    return bits[ok], size[ok], bop[ok], om[ok]


def size_range(table, fixed):
    n_w = np.array(table.column("n_params").to_pylist())
    return (fixed + n_w.sum() * 2 / 8) / MB, (fixed + n_w.sum() * 8 / 8) / MB


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        AllocConfig(method="greedy")
    with pytest.raises(ValueError, match="sensitivity"):
        AllocConfig(sensitivity="hessian")
    with pytest.raises(ValueError, match="candidate_bits"):
        AllocConfig(candidate_bits=(1, 4))
    with pytest.raises(ValueError, match="candidate_bits"):
        AllocConfig(candidate_bits=(4, 4))
    with pytest.raises(ValueError, match="at most one"):
        AllocConfig(size_limit_mb=1.0, compression=8.0)
    with pytest.raises(ValueError, match="compression"):
        AllocConfig(compression=-2.0)
    with pytest.raises(ValueError, match="bops_limit"):
        AllocConfig(bops_limit=float("nan"))
    with pytest.raises(ValueError, match="act_bits"):
        AllocConfig(act_bits=1)
    with pytest.raises(ValueError, match="pins"):
        AllocConfig(pins={"conv1": 9})
    with pytest.raises(ValueError, match="ties"):
        AllocConfig(ties=(("a",),))
    with pytest.raises(ValueError, match="regex"):
        AllocConfig(pins={"re:(": 8})
    assert AllocConfig(candidate_bits=(8, 2, 4)).candidate_bits == (2, 4, 8)


@pytest.mark.parametrize("seed", SEEDS)
def test_ilp_is_the_brute_force_optimum(seed):
    table, omega, _, fixed = synthetic(seed)
    lo, hi = size_range(table, fixed)
    limit = lo + np.random.default_rng(seed + 100).uniform(0.1, 0.8) * (hi - lo)
    config = AllocConfig(method="ilp", size_limit_mb=limit)
    alloc = allocate(build_problem(table, omega, BITS, config, fixed_bytes=fixed), config)
    _, size, _, om = brute_force(table, omega, np.zeros(7), fixed, size_mb=limit)
    assert alloc.total_omega == pytest.approx(om.min(), rel=1e-9)
    assert alloc.size_mb <= limit
    bits = alloc.table.column("bits").to_pylist()
    n_w = np.array(table.column("n_params").to_pylist())
    assert alloc.size_mb == pytest.approx((fixed + (np.array(bits) * n_w).sum() / 8) / MB)
    assert alloc.compression == pytest.approx(32 * n_w.sum() / (np.array(bits) * n_w).sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_ilp_with_ties_pins_and_bops(seed):
    table, omega, macs, fixed = synthetic(seed)
    rng = np.random.default_rng(seed + 7)
    a, b, c, p = rng.permutation(7)[:4].tolist()
    # tie block a with block b (by module name) and with c (by regex); pin p (by module FQN)
    ties = ((f"b{a}", f"m{b}.fc"), (f"re:m{a}\\..*", f"b{c}"))
    pins = {f"m{p}.conv": 8}
    lo, hi = size_range(table, fixed)
    limit = lo + rng.uniform(0.3, 0.9) * (hi - lo)
    bops_all = (np.array(BITS)[:, None] * macs).sum(1) * 8  # all at 2, 4, 8 bits
    bops = rng.uniform(bops_all[0], bops_all[2])

    def keep(bits):
        return bits[a] == bits[b] == bits[c] and bits[p] == 8

    bf = brute_force(table, omega, macs, fixed, size_mb=limit, bops=bops, keep=keep)
    config = AllocConfig(size_limit_mb=limit, bops_limit=bops, ties=ties, pins=pins)
    problem = build_problem(table, omega, BITS, config, macs=macs, fixed_bytes=fixed)
    if len(bf[3]) == 0:
        with pytest.raises(InfeasibleAllocation):
            allocate(problem, config)
        return
    alloc = allocate(problem, config)
    bits = alloc.table.column("bits").to_pylist()
    assert keep(np.array(bits))
    assert alloc.bops <= bops and alloc.size_mb <= limit
    assert alloc.bops == pytest.approx((np.array(bits) * macs).sum() * 8)
    assert alloc.total_omega == pytest.approx(bf[3].min(), rel=1e-9)


def monotone_in(order):
    return lambda bits: all(bits[i] >= bits[j] for i, j in itertools.pairwise(order))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["eigenvalue", "trace"])
def test_v1_is_best_monotone_sequence(seed, mode):
    table, omega, _, fixed = synthetic(seed)
    n_p = np.array(table.column("n_params").to_pylist(), float)
    s = np.array(table.column(mode).to_pylist()) / n_p
    order = np.argsort(-s, kind="stable")
    lo, hi = size_range(table, fixed)
    limit = lo + np.random.default_rng(seed).uniform(0.05, 0.95) * (hi - lo)
    config = AllocConfig(method="v1", sensitivity=mode, size_limit_mb=limit)
    problem = build_problem(table, omega, BITS, config, fixed_bytes=fixed)
    alloc = allocate(problem, config)
    bits = np.array(alloc.table.column("bits").to_pylist())
    assert monotone_in(order)(bits)
    assert np.allclose(alloc.table.column("sensitivity").to_numpy(), s)
    bf = brute_force(table, omega, np.zeros(7), fixed, size_mb=limit, keep=monotone_in(order))
    assert alloc.total_omega == pytest.approx(bf[3].min(), rel=1e-9)
    ilp = allocate(problem, AllocConfig(method="ilp", sensitivity=mode, size_limit_mb=limit))
    assert ilp.total_omega <= alloc.total_omega * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_v1_restricted_ilp_equals_enumeration(seed, monkeypatch):
    table, omega, _, fixed = synthetic(seed, n=8)
    lo, hi = size_range(table, fixed)
    config = AllocConfig(method="v1", size_limit_mb=(lo + hi) / 2, ties=(("b0", "b5"),))
    problem = build_problem(table, omega, BITS, config, fixed_bytes=fixed)
    enumerated = allocate(problem, config)
    monkeypatch.setattr(bit_solvers, "MAX_ENUMERATION", 0)
    restricted = allocate(problem, config)
    assert restricted.total_omega == pytest.approx(enumerated.total_omega, rel=1e-9)
    assert enumerated.bits["b0"] == enumerated.bits["b5"]


def test_v1_with_pins_keeps_pins_out_of_the_order():
    table, omega, _, fixed = synthetic(3)
    lo, hi = size_range(table, fixed)
    config = AllocConfig(method="v1", size_limit_mb=lo + 0.3 * (hi - lo), pins={"b1": 8})
    alloc = allocate(build_problem(table, omega, BITS, config, fixed_bytes=fixed), config)
    assert alloc.bits["b1"] == 8
    n_p = np.array(table.column("n_params").to_pylist(), float)
    s = np.array(table.column("trace").to_pylist()) / n_p
    free = [i for i in np.argsort(-s, kind="stable") if i != 1]

    def keep(bits):
        return bits[1] == 8 and monotone_in(free)(bits)

    bf = brute_force(table, omega, np.zeros(7), fixed, size_mb=config.size_limit_mb, keep=keep)
    assert alloc.total_omega == pytest.approx(bf[3].min(), rel=1e-9)


@pytest.mark.parametrize("method", ["ilp", "v1"])
def test_infeasible_limit_states_the_smallest_size(method):
    table, omega, macs, fixed = synthetic(1)
    n_w = np.array(table.column("n_params").to_pylist())
    smallest = (fixed + (n_w.sum() - n_w[2]) * 2 / 8 + n_w[2] * 8 / 8) / MB  # b2 pinned at 8
    config = AllocConfig(method=method, size_limit_mb=smallest * 0.99, pins={"b2": 8})
    problem = build_problem(table, omega, BITS, config, macs=macs, fixed_bytes=fixed)
    with pytest.raises(InfeasibleAllocation, match="smallest model") as err:
        allocate(problem, config)
    assert err.value.min_size_mb == pytest.approx(smallest)
    assert f"{smallest:.6g} MB" in str(err.value) and "size_limit_mb" in str(err.value)
    at_min = AllocConfig(method=method, size_limit_mb=smallest, pins={"b2": 8})
    alloc = allocate(problem, at_min)
    assert alloc.bits == {f"b{i}": 8 if i == 2 else 2 for i in range(7)}
    max_c = 32 * n_w.sum() / ((n_w.sum() - n_w[2]) * 2 + n_w[2] * 8)
    too_much = AllocConfig(method=method, compression=max_c * 1.01, pins={"b2": 8})
    with pytest.raises(InfeasibleAllocation, match="compression") as err:
        allocate(problem, too_much)
    assert err.value.max_compression == pytest.approx(max_c)
    min_bops = ((n_w * 0 + 2) * macs).sum() * 8 + (8 - 2) * macs[2] * 8
    low_bops = AllocConfig(method=method, bops_limit=min_bops * 0.999, pins={"b2": 8})
    with pytest.raises(InfeasibleAllocation, match="bops_limit") as err:
        allocate(problem, low_bops)
    assert err.value.min_bops == pytest.approx(min_bops)


def test_compression_limit_matches_brute_force():
    table, omega, _, fixed = synthetic(5)
    config = AllocConfig(compression=9.0)
    alloc = allocate(build_problem(table, omega, BITS, config, fixed_bytes=fixed), config)
    n_w = np.array(table.column("n_params").to_pylist())
    bf = brute_force(table, omega, np.zeros(7), fixed)
    ok = 32 * n_w.sum() / (bf[0] * n_w).sum(1) >= 9.0
    assert alloc.compression >= 9.0
    assert alloc.total_omega == pytest.approx(bf[3][ok].min(), rel=1e-9)


def test_pin_and_tie_errors():
    table, omega, _, _ = synthetic(0)
    with pytest.raises(ValueError, match="matches no block"):
        build_problem(table, omega, BITS, AllocConfig(pins={"conv9": 8}))
    with pytest.raises(ValueError, match="pinned to different bits"):
        cfg = AllocConfig(pins={"b0": 8, "b1": 4}, ties=(("b0", "b1"),))
        build_problem(table, omega, BITS, cfg)
    with pytest.raises(ValueError, match="pinned to both"):
        build_problem(table, omega, BITS, AllocConfig(pins={"b0": 8, "m0.fc": 4}))
    with pytest.raises(ValueError, match="omega covers"):
        build_problem(table, omega, BITS, AllocConfig(candidate_bits=(2, 3, 4)))


@pytest.mark.parametrize("method", ["ilp", "v1"])
def test_pareto_points_are_non_dominated(method):
    table, omega, _, fixed = synthetic(2, n=6, decreasing=False)
    config = AllocConfig(method=method)
    problem = build_problem(table, omega, BITS, config, fixed_bytes=fixed)
    front = pareto_frontier(problem, method=method, n_points=12)
    assert front.num_rows == 12
    rows = front.to_pylist()
    bits_all, size_all, _, om_all = brute_force(table, omega, np.zeros(6), fixed)
    for r in rows:
        assert r["size_mb"] <= r["limit_mb"] * (1 + 1e-12)
        others = [o for o in rows if o is not r]
        dominated = any(
            o["size_mb"] <= r["size_mb"]
            and o["total_omega"] <= r["total_omega"]
            and (o["size_mb"] < r["size_mb"] or o["total_omega"] < r["total_omega"])
            for o in others
        )
        assert r["pareto"] == (not dominated)
        if method == "ilp":  # exact: no assignment at most as large is better
            better = (size_all <= r["size_mb"]) & (om_all < r["total_omega"] * (1 - 1e-9))
            assert not better.any()
    assert rows[0]["bits"] == [2] * 6
    if method == "ilp":  # the largest limit constrains nothing
        assert rows[-1]["total_omega"] == pytest.approx(om_all.min(), rel=1e-9)
    omegas = [r["total_omega"] for r in rows]
    if method == "ilp":
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(omegas))
    assert front.schema.metadata[b"method"] == method.encode()


def test_allocate_model_sizes_match_hawq_size():
    torch.manual_seed(0)
    model = cifar_resnet(20)
    blocks = partition_blocks(model, grouping="layer")
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "block": [b.name for b in blocks],
            "modules": [list(b.module_names) for b in blocks],
            "n_params": [b.n_params for b in blocks],
            "eigenvalue": rng.uniform(1, 100, len(blocks)),
            "trace": rng.uniform(10, 1000, len(blocks)),
        }
    )
    x = torch.randn(2, 3, 32, 32)
    config = AllocConfig(
        compression=10.0,
        bops_limit=None,
        pins={"conv1": 8, "linear": 8},
        ties=(("re:layer2\\.0\\.conv\\d", "layer2.0.conv1"),),
        act_bits=4,
    )
    alloc = allocate_model(model, table, config, example_input=x)
    assert alloc.bits["conv1"] == 8 and alloc.bits["linear"] == 8
    assert alloc.bits["layer2.0.conv1"] == alloc.bits["layer2.0.conv2"]
    assert alloc.compression >= 10.0
    exact = model_size_bytes(model, alloc.bit_config) / MB
    assert alloc.size_mb == pytest.approx(exact, abs=len(blocks) / MB)  # ceil per layer
    lb = alloc.bit_config.resolve("layer3.2.conv2")
    assert (lb.weight, lb.act) == (alloc.bits["layer3.2.conv2"], 4)
    # the network input and the last layer's input stay at 8 bits (input/last_act_bits)
    assert (
        alloc.bit_config.resolve("conv1").act == 8 and alloc.bit_config.resolve("linear").act == 8
    )
    costs = {c.name: c.macs for c in layer_costs(model, x)}
    problem = problem_from_model(model, table, config, example_input=x)
    act = {"conv1": 8, "linear": 8}
    want = sum(costs[m] * b * act.get(m, 4) for m, b in alloc.bits.items())
    assert problem.bops(alloc.table.column("bits").to_numpy()) == pytest.approx(want)
    assert math.isclose(alloc.total_omega, float(alloc.table.column("omega").to_numpy().sum()))


def in_window(table, fixed, limit, tol):
    """brute_force's keep: weight bits in [ceil((1 - tol) B), B], B = the limit's bit budget."""
    n_w = np.array(table.column("n_params").to_pylist())
    budget = math.floor((limit * MB - fixed) * 8)
    return lambda bits: math.ceil((1 - tol) * budget) <= int((bits * n_w).sum()) <= budget


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["ilp", "v1"])
def test_size_tolerance_is_the_brute_force_optimum_in_the_window(seed, method):
    table, omega, _, fixed = synthetic(seed, decreasing=seed % 2 == 0)
    rng = np.random.default_rng(seed + 50)
    lo, hi = size_range(table, fixed)
    limit = lo + rng.uniform(0.1, 0.9) * (hi - lo)
    tol = float(rng.choice([0.005, 0.02, 0.1]))
    config = AllocConfig(method=method, size_limit_mb=limit, size_tolerance=tol)
    problem = build_problem(table, omega, BITS, config, fixed_bytes=fixed)
    window = in_window(table, fixed, limit, tol)
    n_p = np.array(table.column("n_params").to_pylist(), float)
    order = np.argsort(-np.array(table.column("trace").to_pylist()) / n_p, kind="stable")
    mono = monotone_in(order) if method == "v1" else (lambda bits: True)
    bf = brute_force(table, omega, np.zeros(7), fixed, keep=lambda b: window(b) and mono(b))
    if len(bf[3]) == 0:
        with pytest.raises(InfeasibleAllocation, match="size_tolerance"):
            allocate(problem, config)
        return
    alloc = allocate(problem, config)
    bits = np.array(alloc.table.column("bits").to_pylist())
    assert window(bits) and mono(bits)
    assert (1 - tol) * limit <= alloc.size_mb <= limit
    assert alloc.total_omega == pytest.approx(bf[3].min(), rel=1e-9)
    # without the floor the optimum can only be at least as good
    free = allocate(problem, AllocConfig(method=method, size_limit_mb=limit))
    assert free.total_omega <= alloc.total_omega * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_size_tolerance_restricted_v1_ilp_equals_enumeration(seed, monkeypatch):
    table, omega, _, fixed = synthetic(seed, n=8)
    lo, hi = size_range(table, fixed)
    config = AllocConfig(method="v1", size_limit_mb=lo + 0.6 * (hi - lo), size_tolerance=0.1)
    problem = build_problem(table, omega, BITS, config, fixed_bytes=fixed)
    enumerated = allocate(problem, config)
    monkeypatch.setattr(bit_solvers, "MAX_ENUMERATION", 0)
    restricted = allocate(problem, config)
    assert restricted.total_omega == pytest.approx(enumerated.total_omega, rel=1e-9)
    assert restricted.size_mb >= 0.9 * config.size_limit_mb


def test_size_tolerance_validation_and_unreachable_floor():
    with pytest.raises(ValueError, match="size_tolerance"):
        AllocConfig(compression=8.0, size_tolerance=0.0)
    with pytest.raises(ValueError, match="size_tolerance"):
        AllocConfig(compression=8.0, size_tolerance=1.0)
    with pytest.raises(ValueError, match="needs size_limit_mb or compression"):
        AllocConfig(size_tolerance=0.02)
    table, omega, _, fixed = synthetic(4)
    config = AllocConfig(compression=1.0, size_tolerance=0.02, pins={"b0": 2})
    problem = build_problem(table, omega, BITS, config, fixed_bytes=fixed)
    with pytest.raises(InfeasibleAllocation, match="largest model"):
        allocate(problem, config)  # 32x/8 bits everywhere but b0 at 2: under the 1x floor
