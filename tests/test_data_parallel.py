"""Data-parallel baseline, fine-tuning and evaluation on real local Ray (gloo on CPU).

Ground truth: the same config at ``distributed.world_size: 1`` (one process, today's path).
The model is float64 (``ddp_model:make``) with BatchNorm (``sync``), and the global batch of 50
leaves a last batch of 1 sample of 301, so one rank's slice is empty there; a world-size-2 run
must give the same weights, activation-quantizer ranges and metrics to 1e-6. A SIGKILL in the
middle of a fine-tuning epoch at world size 2, then ``hawq resume``, must give the
uninterrupted world-size-2 run's outputs exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_resume_kill_anytime import _kill_at
from tiny_run import assert_same_outputs, write_config

from hawq.metrics import batches
from hawq.qat import QATConfig, train_float
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.scheduler import run, stage_keys

TESTS = Path(__file__).resolve().parent
DDP = {
    "model": {"name": "ddp_model:make", "kwargs": {}},
    "data": {"train_size": 301, "eval_size": 150, "hessian_samples": 64, "batch_size": 64},
    "baseline": {"train_epochs": 1, "lr": 0.1, "batch_size": 50},
    "hessian": {"trace": False, "max_iter": 5},
    "allocation": {"sensitivity": "eigenvalue", "compression": 4.0, "pareto_points": 0},
    "finetune": {
        "epochs_per_stage": 1,
        "blocks_per_stage": 2,
        "lr": 0.05,
        "batch_size": 50,
        "checkpoint_every_steps": 2,
    },
}
TOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The config at world size 1 and 2 (in-process; the workers import ddp_model)."""
    base = tmp_path_factory.mktemp("ddp")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved) if p)
    try:
        out = {}
        for w in (1, 2):
            cfg = write_config(base / f"w{w}.yaml", {**DDP, "distributed": {"world_size": w}})
            run(load_config(cfg), base / f"w{w}", progress=False)
            out[f"w{w}"], out[f"cfg{w}"] = base / f"w{w}", cfg
        return out
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "stages" / stage / "model.safetensors"))


def _close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=TOL, atol=TOL, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def _close_rows(path: str, a: Path, b: Path, columns: tuple[str, ...]) -> None:
    ra, rb = (pq.read_table(d / "stages" / path).to_pylist() for d in (a, b))
    assert len(ra) == len(rb) > 0, path
    for x, y in zip(ra, rb, strict=True):
        for c in columns:
            assert x[c] == pytest.approx(y[c], rel=TOL, abs=TOL, nan_ok=True), (path, c)


def test_fine_tuning_at_world_size_2_equals_world_size_1(runs) -> None:
    w1, w2 = runs["w1"], runs["w2"]
    a, b = _weights(w1, "finetune"), _weights(w2, "finetune")
    ranges = [k for k in a if k.endswith(("input_quant.running_min", "input_quant.running_max"))]
    assert len(ranges) == 6  # every quantized layer's observer, all fine-tuned
    assert all(a[k].dtype == torch.float32 for k in ranges)
    _close_weights(a, b)
    assert a["1.weight"].dtype == torch.float64
    cols = ("lr", "train_loss", "train_acc", "eval_loss", "eval_acc")
    _close_rows("finetune/epochs.parquet", w1, w2, cols)
    # the quantized layers and the stages are the same (the allocation saw the same Hessian)
    for f in ("allocate/bits.parquet", "order/order.parquet"):
        drop = ["stage_key"]
        ta, tb = (pq.read_table(d / "stages" / f).drop_columns(drop) for d in (w1, w2))
        assert ta.select(["block"]).equals(tb.select(["block"])), f


def test_baseline_and_evaluation_at_world_size_2_equal_world_size_1(runs) -> None:
    w1, w2 = runs["w1"], runs["w2"]
    _close_weights(_weights(w1, "baseline"), _weights(w2, "baseline"))
    _close_rows("baseline/metrics.parquet", w1, w2, ("eval_loss", "eval_acc", "n_params"))
    _close_rows("baseline/epochs.parquet", w1, w2, ("train_loss", "train_acc", "eval_loss"))
    cols = ("eval_loss", "eval_acc", "eval_acc_low", "eval_acc_high", "eval_samples")
    _close_rows("evaluate/metrics.parquet", w1, w2, cols)


def test_ranks_record_where_each_rank_ran(runs) -> None:
    for stage in ("baseline", "finetune", "evaluate"):
        one = pq.read_table(runs["w1"] / "stages" / stage / "ranks.parquet").to_pylist()
        assert [(r["world_size"], r["rank"], r["node"]) for r in one] == [(1, 0, "")]
        two = pq.read_table(runs["w2"] / "stages" / stage / "ranks.parquet").to_pylist()
        assert [(r["world_size"], r["rank"]) for r in two] == [(2, 0), (2, 1)]
        pids = {r["pid"] for r in two}
        assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not this one
        assert all(r["node"] for r in two)  # a Ray node id


@pytest.mark.slow
def test_kill_mid_epoch_at_world_size_2_then_resume_equals_uninterrupted(runs, tmp_path) -> None:
    """SIGKILL (the CLI and its private Ray) after a mid-epoch state of fine-tuning stage 2
    (step 4 of 7, saved every 2 steps); ``hawq resume`` must finish like the clean run."""
    killed = tmp_path / "killed"
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env_path) if p)
    try:
        _kill_at("finetune:step:2:4", runs["cfg2"], killed, tmp_path)
        state = killed / "stages" / "finetune" / "state.safetensors"
        assert state.exists()
        assert main(["-q", "resume", str(killed)]) == 0
    finally:
        os.environ["PYTHONPATH"] = env_path
    log = (killed / "hawq.log").read_text()
    assert "resuming training after stage 2 epoch 0, 4 steps into the next" in log
    assert assert_same_outputs(runs["w2"], killed) >= 20


# --------------------------------------------------------------------------- the hawq loop alone


def test_rank_slices_cover_each_global_batch_in_order() -> None:
    """Tensors and callables: the ranks' slices, concatenated, are the global batch."""
    x, y = torch.arange(23.0).view(23, 1), torch.arange(23)
    for world in (1, 2, 3):
        per_rank = [
            list(batches((x, y), 5, torch.Generator().manual_seed(4), True, False, rank=r,
                         world_size=world))
            for r in range(world)
        ]  # fmt: skip
        glob = list(batches((x, y), 5, torch.Generator().manual_seed(4), True, False))
        assert len(glob) == 5 and all(len(p) == 5 for p in per_rank)
        for k, (gx, gy) in enumerate(glob):
            assert torch.equal(torch.cat([p[k][0] for p in per_rank]), gx)
            assert torch.equal(torch.cat([p[k][1] for p in per_rank]), gy)
            sizes = [len(p[k][1]) for p in per_rank]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)  # floor cuts

    def loader(gen):  # a streaming source yielding global batches
        return iter([(x[:3], y[:3]), (x[3:4], y[3:4])])

    got = [b for _, b in batches(loader, 0, torch.Generator(), True, False, rank=1, world_size=2)]
    assert [t.tolist() for t in got] == [[1, 2], [3]]
    calls = []

    def sharded(gen, *, rank, world_size):  # one that reads only its own share
        calls.append((rank, world_size))
        return iter([])

    sharded.sharded = True
    assert list(batches(sharded, 0, torch.Generator(), True, False, rank=1, world_size=2)) == []
    assert calls == [(1, 2)]


def test_frozen_batchnorm_keeps_running_statistics_and_trains_the_rest() -> None:
    import ddp_model

    torch.manual_seed(0)
    model = ddp_model.make()
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_float(model, (x, y), None, QATConfig(batch_size=8, lr=0.1, batchnorm="frozen"))
    after = model.state_dict()
    for k in before:
        moved = not torch.equal(before[k], after[k])
        assert moved == (k.split(".")[-1] in ("weight", "bias")), k  # running stats stay put
    assert "forward" not in model[2].__dict__  # the BatchNorm override is gone afterwards


def test_world_size_joins_the_stage_keys_only_with_local_batchnorm(tmp_path) -> None:
    def keys(world: int, bn: str) -> dict[str, str]:
        changes = {"distributed": {"world_size": world},
                   "finetune": {"batchnorm": bn}, "baseline": {"batchnorm": bn}}  # fmt: skip
        cfg = load_config(write_config(tmp_path / f"{world}{bn}.yaml", changes))
        return {s: k for s, (k, _) in stage_keys(cfg, "fp").items()}

    assert keys(1, "sync") == keys(2, "sync") == keys(3, "sync")
    assert keys(1, "frozen") == keys(2, "frozen") != keys(1, "sync")
    one, two = keys(1, "local"), keys(2, "local")
    assert one["baseline"] != two["baseline"] and one["finetune"] != two["finetune"]
    assert one["hessian"] != two["hessian"]  # downstream of the baseline
