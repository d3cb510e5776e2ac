"""End to end on sklearn digits: Hessian analysis -> HAWQ v1 allocation -> order -> QAT.

A small CNN (5 Conv/Linear blocks) is trained in float, its block eigenvalues come from
``hawq.hessian.table.analyze``, and at a weight-compression target of 10x with bits {2, 4, 8}
HAWQ v1 (bits non-increasing in S_i = lambda_i / n_i, least Omega) is compared with the
reversed rule (bits non-decreasing in S_i: the least sensitive blocks get the most bits;
among those under the same limit, the largest model, then least Omega, found by brute
force). Both get the same short block-wise QAT (1 epoch per stage of 2 blocks, descending
Omega). With this short budget the reversed allocation loses far more accuracy; with a long
one (3 epochs per 1-block stage) both recover to within ~1 point on this easy task.
"""

from __future__ import annotations

import copy
import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from hawq.allocate import (
    AllocConfig,
    allocate,
    problem_from_model,
    to_bit_config,
    weight_bit_budget,
)
from hawq.bit_solvers import v1_order
from hawq.hessian.table import HessianConfig, analyze
from hawq.order import OrderConfig, finetune_order
from hawq.qat import QATConfig, evaluate, run_qat

logger = logging.getLogger(__name__)

COMPRESSION = 10.0
BITS = (2, 4, 8)


class DigitsNet(nn.Module):
    """conv(1->8) -> conv(8->16) -> pool -> conv(16->32) -> pool -> fc(128->32) -> fc(32->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    return (x[tr], y[tr]), (x[te], y[te])


def train_float(seed: int, train) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train
    for _ in range(25):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 100):
            j = perm[i : i + 100]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def reversed_bits(problem, budget: int) -> np.ndarray:
    """Bits non-decreasing in S (the reverse of HAWQ's order) under ``budget``: the largest
    such model, then the least Omega (brute force over all assignments)."""
    order = list(reversed(v1_order(problem)))
    best, best_key = None, None
    for combo in itertools.product(BITS, repeat=len(problem.blocks)):
        bits = np.array(combo)
        if any(bits[a] < bits[b] for a, b in itertools.pairwise(order)):
            continue
        if problem.weight_bits(bits) > budget:
            continue
        key = (-problem.weight_bits(bits), problem.total_omega(bits))
        if best_key is None or key < best_key:
            best, best_key = bits, key
    return best


def qat_accuracy(model, table, bits: dict[str, int], bit_config, seed: int, train, test):
    model = copy.deepcopy(model)
    order = finetune_order(model, table, bits, OrderConfig(blocks_per_stage=2))
    config = QATConfig(epochs=1, lr=0.01, batch_size=100, seed=seed)
    run_qat(model, order.stages, train, None, config, bit_config=bit_config)
    return evaluate(model, test)[1]


@pytest.mark.slow
def test_hawq_allocation_beats_reversed_after_qat(digits):
    torch.set_num_threads(1)
    train, test = digits
    drops = []
    for seed in range(3):
        model = train_float(seed, train)
        base = evaluate(model, test)[1]
        batches = [(train[0][i : i + 300], train[1][i : i + 300]) for i in (0, 300)]
        hcfg = HessianConfig(trace=False, tol=1e-2, max_iter=30, seed=seed)
        table = analyze(model, F.cross_entropy, batches, hcfg, progress=False)
        config = AllocConfig(
            method="v1", sensitivity="eigenvalue", compression=COMPRESSION, candidate_bits=BITS
        )
        problem = problem_from_model(model, table, config)
        hawq = allocate(problem, config)
        rev = reversed_bits(problem, weight_bit_budget(problem, compression=COMPRESSION))
        rev_bits = dict(zip(problem.blocks, rev.tolist(), strict=True))
        assert hawq.compression >= COMPRESSION and problem.compression(rev) >= COMPRESSION
        assert len(set(hawq.bits.values())) > 1  # a real mix of widths
        acc_hawq = qat_accuracy(model, table, hawq.bits, hawq.bit_config, seed, train, test)
        rev_config = to_bit_config(
            hawq.table.set_column(3, "bits", [rev.tolist()]), act_bits=config.act_bits
        )
        acc_rev = qat_accuracy(model, table, rev_bits, rev_config, seed, train, test)
        logger.info(
            "seed %d: float %.4f | HAWQ %s %.2fx -> %.4f | reversed %s %.2fx -> %.4f",
            seed, base, hawq.bits, hawq.compression, acc_hawq, rev_bits,
            problem.compression(rev), acc_rev,
        )  # fmt: skip
        drops.append((base - acc_hawq, base - acc_rev))
    hawq_drop, rev_drop = np.mean(drops, axis=0)
    assert hawq_drop < 0.03, drops
    assert rev_drop - hawq_drop > 0.03, drops
