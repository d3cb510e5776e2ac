"""The one-sample estimate of a batch's first-order graph, and the budget check before any work.

Ground truth for the estimate is the operator's own measurement of the real batch's graph
(every saved tensor counted while the graph is built). The check must fail before any
Hessian work: the only forward passes allowed are the estimate's, on one sample.
"""

from __future__ import annotations

import pytest
import torch

from hawq.blocks import partition_blocks
from hawq.hessian.memory import (
    MB,
    GraphMemory,
    MemoryBudgetError,
    check_memory_budget,
    estimate_graph_memory,
)
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, analyze


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual"])
def test_estimate_bounds_the_measured_graph_and_a_passing_budget_caches_it(name, make_problem):
    prob = make_problem(name)
    blocks = partition_blocks(prob.model)
    memory = estimate_graph_memory(prob.model, prob.loss_fn, prob.batches[0], blocks)
    assert memory.fixed_bytes >= sum(b.n_params for b in blocks) * 8  # float64 gradients + ...
    for x, y in prob.batches:
        n = x.shape[0]
        with HessianOperator(
            prob.model, prob.loss_fn, [(x, y)], blocks, memory_budget_bytes=2**40
        ) as op:
            op.hvp(blocks[0].name, torch.ones(blocks[0].n_params, dtype=torch.float64))
            measured = op.graph_bytes
        # the 1- and 2-sample fit is exact for these batch-affine graphs
        assert memory.batch_bytes(n) == pytest.approx(measured, rel=1e-9), (n, measured, memory)
        check_memory_budget(memory, n, memory.batch_bytes(n) / MB)  # exactly enough: passes
        with HessianOperator(
            prob.model, prob.loss_fn, [(x, y)], blocks, memory_budget_bytes=memory.batch_bytes(n)
        ) as op:
            op.hvp(blocks[0].name, torch.ones(blocks[0].n_params, dtype=torch.float64))
            assert op.cached_batches == 1


def test_budget_below_one_graph_fails_before_any_work_and_the_fixes_work(make_problem):
    prob = make_problem("cnn_bn")  # batches of 4 and 7
    seen: list[int] = []
    hook = prob.model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    memory = estimate_graph_memory(prob.model, prob.loss_fn, prob.batches[0])
    need = memory.batch_bytes(7)
    budget_mb = (memory.batch_bytes(4) + memory.batch_bytes(5)) / 2 / MB  # 4 fit, 7 do not
    rows = []
    seen.clear()
    prob.model.train()
    config = HessianConfig(memory_budget_mb=budget_mb, trace=False, max_iter=5)
    with pytest.raises(MemoryBudgetError) as info:
        analyze(prob.model, prob.loss_fn, prob.batches, config, on_row=rows.append, progress=False)
    message = str(info.value)
    assert message.startswith(f"memory_budget_mb={budget_mb:g} cannot hold one Hessian batch")
    assert f"~{need / MB:.3g} MB for a batch of 7" in message  # < 100 MB: 3 significant digits
    assert "Fix: lower the Hessian batch size to <= 4 or raise memory_budget_mb to >=" in message
    assert rows == [] and seen == [1, 2]  # only the estimate's 1- and 2-sample forwards ran
    assert all(m.training for m in prob.model.modules())  # train mode restored

    # the suggested fixes: batches of <= 4, or the budget raised to the printed value
    small = [(x[:4], y[:4]) for x, y in prob.batches]
    n_blocks = len(partition_blocks(prob.model))
    assert analyze(prob.model, prob.loss_fn, small, config, progress=False).num_rows == n_blocks
    raised = float(message.rsplit(">= ", 1)[1])
    config = HessianConfig(memory_budget_mb=raised, trace=False, max_iter=5)
    table = analyze(prob.model, prob.loss_fn, prob.batches, config, progress=False)
    assert table.num_rows == n_blocks
    for unlimited in (None, 0.0):  # no cap / no caching on purpose: never an error
        config = HessianConfig(memory_budget_mb=unlimited, trace=False, max_iter=5)
        assert analyze(prob.model, prob.loss_fn, prob.batches, config, progress=False).num_rows
    hook.remove()


def test_check_names_the_given_keys_and_drops_an_impossible_batch_fix() -> None:
    memory = GraphMemory(per_sample_bytes=2 * MB, fixed_bytes=10 * MB)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(
            memory, 32, 20, key="hessian.memory_budget_mb", batch_key="data.hessian_batch_size"
        )
    assert str(info.value) == (
        "hessian.memory_budget_mb=20 cannot hold one Hessian batch's first-order graph: "
        "~74 MB for a batch of 32 (2 MB per sample + 10 MB of gradients). "
        "Fix: lower data.hessian_batch_size to <= 5 or raise hessian.memory_budget_mb to >= 74"
    )
    resnet50_like = GraphMemory(per_sample_bytes=80 * MB, fixed_bytes=100 * MB)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory_budget(resnet50_like, 128, 4096)
    assert "~10340 MB for a batch of 128 (80 MB per sample + 100 MB of gradients)" in str(
        info.value
    )
    assert str(info.value).endswith("to <= 49 or raise memory_budget_mb to >= 10340")
    with pytest.raises(MemoryBudgetError, match=r"Fix: raise memory_budget_mb to >= 12$"):
        check_memory_budget(memory, 1, 5)  # not even one sample fits: only the raise
