"""README claims about the main job's Ray path, through its public entry points.

- ``make_backend`` with ``address: null`` starts a private Ray and ``close`` stops it: afterwards
  ``ray.is_initialized()`` is false and no Ray process (raylet, gcs_server, workers) is left
  among this process's descendants.
- Sharding is real: each actor holds only its shard (``HessianWorker.shard_size``); with batch
  sizes that are distinct powers of two, a shard's size names exactly which batches it holds,
  so the sizes prove the shards are ``batches[d::D]``, disjoint, and cover the data.
- A pipeline run (``pipeline.scheduler.run``, tiny digits config, float64 Hessian) with the Ray
  backend over 2 data shards writes a ``sensitivity.parquet`` equal to the local backend's to
  1e-8.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
from tiny_run import write_config

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from hawq import HessianConfig, partition_blocks  # noqa: E402
from pipeline.backends import HessianJob, LocalBackend, make_backend  # noqa: E402
from pipeline.config import BackendSection, ModelConfig, load_config  # noqa: E402
from pipeline.models import loss_fn_for, model_factory  # noqa: E402
from pipeline.scheduler import run  # noqa: E402

SIZES = (1, 2, 4, 8, 16, 32)  # distinct powers of two: a shard's size names its batches
EXACT = ("block", "modules", "n_params", "hvps", "converged", "trace_probes", "seed")
CLOSE = ("eigenvalue", "residual", "trace", "trace_stderr")


def ray_descendants() -> list[str]:
    """``pid comm`` of every descendant of this process that belongs to Ray."""
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        parent[int(d.name)] = int(rest.split()[1])
        comm[int(d.name)] = f"{name} {cmdline[:120]}"
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - mine
        mine |= frontier
    return [f"{p} {comm[p]}" for p in sorted(mine) if "ray" in comm[p].lower()]


def wait_no_ray_children(timeout_s: float = 60) -> list[str]:
    """Ray's processes exit asynchronously after ``ray.shutdown``: wait (bounded) for them."""
    deadline = time.monotonic() + timeout_s
    while (left := ray_descendants()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def small_job() -> HessianJob:
    cfg = ModelConfig(name="mlp", num_classes=3, in_channels=1, image_size=3,
                      kwargs={"hidden": [6, 5]})  # fmt: skip
    build = model_factory(cfg)
    torch.manual_seed(0)
    model = build().double()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 1, 3, 3, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (n,), generator=gen))
        for n in SIZES
    ]  # fmt: skip
    return HessianJob(
        build_model=build,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        loss_fn=loss_fn_for(cfg),
        batches=batches,
        blocks=partition_blocks(model),
        config=HessianConfig(tol=1e-8, trace_min_probes=4, trace_max_probes=6, trace_tol=1e-9),
        dtype=torch.float64,
    )


def assert_rows_close(got: list[dict], want: list[dict]) -> None:
    assert [r["block"] for r in got] == [r["block"] for r in want] and got
    for g, w in zip(got, want, strict=True):
        for col in EXACT:
            assert g[col] == w[col], (g["block"], col, g[col], w[col])
        for col in CLOSE:
            assert math.isclose(g[col], w[col], rel_tol=1e-8, abs_tol=1e-300), (g["block"], col)
        assert g["eigenvalues"] == pytest.approx(w["eigenvalues"], rel=1e-8)


@pytest.fixture
def no_ray_before():
    if ray.is_initialized():
        pytest.fail("Ray is already initialised in this process: the test cannot own it")
    assert wait_no_ray_children() == []


def test_private_ray_starts_holds_disjoint_shards_and_stops(no_ray_before) -> None:
    job = small_job()
    section = BackendSection(kind="ray", data_shards=3, block_groups=1, cpus_per_actor=0.5)
    backend = make_backend(section)
    try:
        table = backend.run(job, progress=False)
        assert ray.is_initialized()
        assert any("raylet" in p for p in ray_descendants())  # its own Ray, our child
        sizes = ray.get([a.shard_size.remote() for a in backend.actors[0]])
    finally:
        backend.close()
    assert not ray.is_initialized()
    assert wait_no_ray_children() == []
    # shard d holds batches d, d+3: sizes 1+8, 2+16, 4+32 (binary digits name the batches)
    assert sizes == [sum(SIZES[d::3]) for d in range(3)] == [9, 18, 36]
    assert sum(sizes) == sum(SIZES)
    assert all(a & b == 0 for i, a in enumerate(sizes) for b in sizes[i + 1 :])  # disjoint
    want = LocalBackend().run(job, progress=False).to_pylist()
    assert_rows_close(table.to_pylist(), want)


def test_pipeline_with_ray_backend_equals_local(no_ray_before, tmp_path: Path) -> None:
    hessian = {"dtype": "float64", "tol": 1e-8, "max_iter": 30}
    config = write_config(tmp_path / "tiny.yaml", {"hessian": hessian})
    local = run(load_config(config), tmp_path / "local", progress=False, until="hessian")
    ray_sets = ["backend.kind=ray", "backend.data_shards=2", "backend.cpus_per_actor=0.5"]
    remote = run(load_config(config, ray_sets), tmp_path / "ray", progress=False, until="hessian")
    assert [p.action for p in local.plan[:2]] == [p.action for p in remote.plan[:2]] == ["run"] * 2
    assert not ray.is_initialized()
    assert wait_no_ray_children() == []
    got, want = (
        pq.read_table(d / "stages" / "hessian" / "sensitivity.parquet").to_pylist()
        for d in (tmp_path / "ray", tmp_path / "local")
    )
    assert len(got) == 3  # fc1..fc3
    assert_rows_close(got, want)
