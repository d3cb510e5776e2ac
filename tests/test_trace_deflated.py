"""Krylov-deflated Hutchinson traces against dense float64 Hessians (tiny networks)."""

import logging
import statistics

import pytest
import torch

from hawq.blocks import partition_blocks
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, analyze, block_eigen
from hawq.hessian.trace import hutchinson, joint_probe_samples, rademacher_probe
from hawq.hessian.trace_deflated import Deflation

PROBES = 150


def _dense(problem, blocks, dense_block_hessian):
    return {
        b.name: dense_block_hessian(problem.model, problem.loss_fn, problem.batches, b.param_names)
        for b in blocks
    }


def _samples(op, blocks, deflation, probes=PROBES):
    dims = {b.name: op.dim(b.name) for b in blocks}
    out = []
    for p in range(probes):
        vs = rademacher_probe(dims, 0, p, dtype=torch.float64, device="cpu")
        out.append(joint_probe_samples(op, vs, deflation))
    return out


def test_exact_part_is_the_projected_dense_trace_and_the_basis_is_orthonormal(
    grouped, dense_block_hessian
):
    problem, blocks = grouped
    dense = _dense(problem, blocks, dense_block_hessian)
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        tops = {b.name: block_eigen(op, b, HessianConfig())[1] for b in blocks}
    for b in blocks:
        q = tops[b.name].basis
        assert q.shape[0] == tops[b.name].hvps and q.shape[1] == b.n_params
        torch.testing.assert_close(
            q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12, rtol=0
        )
        exact = float((q @ dense[b.name] @ q.T).trace())
        assert abs(tops[b.name].basis_trace - exact) <= 1e-10, (b.name, exact)


def test_deflated_mean_matches_dense_trace_with_lower_variance_on_the_same_probes(
    grouped, dense_block_hessian
):
    problem, blocks = grouped
    dense = _dense(problem, blocks, dense_block_hessian)
    names = [b.name for b in blocks]
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        tops = {b.name: block_eigen(op, b, HessianConfig())[1] for b in blocks}
        deflation = Deflation.from_eigen(tops)
        plain = _samples(op, blocks, None)
        deflated = _samples(op, blocks, deflation)
    res = hutchinson(lambda p: deflated[p], names, tol=1e-12, max_probes=PROBES)
    for b in names:
        r, truth = res[b], float(dense[b].trace())
        assert r.probes == PROBES and r.stderr > 0
        assert abs(r.mean - truth) <= 4 * r.stderr, (b, r, truth)
        var_plain = statistics.variance(s[b] for s in plain)
        var_deflated = statistics.variance(s[b] for s in deflated)
        assert var_deflated < var_plain, (b, var_deflated, var_plain)


def test_a_basis_spanning_every_block_gives_the_exact_trace_with_zero_variance(
    grouped, dense_block_hessian
):
    problem, blocks = grouped
    dense = _dense(problem, blocks, dense_block_hessian)
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        full = {b.name: torch.eye(b.n_params, dtype=torch.float64).flip(0) for b in blocks}
        deflation = Deflation.from_vectors(op, full)
        samples = _samples(op, blocks, deflation, probes=5)
    for b in blocks:
        truth = float(dense[b.name].trace())
        values = [s[b.name] for s in samples]
        assert max(values) == min(values), (b.name, values)
        assert abs(values[0] - truth) <= 1e-10 * max(1.0, abs(truth)), (b.name, values[0], truth)


def _plain_traces(problem, config):
    """Today's estimator written out: one joint HVP per Rademacher probe, ``v_b^T (H v)_b``."""
    with HessianOperator(problem.model, problem.loss_fn, problem.batches) as op:
        dims = {b.name: op.dim(b.name) for b in op.blocks}

        def sample(p):
            vs = rademacher_probe(dims, config.seed, p, dtype=op.dtype, device=op.device)
            hv = op.hvp_joint(vs)
            return {b: float(vs[b].double() @ hv[b].double()) for b in dims}

        res = hutchinson(sample, list(dims), tol=config.trace_tol,
                         max_probes=config.trace_max_probes,
                         min_probes=config.trace_min_probes)  # fmt: skip
    return {b: (r.mean, r.stderr, r.probes) for b, r in res.items()}


def test_plain_path_is_unchanged(make_problem):
    problem = make_problem("cnn_bn")
    config = HessianConfig(trace_tol=0.2, trace_max_probes=30, seed=3)
    assert config.trace_method == "hutchinson"
    table = analyze(problem.model, problem.loss_fn, problem.batches, config, progress=False)
    got = {
        r["block"]: (r["trace"], r["trace_stderr"], r["trace_probes"]) for r in table.to_pylist()
    }
    assert got == _plain_traces(problem, config)  # bitwise


def test_analyze_deflated_against_dense_traces_and_resume(make_problem, dense_block_hessian):
    problem = make_problem("residual")
    config = HessianConfig(trace_method="deflated", trace_tol=1e-9, trace_max_probes=60)
    rows = []
    table = analyze(problem.model, problem.loss_fn, problem.batches, config,
                    grouping="residual", on_row=rows.append, progress=False)  # fmt: skip
    plain = analyze(problem.model, problem.loss_fn, problem.batches,
                    HessianConfig(trace_tol=1e-9, trace_max_probes=60), grouping="residual",
                    progress=False)  # fmt: skip
    blocks = {b.name: b for b in partition_blocks(problem.model, grouping="residual")}
    for r, p in zip(table.to_pylist(), plain.to_pylist(), strict=True):
        dense = dense_block_hessian(
            problem.model, problem.loss_fn, problem.batches, blocks[r["block"]].param_names
        )
        truth = float(dense.trace())
        assert r["trace_probes"] == 60
        assert abs(r["trace"] - truth) <= 4 * r["trace_stderr"], (r, truth)
        assert r["trace_stderr"] < p["trace_stderr"], (r, p)
        assert r["eigenvalue"] == p["eigenvalue"]  # the eigen columns do not depend on it
    # resume: done rows carry no basis; it is rebuilt, so the traces are bitwise the same
    done = {row["block"]: row for row in rows[:2]}
    resumed = analyze(problem.model, problem.loss_fn, problem.batches, config,
                      grouping="residual", done=done, progress=False)  # fmt: skip
    assert resumed.drop_columns(["seconds"]).equals(table.drop_columns(["seconds"]))


def test_power_iteration_falls_back_to_plain_probes_with_a_warning(make_problem, caplog):
    problem = make_problem("mlp")
    kw = dict(method="power", trace_tol=0.2, trace_max_probes=30)
    config = HessianConfig(trace_method="deflated", **kw)
    with caplog.at_level(logging.WARNING, logger="hawq.hessian.trace_deflated"):
        deflated = analyze(problem.model, problem.loss_fn, problem.batches, config, progress=False)
    assert "plain Hutchinson" in caplog.text and "method='lanczos'" in caplog.text
    plain = analyze(problem.model, problem.loss_fn, problem.batches, HessianConfig(**kw),
                    progress=False)  # fmt: skip
    cols = ["trace", "trace_stderr", "trace_probes"]
    assert deflated.select(cols).equals(plain.select(cols))


@pytest.mark.parametrize("value", ["hutch++", "", None, 1])
def test_config_rejects_unknown_trace_methods(value):
    with pytest.raises(ValueError, match="trace_method must be one of"):
        HessianConfig(trace_method=value)


def test_deflation_validates_its_inputs():
    q = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same blocks"):
        Deflation(bases={"a": q}, exact={})
    with pytest.raises(ValueError, match="bases\\['a'\\]"):
        Deflation(bases={"a": q[0]}, exact={"a": 1.0})
    with pytest.raises(ValueError, match="finite"):
        Deflation(bases={"a": q}, exact={"a": float("nan")})


# ----------------------------------------------------------------------------- pipeline
PIPELINE_BASE = {
    "model": {"name": "cifar_resnet20"},
    "data": {"name": "cifar10", "path": "x.npz"},
    "allocation": {"compression": 13},
}


def _config(hessian=None, backend=None):
    from pipeline.config import config_from_dict

    data = {**PIPELINE_BASE, "hessian": hessian or {}, "backend": backend or {}}
    return config_from_dict(data)


def test_pipeline_key_is_validated_and_reaches_hawq():
    from pipeline.config import ConfigError

    assert _config().hessian.to_hawq().trace_method == "hutchinson"
    assert _config({"trace_method": "deflated"}).hessian.to_hawq().trace_method == "deflated"
    with pytest.raises(ConfigError, match="hessian.trace_method: 'hutch' is not a valid choice"):
        _config({"trace_method": "hutch"})
    with pytest.raises(ConfigError, match="hessian.trace_method: .*needs hessian.method: lanczos"):
        _config({"trace_method": "deflated", "method": "power"})
    ray = _config({"trace_method": "deflated"}, {"kind": "ray", "data_shards": 2})
    assert ray.hessian.to_hawq().trace_method == "deflated"


def test_local_backend_runs_the_deflated_estimator(make_problem):
    from pipeline.backends.base import HessianJob
    from pipeline.backends.local import LocalBackend

    problem = make_problem("mlp")
    config = HessianConfig(trace_method="deflated", trace_tol=0.1, trace_max_probes=40)
    job = HessianJob(
        build_model=lambda: make_problem("mlp").model,
        state_dict=problem.model.state_dict(),
        loss_fn=problem.loss_fn,
        batches=problem.batches,
        blocks=partition_blocks(problem.model),
        config=config,
        dtype=torch.float64,
    )
    got = LocalBackend().run(job, progress=False)
    want = analyze(problem.model, problem.loss_fn, problem.batches, config, progress=False)
    assert got.drop_columns(["seconds"]).equals(want.drop_columns(["seconds"]))


def test_ray_backend_deflated_matches_single_process_through_a_killed_actor_and_resume():
    """2 shards x 2 groups on a real local Ray; an actor killed mid-probes gets the bases again."""
    import ray
    from test_ray_backend import OBJECT_STORE, assert_same_rows, backend_config, make_job

    from hawq.hessian.table import EIGEN_COLUMNS
    from pipeline.backends.ray.backend import RayBackend

    config = HessianConfig(tol=1e-6, trace_method="deflated", trace_tol=0.05,
                           trace_min_probes=6, trace_max_probes=24)  # fmt: skip
    job = make_job(config)
    model = job.instantiate()
    truth = analyze(model, job.loss_fn, job.batches, config, blocks=job.blocks, progress=False)
    plain_config = HessianConfig(tol=1e-6, trace_tol=0.05, trace_min_probes=6, trace_max_probes=24)
    plain = analyze(model, job.loss_fn, job.batches, plain_config, blocks=job.blocks,
                    progress=False)  # fmt: skip
    assert truth.column("trace").to_pylist() != plain.column("trace").to_pylist()
    truth = truth.to_pylist()
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False)
    backend = RayBackend(backend_config(2, 2))
    killed: list[int] = []

    def hook(event: str, info: dict) -> None:
        if event == "submit" and info["kind"] == "probe" and 3 in info["key"] and not killed:
            killed.append(info["group"])
            ray.kill(backend.actors[info["group"]][0], no_restart=False)

    try:
        backend.on_event = hook
        table = backend.run(job, progress=False)
        backend.on_event = None
        assert killed and backend.stats["recoveries"] >= 1
        assert_same_rows(table.to_pylist(), truth)
        done = {truth[0]["block"]: {c: truth[0][c] for c in EIGEN_COLUMNS}}
        resumed = backend.run(job, done=done, progress=False)
        assert backend.stats["bases_rebuilt"] == 1
        assert backend.stats["blocks_computed"] == len(truth) - 1
        assert_same_rows(resumed.to_pylist(), truth)
    finally:
        backend.close()
        ray.shutdown()
