import dataclasses

import pytest
import torch

from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, analyze, trace_rows
from hawq.hessian.trace import hutchinson, rademacher_probe


def test_rademacher_probe_is_a_pure_function_of_seed_and_index():
    dims = {"a": 1000, "b": 7}
    p = rademacher_probe(dims, 3, 5, dtype=torch.float64, device="cpu")
    assert list(p) == ["a", "b"]
    assert p["a"].shape == (1000,) and p["a"].dtype == torch.float64
    assert set(p["a"].unique().tolist()) == {-1.0, 1.0}
    assert abs(float(p["a"].mean())) < 0.15
    again = rademacher_probe(dims, 3, 5, dtype=torch.float32, device="cpu")
    assert all(torch.equal(p[k].float(), again[k]) for k in dims)
    assert not torch.equal(
        p["a"], rademacher_probe(dims, 3, 6, dtype=torch.float64, device="cpu")["a"]
    )
    assert not torch.equal(
        p["a"], rademacher_probe(dims, 4, 5, dtype=torch.float64, device="cpu")["a"]
    )
    with pytest.raises(ValueError, match="probe"):
        rademacher_probe(dims, 3, -1, dtype=torch.float64, device="cpu")


def _sampler(op, seed):
    dims = {b.name: op.dim(b.name) for b in op.blocks}

    def sample(p):
        vs = rademacher_probe(dims, seed, p, dtype=torch.float64, device="cpu")
        hv = op.hvp_joint(vs)
        return {b: float(vs[b] @ hv[b]) for b in dims}

    return sample


def test_hutchinson_within_four_stderr_of_dense_trace(grouped, dense_block_hessian):
    problem, blocks = grouped
    dense = {
        b.name: float(
            dense_block_hessian(
                problem.model, problem.loss_fn, problem.batches, b.param_names
            ).trace()
        )
        for b in blocks
    }
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        res = hutchinson(_sampler(op, 0), [b.name for b in blocks], tol=1e-9, max_probes=150)
    for b in blocks:
        r = res[b.name]
        assert r.probes == 150 and not r.converged
        assert r.stderr > 0 and abs(r.mean - dense[b.name]) <= 4 * r.stderr, (b.name, r, dense)


def test_hutchinson_approaches_the_trace_as_probes_grow():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    A = m + m.T
    tr = float(A.trace())

    def sample(p):
        v = rademacher_probe({"A": 60}, 1, p, dtype=torch.float64, device="cpu")["A"]
        return {"A": float(v @ A @ v)}

    few = hutchinson(sample, ["A"], tol=1e-9, min_probes=20, max_probes=20)["A"]
    many = hutchinson(sample, ["A"], tol=1e-9, min_probes=20, max_probes=2000)["A"]
    assert few.probes == 20 and many.probes == 2000
    assert many.stderr < few.stderr / 5  # ~ 1/sqrt(probes): 10x expected
    assert abs(few.mean - tr) <= 4 * few.stderr
    assert abs(many.mean - tr) <= 4 * many.stderr
    assert abs(many.mean - tr) < 0.5 * few.stderr


def test_freezing_order_and_stop():
    """A zero-variance block freezes at min_probes; probes are consumed in order; stop when done."""
    calls = []
    gen = torch.Generator().manual_seed(2)
    noisy = torch.randn(500, generator=gen, dtype=torch.float64) + 3.0

    def sample(p):
        calls.append(p)
        return {"exact": 2.5, "noisy": float(noisy[p])}

    res = hutchinson(sample, ["exact", "noisy"], tol=0.02, min_probes=5, max_probes=500)
    assert res["exact"].probes == 5 and res["exact"].mean == 2.5 and res["exact"].stderr == 0
    assert res["exact"].converged
    n = res["noisy"].probes
    assert calls == list(range(n)) and 5 <= n < 500 and res["noisy"].converged
    assert res["noisy"].mean == pytest.approx(float(noisy[:n].mean()), rel=1e-12)
    assert res["noisy"].stderr == pytest.approx(float(noisy[:n].std() / n**0.5), rel=1e-9)
    assert res["noisy"].stderr <= 0.02 * abs(res["noisy"].mean)
    # the estimate at n probes depends only on the first n samples: recomputing them in any
    # order elsewhere and feeding them in order gives the identical result
    cached = {p: sample(p) for p in reversed(range(n))}
    again = hutchinson(
        cached.__getitem__, ["exact", "noisy"], tol=0.02, min_probes=5, max_probes=500
    )
    assert again == res


def test_validation():
    ok = lambda p: {"a": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match="tol"):
        hutchinson(ok, ["a"], tol=0)
    with pytest.raises(ValueError, match="min_probes"):
        hutchinson(ok, ["a"], min_probes=1)
    with pytest.raises(ValueError, match="max_probes"):
        hutchinson(ok, ["a"], min_probes=10, max_probes=5)
    with pytest.raises(ValueError, match="blocks"):
        hutchinson(ok, [])
    with pytest.raises(ValueError, match="no sample for block 'b'"):
        hutchinson(ok, ["a", "b"])
    with pytest.raises(FloatingPointError, match="probe 0"):
        hutchinson(lambda p: {"a": float("nan")}, ["a"])


@pytest.mark.parametrize("method", ["hutchinson", "deflated"])
def test_traces_do_not_depend_on_the_probe_chunk(make_problem, method):
    """Every uncached batch rebuilt per chunk (budget 0): the same table for K = 1, 3, 8."""
    prob = make_problem("cnn_bn")
    tables = {}
    for chunk in (1, 3, 8):
        config = HessianConfig(trace_method=method, trace_tol=0.2, trace_max_probes=30, seed=3,
                               trace_probe_chunk=chunk, memory_budget_mb=0)  # fmt: skip
        table = analyze(prob.model, prob.loss_fn, prob.batches, config, progress=False)
        tables[chunk] = table.drop(["seconds"]).to_pylist()
    # a block froze inside a chunk of 3 and of 8, while others went on to the last probe
    assert any(r["trace_probes"] % 3 and r["trace_probes"] % 8 for r in tables[1])
    assert any(r["trace_probes"] == 30 for r in tables[1])
    assert tables[3] == tables[1] and tables[8] == tables[1]  # bitwise


def test_chunks_build_each_uncached_graph_once_and_resume_skips_done_probes(make_problem):
    prob = make_problem("mlp")  # 3 batches, none cached below
    config = HessianConfig(trace_tol=1e-9, trace_min_probes=5, trace_max_probes=10,
                           trace_probe_chunk=4, memory_budget_mb=0)  # fmt: skip

    def run(done=None):
        saved: dict[int, dict] = {}
        with HessianOperator(prob.model, prob.loss_fn, prob.batches, memory_budget_bytes=0) as op:
            builds = []
            gradients = op._gradients
            op._gradients = lambda j, *a, **k: builds.append(j) or gradients(j, *a, **k)
            rows = trace_rows(op, config, probes=done, on_probe=saved.__setitem__)
        return rows, saved, op.hvp_count, len(builds)

    rows, saved, hvps, builds = run()
    assert sorted(saved) == list(range(10)) and hvps == 10
    assert builds == 3 * 3  # chunks 0-3, 4-7, 8-9: each of the 3 batches built once per chunk
    ones = dataclasses.replace(config, trace_probe_chunk=1)
    with HessianOperator(prob.model, prob.loss_fn, prob.batches) as op:
        assert trace_rows(op, ones) == rows
    done = {p: saved[p] for p in (1, 5)}
    resumed, fresh, hvps, builds = run(done)
    assert resumed == rows
    assert sorted(fresh) == [0, 2, 3, 4, 6, 7, 8, 9] and hvps == 8 and builds == 2 * 3
    assert all(fresh[p] == saved[p] for p in fresh)
