"""README claim: the Hutchinson trace is exactly the mean of ``v_p^T H v_p`` over seeded probes.

Beside the statistical check in test_trace.py (within 4 standard errors of ``Tr(H)``), this pins
the estimator itself: ``hawq.analyze``'s ``trace`` column equals ``(1/P) sum_p v_p^T H_bb v_p``
over the *same* Rademacher probes, rebuilt from the public ``hawq.rademacher_probe`` and the
documented seed derivation (``derive_seed(seed, "probe", p)``, blocks in partition order), with
``H`` the dense float64 Hessian over all blocks (one joint HVP per probe: the cross terms
``v_b^T H_bc v_c`` have mean zero but are part of each sample); and ``trace_stderr`` is their
sample standard error.
"""

from __future__ import annotations

import math

import pytest
import torch

import hawq

SEED, PROBES = 7, 9


def documented_probe(dims: dict[str, int], seed: int, p: int) -> dict[str, torch.Tensor]:
    """Probe ``p`` as docs/architecture.md describes it: one generator, blocks in order."""
    gen = torch.Generator().manual_seed(hawq.derive_seed(seed, "probe", p))
    return {
        name: (2 * torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) - 1).double()
        for name, n in dims.items()
    }


def test_trace_equals_the_dense_quadratic_forms_of_the_same_probes(grouped, dense_block_hessian):
    problem, blocks = grouped
    config = hawq.HessianConfig(
        seed=SEED, max_iter=5, trace_tol=1e-12, trace_min_probes=PROBES, trace_max_probes=PROBES
    )
    table = hawq.analyze(
        problem.model, problem.loss_fn, problem.batches, config, blocks=blocks, progress=False
    )
    rows = {r["block"]: r for r in table.to_pylist()}
    dims = {b.name: b.n_params for b in blocks}
    probes = [hawq.rademacher_probe(dims, SEED, p, dtype=torch.float64, device="cpu")
              for p in range(PROBES)]  # fmt: skip
    for p, probe in enumerate(probes):
        documented = documented_probe(dims, SEED, p)
        assert all(torch.equal(probe[b], documented[b]) for b in dims), p
    names = [n for b in blocks for n in b.param_names]  # the joint Hessian, blocks in order
    H = dense_block_hessian(problem.model, problem.loss_fn, problem.batches, names)
    assert H.shape == (sum(dims.values()),) * 2
    vs = [torch.cat([probe[b] for b in dims]) for probe in probes]
    start = 0
    for b in blocks:
        sl = slice(start, start + b.n_params)
        start += b.n_params
        # one joint HVP per probe: block b's sample is v_b^T (H v)_b, cross terms included
        samples = torch.stack([v[sl] @ (H @ v)[sl] for v in vs])
        row = rows[b.name]
        assert row["trace_probes"] == PROBES
        mean = float(samples.mean())
        assert math.isclose(row["trace"], mean, rel_tol=1e-10, abs_tol=1e-12), (b.name, row, mean)
        stderr = float(samples.std() / math.sqrt(PROBES))
        assert row["trace_stderr"] == pytest.approx(stderr, rel=1e-8, abs=1e-12), b.name
        # not the trivial case: the probes' quadratic forms differ from each other
        assert float(samples.std()) > 1e-6 * abs(mean)
        if len(blocks) > 1:  # and the cross terms v_b^T H_bc v_c (zero mean) are really there
            within = torch.stack([v[sl] @ H[sl, sl] @ v[sl] for v in vs])
            assert not torch.allclose(within, samples, rtol=1e-6)
