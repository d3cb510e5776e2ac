"""Paired statistics for comparing quantized models on the same test images.

Correctness is a 0/1 array per model: ``c[j] = 1`` when image j is classified correctly. Two
models evaluated on the same images are compared through their per-image differences
``d[j] = a[j] - b[j]``; with several training seeds ``d`` is a (seeds, images) matrix.

- ``mcnemar(a, b)``: exact two-sided McNemar test on the discordant pairs (n01, n10):
  p = min(1, 2 P[X <= min(n01, n10)]), X ~ Binomial(n01 + n10, 1/2).
- ``paired_bootstrap(d)``: mean difference, percentile 95% CI and a two-sided bootstrap
  p-value. For a (seeds, images) matrix both seeds and images are resampled with replacement
  (a two-way bootstrap: seed-to-seed variation and test-set sampling both enter the CI).
- ``spearman(x, y)``: rank correlation (average ranks for ties) = Pearson correlation of ranks.
- ``mean_ci(x)``: mean and Student-t 95% interval (across seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PairedResult", "mcnemar", "mean_ci", "paired_bootstrap", "ranks", "spearman"]


@dataclass(frozen=True)
class PairedResult:
    """Mean of a paired difference with its 95% CI and a two-sided p-value."""

    mean: float
    lo: float
    hi: float
    p: float
    method: str

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, float | str]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "p": self.p, "method": self.method}


def _binary(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must be a 1-d array of 0/1 correctness values")
    return a.astype(np.int64)


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Discordant counts (n10: a right and b wrong, n01: the reverse) and the exact p-value."""
    a, b = _binary(a, "a"), _binary(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must cover the same images, got {a.shape} and {b.shape}")
    n10 = int(((a == 1) & (b == 0)).sum())
    n01 = int(((a == 0) & (b == 1)).sum())
    n = n10 + n01
    if n == 0:
        return n10, n01, 1.0
    p = min(1.0, 2.0 * float(stats.binom.cdf(min(n10, n01), n, 0.5)))
    return n10, n01, p


def paired_bootstrap(d: np.ndarray, *, n_boot: int = 10_000, seed: int = 0) -> PairedResult:
    """Mean of ``d`` ((images,) or (seeds, images)), percentile 95% CI, two-sided p-value.

    p = min(1, 2 min(P*[mean <= 0], P*[mean >= 0])) over the bootstrap distribution P*
    (at least 1 / n_boot when every replicate has one sign).
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError("d must be a finite, non-empty (images,) or (seeds, images) array")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    rng = np.random.default_rng(seed)
    s, n = d.shape
    means = np.empty(n_boot)
    for k in range(n_boot):
        rows = rng.integers(0, s, s) if s > 1 else np.zeros(1, dtype=np.int64)
        cols = rng.integers(0, n, n)
        means[k] = d[np.ix_(rows, cols)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    tail = min((means <= 0).mean(), (means >= 0).mean())
    p = min(1.0, max(2.0 * tail, 1.0 / n_boot))
    how = "two-way bootstrap (seeds x images)" if s > 1 else "paired bootstrap (images)"
    return PairedResult(float(d.mean()), float(lo), float(hi), float(p), how)


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the Student-t 95% interval (nan half-width for one value)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if x.size == 1:
        return float(x[0]), math.nan
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return float(x.mean()), half


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of their positions."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (t approximation with n - 2 dof)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError("spearman needs two 1-d arrays of the same length >= 3")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan, math.nan
    rho = float(np.corrcoef(rx, ry)[0, 1])
    n = len(x)
    if 1 - abs(rho) < 1e-12:  # perfectly monotone (up to rounding)
        return float(np.sign(rho)), 0.0
    t = rho * math.sqrt((n - 2) / (1 - rho * rho))
    return rho, float(2 * stats.t.sf(abs(t), n - 2))
