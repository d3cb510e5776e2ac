import math

import pyarrow as pa
import pytest
import torch

from hawq.blocks import partition_blocks
from hawq.hessian.table import SENSITIVITY_SCHEMA, HessianConfig, analyze


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "arnoldi"),
        ("tol", 0.0),
        ("tol", float("nan")),
        ("max_iter", 0),
        ("top_k", 0),
        ("trace", 1),
        ("trace_tol", -1.0),
        ("trace_min_probes", 1),
        ("trace_max_probes", 5),
        ("seed", -1),
        ("memory_budget_mb", -1.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HessianConfig(**{field: value})


def _dense_stats(problem, blocks, dense_block_hessian):
    out = {}
    for b in blocks:
        H = dense_block_hessian(problem.model, problem.loss_fn, problem.batches, b.param_names)
        ev = torch.linalg.eigvalsh(H)
        out[b.name] = (ev[ev.abs().argsort(descending=True)], float(H.trace()))
    return out


def test_analyze_table_against_dense_hessians(make_problem, dense_block_hessian):
    prob = make_problem("residual")
    blocks = partition_blocks(prob.model, grouping="residual")
    dense = _dense_stats(prob, blocks, dense_block_hessian)
    rows = []
    config = HessianConfig(tol=1e-10, max_iter=300, top_k=2, trace_tol=1e-9, trace_max_probes=60)
    table = analyze(
        prob.model, prob.loss_fn, prob.batches, config, grouping="residual", on_row=rows.append,
        progress=False,
    )  # fmt: skip
    assert table.schema.equals(SENSITIVITY_SCHEMA)
    assert table.column("block").to_pylist() == [b.name for b in blocks]
    assert [r["block"] for r in rows] == [b.name for b in blocks]
    for row, b in zip(table.to_pylist(), blocks, strict=True):
        evals, trace = dense[b.name]
        assert row["modules"] == list(b.module_names) and row["n_params"] == b.n_params
        assert abs(row["eigenvalue"] - float(evals[0])) <= 1e-6 * abs(float(evals[0]))
        assert row["eigenvalues"] == pytest.approx(evals[:2].tolist(), rel=1e-6)
        assert row["converged"] and row["hvps"] >= 2 and row["residual"] < 1e-3
        assert row["trace_probes"] == 60 and abs(row["trace"] - trace) <= 4 * row["trace_stderr"]
        assert row["seed"] == 0 and row["seconds"] >= 0


def _without_seconds(table: pa.Table) -> pa.Table:
    return table.drop(["seconds"])


def test_same_seed_gives_bitwise_identical_table(make_problem):
    prob = make_problem("cnn_bn")
    config = HessianConfig(trace_max_probes=30, seed=5)
    a = analyze(prob.model, prob.loss_fn, prob.batches, config, progress=False)
    b = analyze(prob.model, prob.loss_fn, prob.batches, config, progress=False)
    assert _without_seconds(a).equals(_without_seconds(b))
    other = analyze(
        prob.model, prob.loss_fn, prob.batches, HessianConfig(trace_max_probes=30, seed=6),
        progress=False,
    )  # fmt: skip
    assert a.column("trace").to_pylist() != other.column("trace").to_pylist()
    assert a.column("eigenvalue").to_pylist() != other.column("eigenvalue").to_pylist()
    # ... but both estimate the same quantities
    for x, y in zip(
        a.column("eigenvalue").to_pylist(), other.column("eigenvalue").to_pylist(), strict=True
    ):
        assert x == pytest.approx(y, rel=1e-2)


def test_resume_reuses_done_rows(make_problem):
    prob = make_problem("cnn_bn")
    config = HessianConfig(trace=False, method="power", tol=1e-4)
    rows = []
    full = analyze(
        prob.model, prob.loss_fn, prob.batches, config, on_row=rows.append, progress=False
    )
    assert full.column("trace").null_count == full.num_rows  # trace=False -> nulls
    done = {rows[0]["block"]: {**rows[0], "seconds": 123.0}}
    resumed_rows = []
    resumed = analyze(
        prob.model, prob.loss_fn, prob.batches, config, done=done, on_row=resumed_rows.append,
        progress=False,
    )  # fmt: skip
    assert [r["block"] for r in resumed_rows] == [r["block"] for r in rows[1:]]
    assert resumed.column("seconds").to_pylist()[0] == 123.0  # taken as given, not recomputed
    assert _without_seconds(resumed).equals(_without_seconds(full))
    with pytest.raises(ValueError, match="seed"):
        analyze(
            prob.model, prob.loss_fn, prob.batches, HessianConfig(trace=False, seed=1), done=done,
            progress=False,
        )  # fmt: skip


def test_power_and_lanczos_agree_and_memory_budget_does_not_change_results(make_problem):
    prob = make_problem("mlp")
    base = dict(tol=1e-9, max_iter=3000, trace_max_probes=20)
    lz = analyze(prob.model, prob.loss_fn, prob.batches, HessianConfig(**base), progress=False)
    pw = analyze(
        prob.model, prob.loss_fn, prob.batches, HessianConfig(method="power", **base),
        progress=False,
    )  # fmt: skip
    recompute = analyze(
        prob.model, prob.loss_fn, prob.batches, HessianConfig(memory_budget_mb=0, **base),
        progress=False,
    )  # fmt: skip
    for x, y, z in zip(
        lz.column("eigenvalue").to_pylist(),
        pw.column("eigenvalue").to_pylist(),
        recompute.column("eigenvalue").to_pylist(),
        strict=True,
    ):
        assert math.isclose(x, y, rel_tol=1e-6) and math.isclose(x, z, rel_tol=1e-12)
    assert lz.column("trace").to_pylist() == pytest.approx(
        recompute.column("trace").to_pylist(), rel=1e-12
    )
    assert sum(lz.column("hvps").to_pylist()) < sum(pw.column("hvps").to_pylist())
