"""The evaluation's statistics (benchmarks/paired_stats.py) against closed-form cases."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from paired_stats import mcnemar, mean_ci, paired_bootstrap, ranks, spearman  # noqa: E402


def _pairs(n11: int, n10: int, n01: int, n00: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00)
    b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00)
    return a, b


def test_mcnemar_exact_on_a_hand_table():
    # discordant 10 vs 2: p = 2 * P[X <= 2], X ~ Bin(12, 1/2) = 2 (1 + 12 + 66) / 4096
    a, b = _pairs(50, 10, 2, 8)
    n10, n01, p = mcnemar(a, b)
    assert (n10, n01) == (10, 2)
    assert p == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert mcnemar(b, a)[2] == pytest.approx(p, rel=1e-12)  # symmetric
    assert mcnemar(*_pairs(5, 3, 3, 1))[2] == 1.0  # balanced discordance: min(1, 2 * P>=1/2)
    assert mcnemar(*_pairs(5, 0, 0, 1))[2] == 1.0  # no discordant pairs
    with pytest.raises(ValueError, match="0/1"):
        mcnemar(np.array([0, 2]), np.array([0, 1]))


def test_bootstrap_ci_covers_a_known_mean_difference():
    # d = +1 on 150 images, -1 on 50, 0 on 800: mean 0.1, sd of d known in closed form
    d = np.array([1] * 150 + [-1] * 50 + [0] * 800, dtype=float)
    r = paired_bootstrap(d, n_boot=4000, seed=1)
    assert r.mean == pytest.approx(0.1, abs=1e-15)
    assert r.lo < 0.1 < r.hi
    half = 1.959964 * d.std() / math.sqrt(len(d))  # normal-theory half-width
    assert (r.hi - r.lo) / 2 == pytest.approx(half, rel=0.1)
    assert r.excludes_zero() and r.p <= 1 / 4000 * 2
    # no difference: the CI contains 0 and p is large
    z = np.array([1, -1] * 500, dtype=float)
    rz = paired_bootstrap(z, n_boot=2000, seed=2)
    assert rz.lo < 0 < rz.hi and rz.p > 0.5 and not rz.excludes_zero()


def test_two_way_bootstrap_widens_with_seed_to_seed_shifts():
    rng = np.random.default_rng(0)
    base = rng.choice([-1.0, 0.0, 1.0], size=(1, 900), p=[0.1, 0.8, 0.1])
    same = np.repeat(base, 4, axis=0)
    shifted = same + np.array([[0.3], [-0.3], [0.3], [-0.3]])  # seed effects, mean 0
    a = paired_bootstrap(same, n_boot=2000)
    b = paired_bootstrap(shifted, n_boot=2000)
    assert b.mean == pytest.approx(a.mean)
    assert (b.hi - b.lo) > 2 * (a.hi - a.lo)
    assert "seeds x images" in b.method


def test_spearman_and_ranks_closed_form():
    assert ranks(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    rho, p = spearman(np.arange(10.0), -(np.arange(10.0) ** 3))  # monotone decreasing
    assert rho == -1.0 and p == 0.0
    # d = rank differences (0, 0, 1, -1, 0): rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 0.9
    rho, _ = spearman(np.array([1.0, 2, 3, 4, 5]), np.array([1.0, 2, 4, 3, 5]))
    assert rho == pytest.approx(0.9, abs=1e-12)


def test_mean_ci_student_t():
    m, h = mean_ci(np.array([0.90, 0.92]))
    # t_{0.975, 1} = 12.7062; sd = 0.01414; half = 12.7062 * 0.01414 / sqrt(2) = 0.12706
    assert m == pytest.approx(0.91)
    assert h == pytest.approx(12.7062047 * 0.0141421356 / math.sqrt(2), rel=1e-6)
    assert math.isnan(mean_ci(np.array([0.5]))[1])
