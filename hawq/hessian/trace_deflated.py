"""Variance-reduced block traces: deflate each block's Krylov subspace, probe the remainder.

For block ``b`` with an orthonormal basis ``Q_b`` (``k_b`` rows) and ``P_b = I - Q_b^T Q_b``
(rows as vectors), the trace splits exactly:

    Tr(H_bb) = tr(Q_b H_bb Q_b^T) + Tr(P_b H_bb P_b).

The first part is known: ``Q_b`` is the Lanczos basis already built for the block's top
eigenvalue and ``tr(Q_b H_bb Q_b^T) = tr(T_k) = sum_i alpha_i`` (``EigenResult.basis_trace``),
so it costs no HVP. Hutchinson runs on the remainder only: for the joint Rademacher probe ``v``
(all blocks), ``w_b = v_b - Q_b^T (Q_b v_b)`` and one joint HVP ``H w`` give every block's
sample ``tr(Q_b H_bb Q_b^T) + w_b^T (H w)_b``. Unbiased: ``E[w_b w_b^T] = P_b`` and the cross
terms ``w_b^T H_bc w_c`` have mean zero (``v_b``, ``v_c`` independent). The Rademacher
variance drops from ``2 (||H_bb||_F^2 - sum_i h_ii^2)`` to the same expression for
``P_b H_bb P_b``: the top of a network Hessian's spectrum (which the Krylov space captures
first) dominates the Frobenius norm, and the cross terms lose the rows along ``Q_b`` too.
With ``Q_b`` spanning the whole block the sample is exact (zero variance).

Why not Hutch++ (Meyer, Musco, Musco, Woodruff 2021)? It builds ``Q = orth(A S)`` from a
random sketch and needs ``tr(Q^T A Q)``: per block ``2 k`` block-restricted HVPs (the joint
HVP cannot give them: ``q_b^T (H q)_b`` carries non-zero-mean cross terms), i.e. ``2 k B``
HVPs for ``B`` blocks before the first probe, and a one-step sketch captures the top
subspace worse than a Krylov space of the same size. The Lanczos basis is a better subspace
at zero extra HVPs, so deflation is used; Hutch++ would only pay off without eigenvalues.

Memory: ``k_b x n_b`` floats per block (``k_b`` = the Lanczos iterations of its top pair, at
most ``max_iter``), i.e. at most ``max_iter`` copies of the model's parameters in all.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hawq.hessian.eigen import EigenResult
from hawq.hessian.operator import HessianOperator

logger = logging.getLogger(__name__)

TRACE_METHODS = ("hutchinson", "deflated")
"""``hutchinson``: plain Rademacher probes. ``deflated``: Krylov deflation (this module)."""


@dataclass(frozen=True, kw_only=True)
class Deflation:
    """Per block: orthonormal rows ``bases[b]`` (``k_b x n_b``) and ``exact[b] = tr(Q H_bb Q^T)``.

    Blocks without a basis are probed plainly (``w_b = v_b``, no exact part).
    """

    bases: Mapping[str, Tensor]
    exact: Mapping[str, float]

    def __post_init__(self) -> None:
        if set(self.bases) != set(self.exact):
            raise ValueError("bases and exact must name the same blocks")
        for b, q in self.bases.items():
            if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[0] < 1:
                raise ValueError(f"bases[{b!r}] must be a (k, n) tensor with k >= 1")
            if not math.isfinite(self.exact[b]):
                raise ValueError(f"exact[{b!r}] must be finite, got {self.exact[b]}")

    @classmethod
    def from_eigen(cls, results: Mapping[str, EigenResult]) -> Deflation:
        """The Lanczos bases of ``results`` (``{block: top EigenResult}``); free exact parts.

        Results without a basis (power iteration) are skipped with a warning: those blocks
        are probed plainly.
        """
        plain = sorted(b for b, r in results.items() if r.basis is None)
        if plain:
            logger.warning(
                "trace_method='deflated' needs Lanczos bases; blocks %s have none (power "
                "iteration): their traces use plain Hutchinson probes (use method='lanczos')",
                plain,
            )
        kept = {b: r for b, r in results.items() if r.basis is not None}
        deflation = cls(
            bases={b: r.basis for b, r in kept.items()},
            exact={b: float(r.basis_trace) for b, r in kept.items()},
        )
        logger.info(
            "deflated traces: %d block bases, %d vectors in all, %.1f MB",
            len(kept), sum(q.shape[0] for q in deflation.bases.values()), deflation.nbytes / 2**20,
        )  # fmt: skip
        return deflation

    @classmethod
    def from_vectors(cls, op: HessianOperator, vectors: Mapping[str, Tensor]) -> Deflation:
        """Orthonormalise ``vectors[b]`` (rows) and compute ``tr(Q H_bb Q^T)`` with ``k_b`` HVPs."""
        bases, exact = {}, {}
        for b, rows in vectors.items():
            if rows.dim() != 2 or rows.shape[1] != op.dim(b):
                raise ValueError(f"vectors[{b!r}] must have shape (k, {op.dim(b)})")
            q = torch.linalg.qr(rows.to(dtype=op.dtype, device=op.device).T).Q.T
            bases[b] = q
            exact[b] = math.fsum(float(qi.double() @ op.hvp(b, qi).double()) for qi in q)
        return cls(bases=bases, exact=exact)

    @property
    def nbytes(self) -> int:
        """Memory held by the bases."""
        return sum(q.numel() * q.element_size() for q in self.bases.values())

    def project(self, vs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``w_b = v_b - Q_b^T (Q_b v_b)`` for blocks with a basis, ``v_b`` otherwise."""
        out = {}
        for b, v in vs.items():
            q = self.bases.get(b)
            out[b] = v if q is None else v - q.T @ (q @ v)
        return out
