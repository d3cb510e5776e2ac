"""The Ray backend against the single-process ``hawq.hessian.table.analyze`` (ground truth).

Real Ray: a local instance (``ray.init(address="local", num_cpus=2)``) and a 3-node
``ray.cluster_utils.Cluster`` (three raylets on this host: a second physical host cannot be had
here). Actors form real gloo process groups. GPU actors (fractional GPUs with gloo, whole GPUs
with nccl): tests/test_gpu.py, skipped without CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from collections.abc import Iterator
from functools import partial

import pytest
import ray
import torch
import torch.nn.functional as F
from ray.cluster_utils import Cluster
from torch import nn

from hawq.blocks import partition_blocks
from hawq.hessian.memory import estimate_graph_memory
from hawq.hessian.operator import HessianError
from hawq.hessian.table import EIGEN_COLUMNS, TRACE_COLUMNS, HessianConfig, analyze
from pipeline.backends.base import HessianJob
from pipeline.backends.ray import RayBackendConfig, default_auth_mode
from pipeline.backends.ray.backend import RayBackend

default_auth_mode()  # before the tests' ray.init / Cluster

# Actor processes cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

OBJECT_STORE = 96 * 2**20
SIZES = (4, 7, 5, 3, 6)  # unequal batches: sample weighting must make shards exact
COMPARED = ("eigenvalue", "residual", "trace", "trace_stderr")
EXACT = ("block", "modules", "n_params", "hvps", "converged", "trace_probes", "seed")


def tiny_cnn(width: int = 3, depth: int = 2) -> nn.Module:
    """``depth`` convs (BatchNorm after each) -> pool -> Linear: ``depth + 1`` blocks."""
    layers: list[nn.Module] = [nn.Conv2d(2, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.Tanh()]
    layers += [nn.Conv2d(width, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).double()


def make_job(config: HessianConfig, width: int = 3, depth: int = 2) -> HessianJob:
    torch.manual_seed(width * 10 + depth)
    model = tiny_cnn(width, depth)
    gen = torch.Generator().manual_seed(7)
    for m in model.modules():  # non-trivial BatchNorm statistics (eval mode in the HVPs)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
    batches = [
        (
            torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in SIZES
    ]
    return HessianJob(
        build_model=partial(tiny_cnn, width, depth),
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        loss_fn=F.cross_entropy,
        batches=batches,
        blocks=partition_blocks(model),
        config=config,
        dtype=torch.float64,
    )


CONFIG = HessianConfig(tol=1e-6, trace_tol=0.05, trace_min_probes=6, trace_max_probes=24)
JOB = make_job(CONFIG)


def reference(job: HessianJob) -> list[dict]:
    """Ground truth: the single-process analysis of ``job``."""
    model = job.instantiate()
    table = analyze(model, job.loss_fn, job.batches, job.config, blocks=job.blocks, progress=False)
    return table.to_pylist()


@pytest.fixture(scope="module")
def truth() -> list[dict]:
    return reference(JOB)


def assert_same_rows(got: list[dict], want: list[dict], rel: float = 1e-8) -> None:
    assert [r["block"] for r in got] == [r["block"] for r in want]
    for g, w in zip(got, want, strict=True):
        for col in EXACT:
            assert g[col] == w[col], (g["block"], col)
        for col in COMPARED:
            assert math.isclose(g[col], w[col], rel_tol=rel, abs_tol=1e-300), (g["block"], col)
        assert g["eigenvalues"] == pytest.approx(w["eigenvalues"], rel=rel)


def backend_config(data_shards: int, block_groups: int) -> RayBackendConfig:
    return RayBackendConfig(
        data_shards=data_shards,
        block_groups=block_groups,
        cpus_per_actor=0.15,
        collective_timeout_s=30,
        start_timeout_s=120,
    )


def test_config_validation():
    for bad in (
        {"data_shards": 0},
        {"block_groups": 1.5},
        {"cpus_per_actor": -1},
        {"gpus_per_actor": 1.5},
        {"max_actor_restarts": -1},
        {"memory_budget_mb": float("nan")},
        {"address": ""},
        {"placement": "yes"},
    ):
        with pytest.raises(ValueError):
            RayBackendConfig(**bad)
    assert RayBackendConfig(cpus_per_actor=0.5).threads == 1
    assert RayBackendConfig(cpus_per_actor=2).threads == 2


@pytest.fixture(scope="class")
def backends():
    """A local Ray instance with 2 CPUs; ``backends(D, G)`` is shared within the class."""
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False)
    made: dict[tuple[int, int], RayBackend] = {}

    def get(d: int, g: int) -> RayBackend:
        if (d, g) not in made:
            made[(d, g)] = RayBackend(backend_config(d, g))
        return made[(d, g)]

    yield get
    for backend in made.values():
        backend.close()
    ray.shutdown()


def _local_cluster(nodes: int, cpus: int) -> Iterator[Cluster]:
    """``nodes`` raylets with ``cpus`` CPUs each on this host, connected; torn down after."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus, "object_store_memory": OBJECT_STORE,
                        "include_dashboard": False},
    )  # fmt: skip
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, object_store_memory=OBJECT_STORE)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="class")
def cluster():
    """Three raylets (``ray.cluster_utils.Cluster``, 1 CPU each) on this host."""
    yield from _local_cluster(3, 1)


class TestLocalCluster:
    """Real local Ray; actors are reused across the tests of this class."""

    @pytest.mark.parametrize("grid", [(2, 2), (3, 1)], ids=["2x2", "3x1"])
    def test_matches_single_process(self, backends, truth, grid):
        backend = backends(*grid)
        rows = []
        table = backend.run(JOB, on_row=rows.append, progress=False)
        assert_same_rows(table.to_pylist(), truth)
        assert sorted(r["block"] for r in rows) == sorted(r["block"] for r in truth)
        assert all(set(r) == set(EIGEN_COLUMNS) for r in rows)
        stats = backend.stats
        assert stats["recoveries"] == 0 and stats["blocks_computed"] == len(truth)
        assert stats["eigen_hvps"] == sum(r["hvps"] for r in truth)
        assert stats["probes_used"] == max(r["trace_probes"] for r in truth)
        ahead = grid[1] * JOB.config.trace_probe_chunk  # each group computes a chunk ahead
        assert stats["probes_used"] <= stats["probes_computed"] < stats["probes_used"] + ahead

    def test_chunked_probes_on_two_shards_equal_local_probes_one_at_a_time(self, backends):
        job = make_job(dataclasses.replace(CONFIG, trace_probe_chunk=3, memory_budget_mb=0))
        truth = reference(make_job(dataclasses.replace(CONFIG, trace_probe_chunk=1)))
        backend = backends(2, 1)
        table = backend.run(job, progress=False)
        counters = ray.get([a.counters.remote() for a in backend.actors[0]])
        assert_same_rows(table.to_pylist(), truth)
        computed = backend.stats["probes_computed"]
        assert computed % 3 == 0 and computed >= backend.stats["probes_used"]
        # each shard applied every HVP (its all-reduce carries K products), no graph cached
        assert [c["hvps"] for c in counters] == [backend.stats["eigen_hvps"] + computed] * 2
        assert [c["cached_batches"] for c in counters] == [0, 0]

    def test_unset_data_shards_is_the_fewest_whose_caches_hold_every_batch(self, backends, truth):
        mem = estimate_graph_memory(JOB.instantiate(), JOB.loss_fn, JOB.batches[0], JOB.blocks)

        def need(d: int) -> float:  # the largest shard's graphs, scaled from its first batch
            shards = [SIZES[i::d] for i in range(d)]
            return max(sum(s) * mem.batch_bytes(s[0]) / s[0] for s in shards)

        assert need(3) < need(2)  # a budget between them: 3 shards cache everything, 2 do not
        budget_mb = (need(3) + need(2)) / 2 / 2**20
        backend = RayBackend(
            dataclasses.replace(backend_config(1, 1), data_shards=None, memory_budget_mb=budget_mb)
        )
        try:
            table = backend.run(JOB, progress=False)
            counters = ray.get([a.counters.remote() for a in backend.actors[0]])
        finally:
            backend.close()
        assert backend.config.data_shards == 3 and backend.plan.all_cached
        assert [c["cached_batches"] for c in counters] == [2, 2, 1]  # batches 0,3 / 1,4 / 2
        assert [s.cached for s in backend.plan.shards] == [2, 2, 1]
        assert_same_rows(table.to_pylist(), truth)

    def test_killed_actors_leave_result_unchanged(self, backends, truth):
        backend = backends(2, 2)
        events: list[tuple[str, dict]] = []
        killed: list[str] = []

        def hook(event: str, info: dict) -> None:
            events.append((event, info))
            if event != "submit":
                return
            g = info["group"]
            if info["kind"] == "eigen" and "eigen" not in killed:
                killed.append("eigen")  # mid-block: its call is already queued or running
                ray.kill(backend.actors[g][1], no_restart=False)
            elif info["kind"] == "probe" and 3 in info["key"] and "probe" not in killed:
                killed.append("probe")  # rank 0 also hosts the group's TCP store
                ray.kill(backend.actors[g][0], no_restart=False)

        backend.on_event = hook
        try:
            table = backend.run(JOB, progress=False)
        finally:
            backend.on_event = None
        assert killed == ["eigen", "probe"]
        assert_same_rows(table.to_pylist(), truth)
        recovered = [info["kind"] for event, info in events if event == "recover"]
        assert "eigen" in recovered and "probe" in recovered
        assert backend.stats["recoveries"] >= 2
        # the redone work is exactly the killed items: every block reported once
        assert sorted(i["key"] for e, i in events if e == "block") == sorted(
            r["block"] for r in truth
        )

    def test_stalled_member_times_out_instead_of_hanging(self, backends, truth):
        # SIGSTOP one member mid-block: its peer's all-reduce times out (gloo), the driver's
        # ping to the stalled actor times out too, the actor is restarted and the block redone
        backend = RayBackend(dataclasses.replace(backend_config(2, 1), collective_timeout_s=4))
        stalled: list[int] = []

        def hook(event: str, info: dict) -> None:
            if event == "submit" and info["kind"] == "eigen" and not stalled:
                stalled.append(backend.placement[(0, 1)]["pid"])
                os.kill(stalled[0], signal.SIGSTOP)

        backend.on_event = hook
        try:
            table = backend.run(JOB, progress=False)
            assert stalled and backend.placement[(0, 1)]["pid"] != stalled[0]
            # at least the stalled one; on a loaded host a restarted group can also miss the
            # 4 s collective timeout once more and be rebuilt again (seen in CI: 3), which is
            # the same recovery path, so only its use, not its count, is asserted
            assert backend.stats["recoveries"] >= 1
            assert_same_rows(table.to_pylist(), truth)
        finally:
            backend.close()

    def test_done_is_skipped_and_rows_stream_in_dispatch_order(self, backends, truth):
        backend = backends(3, 1)
        first = truth[0]
        done = {first["block"]: {**{c: first[c] for c in EIGEN_COLUMNS}, "eigenvalue": 123.0}}
        log: list[tuple[str, str]] = []
        backend.on_event = lambda e, i: log.append((e, i["key"])) if i["kind"] == "eigen" else None
        try:
            table = backend.run(
                JOB, done=done, on_row=lambda r: log.append(("row", r["block"])), progress=False
            )
        finally:
            backend.on_event = None
        rows = table.to_pylist()
        assert rows[0]["eigenvalue"] == 123.0  # reused as given, not recomputed
        assert_same_rows(rows[1:], truth[1:])
        assert backend.stats["blocks_computed"] == len(truth) - 1
        assert backend.stats["blocks_skipped"] == 1
        # one group: each row is handed over before the next block starts, largest first
        todo = sorted(truth[1:], key=lambda r: -r["n_params"])
        expected = [(e, r["block"]) for r in todo for e in ("submit", "row")]
        assert [x for x in log if x[0] in ("submit", "row")] == expected

    def test_driver_bytes_grow_with_blocks_not_parameters(self, backends):
        # fixed work per run (never-converging power iteration, fixed probe count) so that only
        # the model's shape can change what the driver receives
        config = HessianConfig(method="power", tol=1e-15, max_iter=4, trace_min_probes=4,
                               trace_max_probes=4)  # fmt: skip
        backend = backends(1, 2)  # one shard: no process group at all
        stats = {}
        shapes = (("warmup", 3, 2), ("narrow", 3, 2), ("wide", 30, 2), ("deep", 3, 4))
        for name, width, depth in shapes:  # warmup: actor start-up pings are not compared
            job = make_job(config, width, depth)
            table = backend.run(job, progress=False)
            stats[name] = dict(backend.stats, n_params=sum(b.n_params for b in job.blocks))
            assert table.column("hvps").to_pylist() == [4] * len(job.blocks)
        narrow, wide, deep = stats["narrow"], stats["wide"], stats["deep"]
        assert wide["n_params"] > 9 * narrow["n_params"]
        assert wide["bytes_results"] == narrow["bytes_results"]
        assert abs(wide["bytes_to_driver"] - narrow["bytes_to_driver"]) < 64
        assert deep["bytes_results"] > narrow["bytes_results"] * 1.3
        # far below one parameter vector per HVP, which a driver-side reduction would pull
        hvps = 4 * 3 + 4  # 3 blocks x 4 power iterations + 4 probes
        assert wide["bytes_to_driver"] / hvps < 0.05 * 8 * wide["n_params"]

    def test_saved_probes_are_reused_not_recomputed(self, backends, truth):
        backend = backends(2, 2)
        saved: dict[int, dict[str, float]] = {}
        full = backend.run(JOB, on_probe=saved.__setitem__, progress=False).to_pylist()
        assert_same_rows(full, truth)
        assert len(saved) == backend.stats["probes_computed"] >= backend.stats["probes_used"]
        partial = {p: saved[p] for p in range(2)}
        again: dict[int, dict[str, float]] = {}
        done = {r["block"]: r for r in full}
        resumed = backend.run(
            JOB, done=done, probes=partial, on_probe=again.__setitem__, progress=False
        ).to_pylist()
        assert backend.stats["probes_skipped"] == 2 and not set(again) & set(partial)
        assert backend.stats["blocks_computed"] == 0
        for got, want in zip(resumed, full, strict=True):  # the same samples: the same traces
            assert [got[c] for c in TRACE_COLUMNS] == [want[c] for c in TRACE_COLUMNS]

    def test_algorithmic_errors_propagate_without_retries(self, backends):
        x, y = JOB.batches[3]
        poisoned = list(JOB.batches)
        poisoned[3] = (x.clone().fill_(float("nan")), y)  # lives on shard 1 of 2
        backend = backends(2, 2)
        with pytest.raises(HessianError):
            backend.run(dataclasses.replace(JOB, batches=poisoned), progress=False)
        assert backend.stats["recoveries"] == 0


class TestThreeNodeCluster:
    """Multi-node: gloo groups across raylets, shards spread over the nodes."""

    @pytest.mark.parametrize("grid", [(2, 2), (3, 1)], ids=["2x2", "3x1"])
    def test_matches_single_process(self, cluster, truth, grid):
        cfg = dataclasses.replace(backend_config(*grid), placement="spread")
        backend = RayBackend(cfg)
        try:
            table = backend.run(JOB, progress=False)
            assert_same_rows(table.to_pylist(), truth)
            # SPREAD: each group's shards sit on different raylets (gloo across nodes)
            for g in range(grid[1]):
                nodes = {backend.placement[(g, d)]["node"] for d in range(grid[0])}
                assert len(nodes) == grid[0], (g, nodes)
            assert backend.stats["nodes"] == (3 if grid == (3, 1) else backend.stats["nodes"])
        finally:
            backend.close()


@pytest.fixture(scope="class")
def two_by_two():
    """Two raylets with 2 CPUs each (``ray.cluster_utils.Cluster``)."""
    yield from _local_cluster(2, 2)


class TestPackedGroups:
    """One placement group per block group: PACK keeps a group's all-reduce on one node."""

    def test_each_group_shares_a_node_and_gets_the_interface_env(
        self, two_by_two, truth, monkeypatch
    ):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
        monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
        cfg = dataclasses.replace(backend_config(2, 2), cpus_per_actor=1.0)
        backend = RayBackend(cfg)
        try:
            table = backend.run(JOB, progress=False)
            assert_same_rows(table.to_pylist(), truth)
            nodes = [{backend.placement[(g, d)]["node"] for d in range(2)} for g in range(2)]
            assert [len(n) for n in nodes] == [1, 1], nodes  # a group on one node
            assert nodes[0] != nodes[1]  # 2 CPUs per node: the other group on the other node
            for info in backend.placement.values():
                assert info["env"] == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
            assert len(ray.util.placement_group_table()) >= 2
        finally:
            backend.close()
        live = [p for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
        assert not live  # close() removed the groups
