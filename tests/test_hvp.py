import copy
import threading
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq.blocks import partition_blocks
from hawq.hessian.operator import HessianError, HessianOperator


def _close(a, b, tol):
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale) <= tol


def test_block_hvp_matches_dense_block_hessian(grouped, dense_block_hessian):
    problem, blocks = grouped
    gen = torch.Generator().manual_seed(0)
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        assert op.n_samples == sum(x.shape[0] for x, _ in problem.batches)
        for b in blocks:
            H = dense_block_hessian(problem.model, problem.loss_fn, problem.batches, b.param_names)
            assert op.dim(b.name) == b.n_params == H.shape[0]
            for _ in range(2):
                v = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
                assert _close(op.hvp(b.name, v), H @ v, 1e-10)
        assert op.hvp_count == 2 * len(blocks)


def test_joint_hvp_is_full_hessian_on_union_of_blocks(problem, dense_block_hessian):
    blocks = partition_blocks(problem.model)
    names = [p for b in blocks for p in b.param_names]
    H = dense_block_hessian(problem.model, problem.loss_fn, problem.batches, names)
    gen = torch.Generator().manual_seed(1)
    vs = {b.name: torch.randn(b.n_params, generator=gen, dtype=torch.float64) for b in blocks}
    with HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as op:
        out = op.hvp_joint(vs)
        assert list(out) == [b.name for b in blocks]
        assert _close(torch.cat(list(out.values())), H @ torch.cat(list(vs.values())), 1e-10)
        # a subset: v is zero on the other blocks, the result restricted to the subset
        sub = [blocks[0], blocks[-1]]
        sizes = [b.n_params for b in blocks]
        v_full = torch.cat(
            [
                vs[b.name] if b in sub else torch.zeros(b.n_params, dtype=torch.float64)
                for b in blocks
            ]
        )
        expected = dict(zip([b.name for b in blocks], (H @ v_full).split(sizes), strict=True))
        got = op.hvp_joint({b.name: vs[b.name] for b in sub})
        assert list(got) == [b.name for b in sub]
        for b in sub:
            assert _close(got[b.name], expected[b.name], 1e-10)


def test_multi_batch_equals_sample_weighted_concatenated_batch(problem):
    sizes = [x.shape[0] for x, _ in problem.batches]
    assert len(set(sizes)) > 1  # unequal batches
    cat = [(torch.cat([x for x, _ in problem.batches]), torch.cat([y for _, y in problem.batches]))]
    blocks = partition_blocks(problem.model)
    gen = torch.Generator().manual_seed(2)
    with (
        HessianOperator(problem.model, problem.loss_fn, problem.batches, blocks) as multi,
        HessianOperator(problem.model, problem.loss_fn, cat, blocks) as single,
    ):
        for b in blocks:
            v = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            assert _close(multi.hvp(b.name, v), single.hvp(b.name, v), 1e-10)


def test_recompute_and_partial_cache_equal_full_cache(make_problem):
    prob = make_problem("mlp")  # batches of 6, 3, 9 samples
    blocks = partition_blocks(prob.model)
    gen = torch.Generator().manual_seed(3)
    vs = [torch.randn(b.n_params, generator=gen, dtype=torch.float64) for b in blocks]
    with HessianOperator(prob.model, prob.loss_fn, prob.batches, blocks) as op:
        ref = [op.hvp(b.name, v) for b, v in zip(blocks, vs, strict=True)]
        assert op.cached_batches == 3
    with HessianOperator(
        prob.model, prob.loss_fn, prob.batches, blocks, memory_budget_bytes=2**40
    ) as op:
        op.hvp(blocks[0].name, vs[0])
        assert op.cached_batches == 3 and op.graph_bytes > 0
        per_sample = op.graph_bytes / 18
    for budget, n_cached in [(0, 0), (int(per_sample * 9.5), 2)]:
        with HessianOperator(
            prob.model, prob.loss_fn, prob.batches, blocks, memory_budget_bytes=budget
        ) as op:
            for b, v, r in zip(blocks, vs, ref, strict=True):
                for _ in range(2):  # recomputed graphs are rebuilt on every call
                    assert _close(op.hvp(b.name, v), r, 1e-12)
                assert op.cached_batches == n_cached


@pytest.mark.parametrize("cached", [0, 2, 3])
def test_hvp_joint_many_equals_single_products_and_dense(make_problem, dense_block_hessian, cached):
    """K vectors through one graph per batch == K ``hvp_joint`` calls == the dense product; an
    uncached batch's graph is built once per call, whatever K."""
    prob = make_problem("mlp")  # batches of 6, 3, 9 samples
    blocks = partition_blocks(prob.model)
    names = [p for b in blocks for p in b.param_names]
    H = dense_block_hessian(prob.model, prob.loss_fn, prob.batches, names)
    gen = torch.Generator().manual_seed(5)
    vss = [
        {b.name: torch.randn(b.n_params, generator=gen, dtype=torch.float64) for b in blocks}
        for _ in range(3)
    ]
    with HessianOperator(prob.model, prob.loss_fn, prob.batches, blocks) as op:
        per_sample = op.measure_graph_bytes() / prob.batches[0][0].shape[0]
    budget = {0: 0, 2: int(per_sample * 9.5), 3: None}[cached]
    with HessianOperator(
        prob.model, prob.loss_fn, prob.batches, blocks, memory_budget_bytes=budget
    ) as op:
        builds = []
        gradients = op._gradients
        op._gradients = lambda j, *a, **k: builds.append(j) or gradients(j, *a, **k)
        many = op.hvp_joint_many(vss)
        assert op.cached_batches == cached and op.hvp_count == 3
        # the cache is filled on the first call (every batch it keeps), then each uncached
        # batch is rebuilt once for the 3 vectors
        assert sorted(builds) == sorted([*range(cached), *range(cached, 3)])
        builds.clear()
        again = op.hvp_joint_many(vss)
        assert sorted(builds) == list(range(cached, 3))
        singles = [op.hvp_joint(vs) for vs in vss]
        assert op.hvp_count == 9
    for vs, got, got2, single in zip(vss, many, again, singles, strict=True):
        assert list(got) == [b.name for b in blocks]
        want = H @ torch.cat(list(vs.values()))
        assert _close(torch.cat(list(got.values())), want, 1e-10)
        for b in blocks:  # bitwise: the chunking changes no floating-point operation
            assert torch.equal(got[b.name], single[b.name])
            assert torch.equal(got2[b.name], single[b.name])


def test_hvp_joint_many_on_a_subset_and_bad_input(make_problem):
    prob = make_problem("mlp")
    blocks = partition_blocks(prob.model)
    gen = torch.Generator().manual_seed(6)
    sub = [blocks[0], blocks[-1]]
    vss = [
        {b.name: torch.randn(b.n_params, generator=gen, dtype=torch.float64) for b in sub}
        for _ in range(2)
    ]
    sub = [b.name for b in sub]
    with HessianOperator(prob.model, prob.loss_fn, prob.batches, blocks) as op:
        many = op.hvp_joint_many(vss)
        for vs, got in zip(vss, many, strict=True):
            single = op.hvp_joint(vs)
            assert list(got) == sub
            assert all(torch.equal(got[n], single[n]) for n in sub)
        with pytest.raises(ValueError, match="at least one vector"):
            op.hvp_joint_many([])
        with pytest.raises(ValueError, match="vector 1 names blocks"):
            op.hvp_joint_many([vss[0], {sub[0]: vss[1][sub[0]]}])
        with pytest.raises(ValueError, match="must have shape"):
            op.hvp_joint_many([vss[0], {**vss[1], sub[0]: torch.zeros(3)}])


def test_model_state_untouched(make_problem):
    prob = make_problem("cnn_bn")
    model = prob.model
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)
    grad_obj = model[3].weight.grad
    modes = [m.training for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    blocks = partition_blocks(model)
    with HessianOperator(model, prob.loss_fn, prob.batches, blocks) as op:
        assert not any(m.training for m in model.modules())
        for b in blocks:
            op.hvp(b.name, torch.ones(b.n_params, dtype=torch.float64))
        op.hvp_joint({b.name: torch.ones(b.n_params, dtype=torch.float64) for b in blocks})
    assert [m.training for m in model.modules()] == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model[3].weight.grad is grad_obj
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None)
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n])
    for k, v in model.state_dict().items():  # parameters and BN running statistics
        assert torch.equal(v, state[k]), k
    with pytest.raises(RuntimeError, match="closed"):
        op.hvp(blocks[0].name, torch.ones(blocks[0].n_params, dtype=torch.float64))


def test_input_validation(make_problem):
    prob = make_problem("mlp")
    with HessianOperator(prob.model, prob.loss_fn, prob.batches) as op:
        with pytest.raises(ValueError, match="unknown block"):
            op.hvp("nope", torch.ones(3))
        with pytest.raises(ValueError, match="shape"):
            op.hvp("0", torch.ones(op.dim("0") + 1))
        with pytest.raises(ValueError, match="at least one"):
            op.hvp_joint({})
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        HessianOperator(prob.model, prob.loss_fn, prob.batches, memory_budget_bytes=-1)
    with pytest.raises(ValueError, match="batch 1"):
        HessianOperator(prob.model, prob.loss_fn, [prob.batches[0], prob.batches[1][0]])


def test_op_without_double_backward_is_named():
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 5), gate=nn.Hardsigmoid(), fc2=nn.Linear(5, 3))
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with HessianOperator(model, F.cross_entropy, [(x, y)]) as op:
        op.hvp("fc2", torch.ones(op.dim("fc2"), dtype=torch.float64))  # after the gate: fine
        with pytest.raises(HessianError, match=r"'gate' \(Hardsigmoid\)"):
            op.hvp("fc1", torch.ones(op.dim("fc1"), dtype=torch.float64))


class _DetachedTanh(torch.autograd.Function):
    """tanh whose backward leaves autograd: second-order terms would silently vanish."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (g * (1 - y**2)).detach()


class DetachedTanh(nn.Module):
    def forward(self, x):
        return _DetachedTanh.apply(x)


def test_silently_zero_hvp_is_an_error_naming_the_module():
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 5), act=DetachedTanh(), fc2=nn.Linear(5, 3))
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with (
        HessianOperator(model, F.cross_entropy, [(x, y)]) as op,
        pytest.raises(HessianError, match=r"'act' \(DetachedTanh\)"),
    ):
        op.hvp("fc1", torch.ones(op.dim("fc1"), dtype=torch.float64))


def test_non_finite_input_names_the_batch(make_problem):
    prob = make_problem("mlp")
    x, y = prob.batches[2]
    x = x.clone()
    x[1, 2] = float("nan")
    batches = [prob.batches[0], prob.batches[1], (x, y)]
    for budget in (None, 0):
        with (
            HessianOperator(prob.model, prob.loss_fn, batches, memory_budget_bytes=budget) as op,
            pytest.raises(HessianError, match="batch 2"),
        ):
            op.hvp("0", torch.ones(op.dim("0"), dtype=torch.float64))


class ThreadAllReduce:
    """Sum over shards running in threads (the contract torch.distributed gives in actors)."""

    def __init__(self, n: int, in_place: bool) -> None:
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list = [None] * n
        self.in_place = in_place

    def hook(self, rank: int):
        def allreduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            if self.in_place:
                t.copy_(total)
                return None
            return total

        return allreduce


def _run_shards(prob, shards, fn, in_place):
    """Each shard gets its own model copy, as each Ray actor does."""
    reduce = ThreadAllReduce(len(shards), in_place)
    out: list = [None] * len(shards)
    models = [copy.deepcopy(prob.model) for _ in shards]

    def work(rank):
        try:
            with HessianOperator(
                models[rank], prob.loss_fn, shards[rank], allreduce=reduce.hook(rank)
            ) as op:
                out[rank] = fn(op)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            out[rank] = exc

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return out


@pytest.mark.parametrize("in_place", [True, False])
def test_sharded_hvps_with_allreduce_equal_single_process(make_problem, in_place):
    prob = make_problem("residual")  # batches of 5, 2, 6
    blocks = partition_blocks(prob.model)
    gen = torch.Generator().manual_seed(4)
    vs = {b.name: torch.randn(b.n_params, generator=gen, dtype=torch.float64) for b in blocks}
    with HessianOperator(prob.model, prob.loss_fn, prob.batches) as op:
        ref_block = op.hvp(blocks[1].name, vs[blocks[1].name])
        ref_joint = op.hvp_joint(vs)

        ref_many = [ref_joint, op.hvp_joint({b: -2 * v for b, v in vs.items()})]

    def fn(op):
        many = op.hvp_joint_many([vs, {b: -2 * v for b, v in vs.items()}])
        return op.n_samples, op.hvp(blocks[1].name, vs[blocks[1].name]), op.hvp_joint(vs), many

    shards = [prob.batches[:1], prob.batches[1:]]
    for n, block, joint, many in _run_shards(prob, shards, fn, in_place):
        assert n == 13
        assert _close(block, ref_block, 1e-12)
        for b in blocks:
            assert _close(joint[b.name], ref_joint[b.name], 1e-12)
            for got, want in zip(many, ref_many, strict=True):  # one all-reduce, K results
                assert _close(got[b.name], want[b.name], 1e-12)


def test_failure_on_one_shard_raises_on_every_shard(make_problem):
    prob = make_problem("mlp")
    x, y = prob.batches[1]
    bad = (torch.full_like(x, float("inf")), y)
    shards = [prob.batches[:1], [prob.batches[2], bad]]
    out = _run_shards(
        prob, shards, lambda op: op.hvp("0", torch.ones(42, dtype=torch.float64)), True
    )
    assert isinstance(out[0], HessianError) and "another data shard" in str(out[0])
    assert isinstance(out[1], HessianError) and "batch 1" in str(out[1])
    ones = {"0": torch.ones(42, dtype=torch.float64)}
    out = _run_shards(prob, shards, lambda op: op.hvp_joint_many([ones, ones, ones]), False)
    assert isinstance(out[0], HessianError) and "another data shard" in str(out[0])
    assert isinstance(out[1], HessianError) and "batch 1" in str(out[1])


def test_double_backward_does_no_wasted_convolutions():
    """Block ``i`` of a chain of L convs costs 2 convolutions per later layer, plus 2.

    PyTorch's own convolution double backward would add a weight gradient per later layer
    (and an input gradient at the block); the operator's graphs must not.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(
        *[
            m
            for _ in range(4)
            for m in (nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh())
        ],
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 2),
    ).double()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    ]
    convs = [b for b in partition_blocks(model) if b.name != "13"]
    with HessianOperator(model, F.cross_entropy, batches) as op:
        op.hvp_joint({b.name: torch.ones(b.n_params, dtype=torch.float64) for b in op.blocks})
        for i, b in enumerate(convs):
            v = torch.ones(b.n_params, dtype=torch.float64)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                op.hvp(b.name, v)
            names = [e.name for e in prof.events()]
            n_conv = names.count("aten::convolution") + names.count("aten::convolution_backward")
            assert n_conv == 2 * (len(convs) - 1 - i) + 2, (b.name, n_conv)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_match_dense(dims, dense_block_hessian):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    torch.manual_seed(5)
    model = nn.Sequential(
        conv(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        conv(3, 2, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2, 3),  # 6 -> 3 (stride 2) -> 1 (dilated kernel) per spatial dim
    ).double()
    gen = torch.Generator().manual_seed(6)
    batches = [
        (
            torch.randn(n, 2, *(6,) * dims, generator=gen, dtype=torch.float64),
            torch.tensor([0, 2, 1][:n]),
        )
        for n in (3, 2)
    ]
    model.eval()
    with HessianOperator(model, F.cross_entropy, batches) as op:
        for b in op.blocks:
            H = dense_block_hessian(model, F.cross_entropy, batches, b.param_names)
            v = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            assert _close(op.hvp(b.name, v), H @ v, 1e-10), b.name
