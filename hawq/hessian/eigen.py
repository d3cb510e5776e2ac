"""Extreme eigenpairs of a symmetric operator given only its matvec ``v -> A v``.

* ``power_iteration``: ``v <- A v / ||A v||``; the Rayleigh quotient ``lambda = v^T A v``
  converges to the eigenvalue of largest magnitude at rate ``(lambda_2 / lambda_1)^2`` per
  matvec. Stops when ``|lambda_k - lambda_{k-1}| <= tol |lambda_k|`` (PyHessian's rule).
* ``lanczos``: builds an orthonormal Krylov basis ``Q_k`` with ``A Q_k = Q_k T_k + beta_k q_{k+1}
  e_k^T`` (``T_k`` tridiagonal), fully reorthogonalised (classical Gram-Schmidt, twice) so no
  ghost copies appear. The Ritz value ``theta`` of largest magnitude of ``T_k`` approximates the
  eigenvalue of largest magnitude, with residual ``||A y - theta y|| = beta_k |s_k|`` for Ritz
  vector ``y = Q_k s`` (free: no extra matvec). Stops when the eigenvalue error estimate
  ``min(r, r^2 / gap) <= tol |theta|`` (``r`` the residual, ``gap`` the distance from ``theta``
  to the other Ritz values; for symmetric ``A`` the error is at most ``r`` and ``~r^2/gap``).
  This is about one step earlier than "relative change < tol" on well separated spectra and,
  unlike it, does not stop early when the top eigenvalues are clustered.
  Far fewer matvecs than power iteration for the same accuracy. The result keeps the basis
  (``basis``, ``k x n``, orthonormal rows) and ``basis_trace = tr(T_k) = sum_i q_i^T A q_i =
  tr(Q_k^T A Q_k)``, free: a variance-reduced trace estimator deflates this subspace.
* ``top_k``: the ``k`` eigenpairs of largest magnitude by deflation: pair ``i`` is the top pair
  of ``P A P`` with ``P = I - U U^T`` projecting out the ``i`` vectors already found.

All arithmetic runs in ``v0``'s dtype (float64 works end to end); scalars are Python floats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hawq.validation import check_int, check_number

logger = logging.getLogger(__name__)

MatVec = Callable[[Tensor], Tensor]
METHODS = ("lanczos", "power")


@dataclass(frozen=True, kw_only=True)
class EigenResult:
    """An approximate eigenpair; ``residual = ||A v - lambda v|| / |lambda|``.

    Lanczos also returns its Krylov basis ``basis`` (``k x n``, orthonormal rows, ``k = hvps``)
    and ``basis_trace = tr(Q^T A Q)`` (the sum of the diagonal of ``T_k``); power iteration
    returns ``None`` for both.
    """

    eigenvalue: float
    eigenvector: Tensor
    hvps: int
    residual: float
    converged: bool
    basis: Tensor | None = None
    basis_trace: float | None = None


def _check(v0: Tensor, tol: float, max_iter: int) -> None:
    if not isinstance(v0, Tensor) or v0.dim() != 1 or v0.numel() == 0:
        raise ValueError("v0 must be a non-empty 1-D tensor")
    if not v0.is_floating_point():
        raise ValueError(f"v0 must be floating point, got {v0.dtype}")
    if not bool(torch.isfinite(v0).all()) or not bool(v0.any()):
        raise ValueError("v0 must be finite and nonzero")
    check_number("tol", tol, low=0, low_open=True)
    check_int("max_iter", max_iter, low=1)


def _apply(matvec: MatVec, v: Tensor, it: int) -> Tensor:
    w = matvec(v)
    if not isinstance(w, Tensor) or w.shape != v.shape:
        raise ValueError(f"matvec must return a tensor of shape {tuple(v.shape)}")
    w = w.to(dtype=v.dtype, device=v.device)
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(f"matvec returned non-finite values at iteration {it}")
    return w


def _relative(num: float, lam: float) -> float:
    if lam != 0:
        return num / abs(lam)
    return 0.0 if num == 0 else math.inf


def power_iteration(
    matvec: MatVec, v0: Tensor, *, tol: float = 1e-3, max_iter: int = 100
) -> EigenResult:
    """Eigenvalue of largest magnitude by power iteration (Rayleigh quotient estimate)."""
    _check(v0, tol, max_iter)
    v = v0 / torch.linalg.vector_norm(v0)
    lam_prev: float | None = None
    converged = False
    for it in range(max_iter):
        w = _apply(matvec, v, it)
        lam = float(v @ w)
        norm_w = float(torch.linalg.vector_norm(w))
        if norm_w == 0.0:  # v is in the null space: an exact eigenpair with eigenvalue 0
            converged = True
            break
        if lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam):
            converged = True
            break
        if it == max_iter - 1:
            break
        lam_prev = lam
        v = w / norm_w
    residual = _relative(float(torch.linalg.vector_norm(w - lam * v)), lam)
    return EigenResult(
        eigenvalue=lam, eigenvector=v, hvps=it + 1, residual=residual, converged=converged
    )


def lanczos(matvec: MatVec, v0: Tensor, *, tol: float = 1e-3, max_iter: int = 50) -> EigenResult:
    """Eigenvalue of largest magnitude by Lanczos with full reorthogonalisation.

    ``max_iter`` caps the Krylov dimension (and the ``max_iter x n`` basis kept in memory).
    The returned ``basis`` is the ``(k, n)`` Krylov basis (a view of the working storage).
    """
    _check(v0, tol, max_iter)
    n = v0.numel()
    max_iter = min(max_iter, n)
    basis = torch.empty(min(max_iter, 16), n, dtype=v0.dtype, device=v0.device)
    basis[0] = v0 / torch.linalg.vector_norm(v0)
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    for k in range(max_iter):
        q = basis[k]
        w = _apply(matvec, q, k)
        alpha = float(q @ w)
        alphas.append(alpha)
        w = w - alpha * q
        if k > 0:
            w = w - betas[-1] * basis[k - 1]
        active = basis[: k + 1]
        for _ in range(2):  # CGS2: full reorthogonalisation against every basis vector
            w = w - active.T @ (active @ w)
        beta = float(torch.linalg.vector_norm(w))
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        i = int(torch.argmax(evals.abs()))
        theta, s = float(evals[i]), evecs[:, i]
        res = beta * abs(float(s[-1]))
        others = torch.cat([evals[:i], evals[i + 1 :]])
        gap = float((others - theta).abs().min()) if others.numel() else 0.0
        error = min(res, res * res / gap) if gap > 0 else res
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0))
        exhausted = beta <= 64 * torch.finfo(v0.dtype).eps * scale
        if exhausted or error <= tol * abs(theta):
            converged = True
            break
        if k == max_iter - 1:
            break
        if k + 1 == basis.shape[0]:
            grown = torch.empty(
                min(2 * basis.shape[0], max_iter), n, dtype=v0.dtype, device=v0.device
            )
            grown[: k + 1] = basis[: k + 1]
            basis = grown
        betas.append(beta)
        basis[k + 1] = w / beta
    y = basis[: k + 1].T @ s.to(dtype=v0.dtype, device=v0.device)
    y = y / torch.linalg.vector_norm(y)
    return EigenResult(
        eigenvalue=theta,
        eigenvector=y,
        hvps=k + 1,
        residual=_relative(res, theta),
        converged=converged,
        basis=basis[: k + 1],
        basis_trace=math.fsum(alphas),
    )


def top_k(
    matvec: MatVec,
    v0: Tensor,
    k: int,
    *,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> list[EigenResult]:
    """The ``k`` eigenpairs of largest magnitude by deflation, sorted by decreasing ``|lambda|``.

    Pair 0 starts from ``v0``; later pairs start from ``randn`` drawn from ``generator`` (on
    the CPU, then moved) or, without one, from ``v0`` again; each start is projected away from
    the vectors already found.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check(v0, tol, max_iter)
    if k > v0.numel():
        raise ValueError(f"k must be <= the dimension {v0.numel()}, got {k}")
    solve = lanczos if method == "lanczos" else power_iteration
    found: list[EigenResult] = []
    vectors = torch.empty(0, v0.numel(), dtype=v0.dtype, device=v0.device)

    def project(v: Tensor) -> Tensor:
        for _ in range(2):
            v = v - vectors.T @ (vectors @ v)
        return v

    def deflated(v: Tensor) -> Tensor:
        return project(matvec(project(v)).to(dtype=v.dtype, device=v.device))

    for i in range(k):
        start = v0
        if i > 0 and generator is not None:
            start = torch.randn(v0.numel(), generator=generator, dtype=torch.float64)
            start = start.to(dtype=v0.dtype, device=v0.device)
        start = project(start)
        if float(torch.linalg.vector_norm(start)) <= 1e-8 * float(torch.linalg.vector_norm(v0)):
            raise ValueError(f"start vector for eigenpair {i} lies in the span of those found")
        result = solve(deflated if i else matvec, start, tol=tol, max_iter=max_iter)
        found.append(result)
        vec = project(result.eigenvector)
        vectors = torch.cat([vectors, (vec / torch.linalg.vector_norm(vec))[None]])
    return sorted(found, key=lambda r: -abs(r.eigenvalue))
