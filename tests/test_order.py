"""Omega and the fine-tuning order, checked against a numpy re-derivation of the quantizer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from hawq.blocks import partition_blocks
from hawq.models.resnet_cifar import cifar_resnet
from hawq.omega import (
    BlockRecord,
    block_records,
    omega_matrix,
    perturbation_matrix,
    sensitivity,
)
from hawq.order import ORDER_SCHEMA, OrderConfig, finetune_order, order_blocks


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def numpy_sq_error(w: np.ndarray, bits: int) -> float:
    """||Q_b(W) - W||^2 for symmetric per-output-channel quantization (levels +-(2^(b-1)-1))."""
    w = w.reshape(w.shape[0], -1).astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(w).max(1, keepdims=True) / qmax
    s[s == 0] = 1.0
    q = np.clip(np.round(w / s), -qmax, qmax) * s
    return float(((q - w) ** 2).sum())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = cifar_resnet(20)
    blocks = partition_blocks(model, grouping="residual")
    rng = np.random.default_rng(1)
    table = pa.table(
        {
            "block": [b.name for b in blocks],
            "modules": [list(b.module_names) for b in blocks],
            "n_params": [b.n_params for b in blocks],
            "eigenvalue": rng.uniform(1, 100, len(blocks)),
            "trace": rng.uniform(10, 1000, len(blocks)),
        }
    )
    return model, table


def test_records_and_sensitivity(resnet):
    _, table = resnet
    recs = block_records(table)
    assert [r.block for r in recs] == table.column("block").to_pylist()
    n = table.column("n_params").to_numpy()
    assert np.allclose(sensitivity(recs, "eigenvalue"), table.column("eigenvalue").to_numpy() / n)
    assert np.allclose(sensitivity(recs, "trace"), table.column("trace").to_numpy() / n)
    with pytest.raises(ValueError, match="finite eigenvalue"):
        sensitivity([BlockRecord(block="a", modules=("a",), n_params=3)], "eigenvalue")
    with pytest.raises(ValueError, match="unique"):
        block_records(table.to_pylist() * 2)


def test_omega_matrix_matches_numpy(resnet):
    model, table = resnet
    bits = [2, 4, 8]
    pert = perturbation_matrix(model, table.column("modules").to_pylist(), bits)
    named = dict(model.named_modules())
    for i, mods in enumerate(table.column("modules").to_pylist()):
        for j, b in enumerate(bits):
            want = sum(numpy_sq_error(named[m].weight.detach().numpy(), b) for m in mods)
            assert pert[i, j] == pytest.approx(want, rel=1e-5)
    assert (np.diff(pert, axis=1) < 0).all()  # more bits, less error
    n = table.column("n_params").to_numpy()
    lam = table.column("eigenvalue").to_numpy()
    tr = table.column("trace").to_numpy()
    om_e = omega_matrix(model, table, bits, sensitivity="eigenvalue")
    om_t = omega_matrix(model, table, bits, sensitivity="trace")
    assert np.allclose(om_e, lam[:, None] * pert)
    assert np.allclose(om_t, (tr / n)[:, None] * pert)


def test_order_descending_reverse_random_and_stages():
    blocks = [f"b{i}" for i in range(7)]
    modules = [[f"b{i}.conv1", f"b{i}.conv2"] for i in range(7)]
    omega = [3.0, 9.0, 1.0, 9.0, 0.5, 7.0, 2.0]
    desc = order_blocks(blocks, modules, omega, OrderConfig(blocks_per_stage=3))
    assert desc.blocks == ["b1", "b3", "b5", "b0", "b6", "b2", "b4"]  # ties keep table order
    assert desc.table.schema == ORDER_SCHEMA
    assert desc.table.column("stage").to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert desc.stages == [
        ["b1.conv1", "b1.conv2", "b3.conv1", "b3.conv2", "b5.conv1", "b5.conv2"],
        ["b0.conv1", "b0.conv2", "b6.conv1", "b6.conv2", "b2.conv1", "b2.conv2"],
        ["b4.conv1", "b4.conv2"],
    ]
    om = desc.table.column("omega").to_numpy()
    assert (np.diff(om) <= 0).all()
    rev = order_blocks(blocks, modules, omega, OrderConfig(mode="reverse"))
    assert (np.diff(rev.table.column("omega").to_numpy()) >= 0).all()
    assert len(rev.stages) == 7
    r1 = order_blocks(blocks, modules, omega, OrderConfig(mode="random", seed=3))
    r2 = order_blocks(blocks, modules, omega, OrderConfig(mode="random", seed=3))
    r3 = order_blocks(blocks, modules, omega, OrderConfig(mode="random", seed=4))
    assert r1.blocks == r2.blocks and sorted(r1.blocks) == sorted(blocks)
    assert r1.blocks != r3.blocks


def test_order_config_validation():
    with pytest.raises(ValueError, match="mode"):
        OrderConfig(mode="ascending")
    with pytest.raises(ValueError, match="blocks_per_stage"):
        OrderConfig(blocks_per_stage=0)
    with pytest.raises(ValueError, match="seed"):
        OrderConfig(seed=-1)
    with pytest.raises(ValueError, match="sensitivity"):
        OrderConfig(sensitivity="hutchinson")


def test_finetune_order_uses_lambda_times_error_at_assigned_bits(resnet):
    model, table = resnet
    names = table.column("block").to_pylist()
    bits = {b: [2, 4, 8][i % 3] for i, b in enumerate(names)}
    order = finetune_order(model, table, bits, OrderConfig(blocks_per_stage=2))
    named = dict(model.named_modules())
    lam = dict(zip(names, table.column("eigenvalue").to_pylist(), strict=True))
    mods = dict(zip(names, table.column("modules").to_pylist(), strict=True))
    want = {
        b: lam[b] * sum(numpy_sq_error(named[m].weight.detach().numpy(), bits[b]) for m in mods[b])
        for b in names
    }
    expect = sorted(names, key=lambda b: -want[b])
    assert order.blocks == expect
    got = dict(zip(order.blocks, order.table.column("omega").to_pylist(), strict=True))
    assert all(got[b] == pytest.approx(want[b], rel=1e-5) for b in names)
    assert sum(len(s) for s in order.stages) == sum(len(m) for m in mods.values())
    assert order.stages[0] == mods[expect[0]] + mods[expect[1]]
    partial = finetune_order(model, table, {names[0]: 4, names[1]: 8})
    assert sorted(partial.blocks) == sorted(names[:2])
    with pytest.raises(ValueError, match="not in the sensitivity table"):
        finetune_order(model, table, {"nope": 4})
