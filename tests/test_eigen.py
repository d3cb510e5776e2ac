import pytest
import torch

from hawq.blocks import partition_blocks
from hawq.hessian.eigen import lanczos, power_iteration, top_k
from hawq.hessian.operator import HessianOperator


def _by_magnitude(evals: torch.Tensor) -> torch.Tensor:
    return evals[evals.abs().argsort(descending=True)]


def _sym(spectrum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(spectrum)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T


def test_top_eigenvalue_matches_dense(grouped, dense_block_hessian):
    """Both solvers find the dense eigenvalue of largest magnitude (also when negative)."""
    problem, blocks = grouped
    gen = torch.Generator().manual_seed(0)
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        for b in blocks:
            H = dense_block_hessian(problem.model, problem.loss_fn, problem.batches, b.param_names)
            lam = float(_by_magnitude(torch.linalg.eigvalsh(H))[0])
            v0 = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            matvec = lambda v, name=b.name: op.hvp(name, v)  # noqa: E731
            lz = lanczos(matvec, v0, tol=1e-12, max_iter=b.n_params)
            pw = power_iteration(matvec, v0, tol=1e-10, max_iter=5000)
            for res in (lz, pw):
                assert res.converged
                assert abs(res.eigenvalue - lam) <= 1e-6 * abs(lam), (b.name, res, lam)
                assert float(res.eigenvector.norm()) == pytest.approx(1.0, abs=1e-12)
            assert lz.hvps < pw.hvps
            # the reported residual is the true one, ||H y - lambda y|| / |lambda|
            y = lz.eigenvector
            true_res = float((H @ y - lz.eigenvalue * y).norm()) / abs(lz.eigenvalue)
            assert lz.residual == pytest.approx(true_res, rel=1e-3, abs=1e-12)


def test_top_k_matches_dense(problem, dense_block_hessian):
    blocks = partition_blocks(problem.model)
    gen = torch.Generator().manual_seed(1)
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        for b in blocks:
            H = dense_block_hessian(problem.model, problem.loss_fn, problem.batches, b.param_names)
            expected = _by_magnitude(torch.linalg.eigvalsh(H))[:3]
            v0 = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            found = top_k(
                lambda v, name=b.name: op.hvp(name, v),
                v0,
                3,
                tol=1e-12,
                max_iter=b.n_params,
                generator=gen,
            )
            got = torch.tensor([r.eigenvalue for r in found], dtype=torch.float64)
            scale = float(expected[0].abs())
            assert float((got - expected).abs().max()) <= 1e-6 * scale, (b.name, got, expected)
            vecs = torch.stack([r.eigenvector for r in found])
            assert torch.allclose(vecs @ vecs.T, torch.eye(3, dtype=torch.float64), atol=1e-6)


def test_top_k_power_on_matrix_with_gaps():
    spectrum = [9.0, -7.0, 5.0, 3.0, 1.0] + [0.5 * (i % 7) / 7 for i in range(45)]
    A = _sym(spectrum)
    v0 = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for method in ("power", "lanczos"):
        found = top_k(lambda v: A @ v, v0, 3, method=method, tol=1e-13, max_iter=2000)
        got = [r.eigenvalue for r in found]
        assert got == pytest.approx([9.0, -7.0, 5.0], rel=1e-6)


def test_lanczos_beats_power_iteration_at_same_tol():
    v0 = torch.randn(200, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    # well separated top eigenvalue: Lanczos needs fewer matvecs
    A = _sym([10.0, 7.0] + [6.0 * i / 197 for i in range(198)], seed=4)
    lz = lanczos(lambda v: A @ v, v0, tol=1e-3, max_iter=50)
    pw = power_iteration(lambda v: A @ v, v0, tol=1e-3, max_iter=1000)
    assert lz.hvps < pw.hvps
    assert abs(lz.eigenvalue - 10.0) <= 1e-3 * 10.0
    # clustered top eigenvalues: "relative change < tol" stops power iteration far too early;
    # Lanczos's error estimate does not
    A = _sym([10.0, 9.5, 9.0] + [8.0 * i / 197 for i in range(197)], seed=5)
    lz = lanczos(lambda v: A @ v, v0, tol=1e-3, max_iter=50)
    pw = power_iteration(lambda v: A @ v, v0, tol=1e-3, max_iter=1000)
    assert abs(lz.eigenvalue - 10.0) <= 1e-3 * 10.0
    assert abs(pw.eigenvalue - 10.0) > 10 * abs(lz.eigenvalue - 10.0)


def test_float32_and_budget_exhaustion():
    A = _sym([3.0, 2.0, 1.5, 1.0, 0.5, 0.1], seed=7).float()
    v0 = torch.randn(6, generator=torch.Generator().manual_seed(0))
    res = lanczos(lambda v: A @ v, v0, tol=1e-3, max_iter=50)
    assert res.eigenvector.dtype == torch.float32
    assert res.eigenvalue == pytest.approx(3.0, rel=1e-4)
    capped = power_iteration(lambda v: A @ v, v0, tol=1e-12, max_iter=3)
    assert capped.hvps == 3 and not capped.converged


def test_zero_operator_and_exact_invariant_subspace():
    zero = lanczos(lambda v: torch.zeros_like(v), torch.ones(4, dtype=torch.float64))
    assert zero.eigenvalue == 0.0 and zero.converged and zero.residual == 0.0
    zp = power_iteration(lambda v: torch.zeros_like(v), torch.ones(4, dtype=torch.float64))
    assert zp.eigenvalue == 0.0 and zp.converged
    # a rank-one operator: Lanczos stops after one step with the exact answer
    u = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) / 3
    res = lanczos(lambda v: -4.0 * u * (u @ v), u.clone(), tol=1e-12)
    assert res.hvps == 1 and res.eigenvalue == pytest.approx(-4.0, rel=1e-12)


def test_validation():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="tol"):
        lanczos(lambda v: A @ v, torch.ones(3, dtype=torch.float64), tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        power_iteration(lambda v: A @ v, torch.ones(3, dtype=torch.float64), max_iter=0)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(lambda v: A @ v, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="1-D"):
        lanczos(lambda v: A @ v, torch.ones(3, 1))
    with pytest.raises(ValueError, match="k must"):
        top_k(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="method"):
        top_k(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 1, method="arnoldi")
    with pytest.raises(ValueError, match="shape"):
        lanczos(lambda v: v[:2], torch.ones(3, dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="iteration 0"):
        power_iteration(lambda v: v * float("nan"), torch.ones(3, dtype=torch.float64))
