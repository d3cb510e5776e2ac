"""The caching plan (``pipeline.backends.plan``) and the graph-memory estimate it rests on.

Ground truth: hand-computed caching numbers and grid choices, and the operator itself (the
graph bytes it measures on a full batch, the batches it really caches under a budget).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from hawq.blocks import partition_blocks
from hawq.hessian.graph_cache import batches_to_cache
from hawq.hessian.memory import GraphMemory, estimate_graph_memory
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig
from pipeline.backends.base import HessianJob
from pipeline.backends.local import LocalBackend
from pipeline.backends.plan import cache_plan, default_data_shards, max_data_shards

MB = 2**20
# one graph of 128 samples: 1 MB + 128 x 1.5 MB = 193 MB
MEMORY = GraphMemory(fixed_bytes=1 * MB, per_sample_bytes=1.5 * MB)
GRAPH = 193 * MB


def test_batches_to_cache_is_the_prefix_that_fits():
    # per sample 10 bytes (from the first batch: 60 bytes / 6 samples)
    assert batches_to_cache([6, 3, 9], 60, None) == 3
    assert batches_to_cache([6, 3, 9], 60, 0) == 0
    assert batches_to_cache([6, 3, 9], 60, 59) == 0
    assert batches_to_cache([6, 3, 9], 60, 90) == 2  # 60 + 30 fits, + 90 does not
    assert batches_to_cache([6, 3, 9], 60, 179) == 2
    assert batches_to_cache([6, 3, 9], 60, 180) == 3


def test_plan_of_16_batches_with_an_8_graph_budget():
    budget = int(8.5 * GRAPH)
    one = cache_plan([128] * 16, MEMORY, budget, 1)
    assert one.graph_bytes == GRAPH and one.batch_size == 128
    assert [(s.batches, s.cached, s.rebuilt) for s in one.shards] == [(16, 8, 8)]
    assert one.shards[0].cached_bytes == 8 * GRAPH and not one.all_cached
    two = cache_plan([128] * 16, MEMORY, budget, 2, block_groups=3)
    assert [(s.shard, s.batches, s.cached, s.rebuilt) for s in two.shards] == [
        (0, 8, 8, 0),
        (1, 8, 8, 0),
    ]
    assert two.all_cached and two.block_groups == 3
    text = two.describe()
    assert "grid 2 x 3" in text and "graph ~193 MB" in text and "1640 MB" in text
    assert "shard 1: 8 batch(es), caches 8 (~1544 MB), rebuilds 0" in text
    assert "all 16 batches cached" in text
    assert "8 of 16 batches are rebuilt on every HVP" in one.describe()


def test_plan_with_unequal_batches_and_no_cap():
    # shards of [100, 50, 100] and [100, 28]; the operator scales the first batch per sample
    sizes = [100, 100, 50, 28, 100]
    mem = GraphMemory(fixed_bytes=0, per_sample_bytes=1000)
    plan = cache_plan(sizes, mem, 200_000, 2)
    assert [(s.batches, s.cached, s.cached_bytes) for s in plan.shards] == [
        (3, 2, 150_000),  # 100k + 50k fits 200k, + 100k does not
        (2, 2, 128_000),
    ]
    assert [s.cached for s in cache_plan(sizes, mem, None, 1).shards] == [5]
    with pytest.raises(ValueError, match="data_shards"):
        cache_plan(sizes, mem, None, 6)


@pytest.mark.parametrize(
    ("budget_graphs", "max_shards", "want_d", "all_cached"),
    [
        (3, 8, 6, True),  # ceil(16 / 6) = 3 graphs per shard; 5 shards would need 4
        (3, 4, 4, False),  # the cluster places 4: each caches 3 of its 4
        (16, 8, 1, True),  # one process holds all
        (0, 8, 8, False),  # nothing fits anywhere: as many shards as the cluster places
        (1, 32, 16, True),  # one graph each: one shard per batch (capped by the batches)
    ],
)
def test_default_grid_is_the_fewest_shards_that_cache_everything(
    budget_graphs, max_shards, want_d, all_cached
):
    budget = int((budget_graphs + 0.5) * GRAPH) if budget_graphs else 0
    plan = default_data_shards([128] * 16, MEMORY, budget, max_shards=max_shards)
    assert plan.data_shards == want_d and plan.all_cached == all_cached
    assert "data_shards chosen" in plan.describe()
    assert default_data_shards([128] * 16, MEMORY, None, max_shards=8).data_shards == 1


def test_max_data_shards_from_cluster_resources():
    res = {"CPU": 16.0, "GPU": 2.0}
    assert max_data_shards(res, block_groups=2, cpus_per_actor=1.5, gpus_per_actor=0) == 5
    assert max_data_shards(res, block_groups=2, cpus_per_actor=1.5, gpus_per_actor=0.5) == 2
    assert max_data_shards(res, block_groups=1, cpus_per_actor=0, gpus_per_actor=0) == 2**31
    assert max_data_shards({"CPU": 1.0}, block_groups=4, cpus_per_actor=1, gpus_per_actor=0) == 1


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual"])
def test_graph_memory_estimate_matches_the_operators_measurement(make_problem, name):
    prob = make_problem(name)
    blocks = partition_blocks(prob.model)
    mem = estimate_graph_memory(prob.model, prob.loss_fn, prob.batches[0], blocks)
    with HessianOperator(prob.model, prob.loss_fn, prob.batches, blocks) as op:
        for j, (x, _) in enumerate(prob.batches):
            assert mem.batch_bytes(x.shape[0]) == pytest.approx(op.measure_graph_bytes(j), rel=1e-9)
    one = [(prob.batches[0][0][:1], prob.batches[0][1][:1])]
    single = estimate_graph_memory(prob.model, prob.loss_fn, one[0], blocks)
    assert single.fixed_bytes == 0 and single.batch_bytes(1) == mem.batch_bytes(1)


def test_local_backend_logs_the_plan_the_operator_follows(make_problem, caplog):
    prob = make_problem("mlp")  # batches of 6, 3, 9 samples
    blocks = partition_blocks(prob.model)
    mem = estimate_graph_memory(prob.model, prob.loss_fn, prob.batches[0], blocks)
    budget_mb = 1.75 * mem.batch_bytes(6) / MB  # the first two (9 samples) fit, not all 18
    config = HessianConfig(tol=1e-6, trace=False, memory_budget_mb=budget_mb)
    state = {k: v.clone() for k, v in prob.model.state_dict().items()}
    model = prob.model
    job = HessianJob(build_model=lambda: model, state_dict=state, loss_fn=prob.loss_fn,
                     batches=prob.batches, blocks=blocks, config=config,
                     dtype=torch.float64)  # fmt: skip
    backend = LocalBackend()
    with caplog.at_level(logging.INFO, logger="pipeline.backends.plan"):
        backend.run(job, progress=False)
    plan = backend.plan
    assert [(s.batches, s.cached, s.rebuilt) for s in plan.shards] == [(3, 2, 1)]
    assert "grid 1 x 1" in caplog.text and "caches 2" in caplog.text
    assert "1 of 3 batches are rebuilt on every HVP" in caplog.text
    with HessianOperator(model, prob.loss_fn, prob.batches, blocks,
                         memory_budget_bytes=config.memory_budget_bytes) as op:  # fmt: skip
        op.hvp(blocks[0].name, torch.ones(op.dim(blocks[0].name), dtype=torch.float64))
        assert op.cached_batches == plan.shards[0].cached
        assert op.graph_bytes == pytest.approx(plan.shards[0].cached_bytes, abs=2)


def test_grid_plan_uses_the_per_actor_budget_and_the_cluster(make_problem):
    from pipeline.backends.plan import grid_plan
    from pipeline.backends.ray.config import RayBackendConfig

    prob = make_problem("mlp")  # batches of 6, 3, 9 samples
    blocks = partition_blocks(prob.model)
    model = prob.model
    job = HessianJob(build_model=lambda: model, state_dict=model.state_dict(),
                     loss_fn=prob.loss_fn, batches=prob.batches, blocks=blocks,
                     config=HessianConfig(memory_budget_mb=None), dtype=torch.float64)  # fmt: skip
    mem = estimate_graph_memory(model, prob.loss_fn, prob.batches[0], blocks)
    per_sample = mem.batch_bytes(6) / 6
    # 10 samples' graphs per actor: D = 1 (18) and D = 2 ([6, 9] = 15) do not fit, D = 3 does
    cfg = RayBackendConfig(memory_budget_mb=10.5 * per_sample / MB, cpus_per_actor=1)
    plan = grid_plan(job, cfg, {"CPU": 8.0})
    assert plan.data_shards == 3 and plan.all_cached
    assert grid_plan(job, cfg, {"CPU": 2.0}).data_shards == 2  # what 2 CPUs place
    fixed = grid_plan(job, RayBackendConfig(data_shards=1, cpus_per_actor=1), {"CPU": 8.0})
    assert fixed.data_shards == 1 and fixed.all_cached and fixed.chosen == ""  # job: no cap
    with pytest.raises(ValueError, match="no batches"):
        grid_plan(dataclasses.replace(job, batches=[]), cfg, {"CPU": 8.0})
