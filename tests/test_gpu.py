"""The GPU paths: fp16 with a GradScaler, Hessian actors on fractional GPUs (gloo on CUDA
tensors) and on whole GPUs (nccl), IEEE float32 HVPs (TF32 off), a CUDA pipeline run.

Every test here needs a CUDA GPU (the nccl test two) and is skipped without one; their CPU
counterparts (bf16 autocast, config validation) are tests/test_precision*.py. Ground truths: the
float32 / CPU float64 computations of the same inputs and an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_precision_pipeline import CNN
from test_ray_backend import CONFIG, make_job, reference
from tiny_run import write_config
from torch import nn

from hawq.precision import Precision, exact_float32
from hawq.qat import QATConfig, QATState, run_qat, train_float
from hawq.quant import BitConfig, LayerBits, fake_quantize, quantize_act
from pipeline.backends.ray import RayBackendConfig
from pipeline.backends.ray.backend import RayBackend
from pipeline.cli import main

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (fp16 GradScaler, GPU Hessian actors, nccl): none here",
)
CUDA = torch.device("cuda")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10))  # fmt: skip


def _data(n: int = 1280) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 64, generator=gen)
    w = torch.randn(64, 10, generator=gen)
    return x, (x @ w).argmax(1)


def test_fp16_activation_codes_equal_float32_bit_exactly():
    x = (torch.randn(50000, generator=torch.Generator().manual_seed(0)) * 3).half().to(CUDA)
    lo, hi = torch.tensor(-2.5, device=CUDA), torch.tensor(7.3, device=CUDA)
    with torch.autocast("cuda", dtype=torch.float16):
        out = quantize_act(x, lo, hi, 4)
    assert out.dtype == torch.float16
    assert torch.equal(out, quantize_act(x.float(), lo, hi, 4).half())
    naive = torch.round(x / torch.tensor(10.0 / 15, device=CUDA).half())
    assert (naive.float() != torch.round(x.float() / (10.0 / 15))).any()  # fp16 would differ
    with torch.autocast("cuda", dtype=torch.float16):
        y = fake_quantize(x.float(), torch.tensor(0.1, device=CUDA), None, -7, 7)
    assert y.dtype == torch.float32


def _fp16_qat(model, data, **kw):
    cfg = QATConfig(epochs=2, lr=0.05, batch_size=128, seed=3, amp="fp16")
    bits = BitConfig(weight_bits=4, act_bits=8, layers={"4": LayerBits(8, 8)})
    return run_qat(model, [["0"], ["2", "4"]], data, None, cfg, bit_config=bits, **kw)


def test_fp16_grad_scaler_state_resumes_bit_identically(tmp_path):
    """fp16 QAT on the GPU: the GradScaler's scale and growth counter are in the state; a run
    resumed 4 steps into its third epoch (state through safetensors + JSON) ends bit for bit
    as the uninterrupted one."""
    data = _data()
    saved: dict[str, QATState] = {}

    def at_step(global_epoch, steps, capture):
        if (global_epoch, steps) == (2, 4):
            saved["state"] = capture()

    full = _mlp().to(CUDA)
    recs = _fp16_qat(full, data, on_step=at_step)
    meta = saved["state"].meta
    scaler = meta["grad_scaler"]
    assert 0 < scaler["scale"] <= 65536.0 and "_growth_tracker" in scaler
    save_file(saved["state"].tensors, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(meta))
    tensors, text = load_file(str(tmp_path / "s.safetensors")), (tmp_path / "s.json").read_text()
    back = QATState(tensors, json.loads(text))
    resumed = _mlp().to(CUDA)
    again = _fp16_qat(resumed, data, state=back)
    strip = [{k: v for k, v in vars(r).items() if k != "seconds"} for r in recs]
    assert [{k: v for k, v in vars(r).items() if k != "seconds"} for r in again] == strip
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_training_is_close_to_float32():
    """Float training, 1 epoch: fp16 weights within 5% of the float32 run's weight change
    (fp16's 11 significant bits perturb less than bf16's 8, which the CPU test bounds at
    10%); not equal (autocast ran); float32 parameters."""
    data = _data()
    start = _mlp().to(CUDA)
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    base = QATConfig(epochs=1, lr=0.05, batch_size=128, seed=2)
    train_float(a, data, None, base)
    train_float(b, data, None, QATConfig(**{**base.to_dict(), "amp": "fp16"}))
    s, sa, sb = start.state_dict(), a.state_dict(), b.state_dict()
    diff = sum(float((sa[k] - sb[k]).double().norm() ** 2) for k in s) ** 0.5
    moved = sum(float((sa[k] - s[k]).double().norm() ** 2) for k in s) ** 0.5
    assert 1e-5 * moved < diff < 0.05 * moved, (diff, moved)
    assert all(v.dtype == torch.float32 for v in sb.values())


def test_exact_float32_turns_tf32_off_and_restores_it():
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [f.fp32_precision for f in flags]
    with torch.autocast("cuda", dtype=torch.float16), exact_float32(CUDA):
        assert [f.fp32_precision for f in flags] == ["ieee", "ieee"]
        assert not torch.is_autocast_enabled("cuda")
    assert [f.fp32_precision for f in flags] == before
    x = torch.randn(256, 256, device=CUDA)
    with exact_float32(CUDA):  # IEEE float32: as exact as a float64 product rounded
        err = (x @ x - (x.double() @ x.double()).float()).abs().max() / (x.abs().max() ** 2)
    assert float(err) < 1e-5


# ------------------------------------------------------------------ Hessian actors on GPUs


def _rows(gpus_per_actor: float, data_shards: int) -> tuple[list[dict], list[dict]]:
    """(Ray backend rows on GPU actors, single-process CPU float64 rows) of the same job."""
    job = make_job(CONFIG)
    ray.init(address="local", num_cpus=data_shards, num_gpus=torch.cuda.device_count(),
             include_dashboard=False)  # fmt: skip
    try:
        backend = RayBackend(
            RayBackendConfig(
                data_shards=data_shards,
                gpus_per_actor=gpus_per_actor,
                cpus_per_actor=1,
                collective_timeout_s=60,
            )  # fmt: skip
        )
        try:
            table = backend.run(job, progress=False)
        finally:
            backend.close()
    finally:
        ray.shutdown()
    return table.to_pylist(), reference(job)


def _assert_close(got: list[dict], want: list[dict]) -> None:
    assert [r["block"] for r in got] == [r["block"] for r in want]
    for g, w in zip(got, want, strict=True):
        for col in ("eigenvalue", "trace"):
            assert math.isclose(g[col], w[col], rel_tol=1e-8), (g["block"], col)
        assert g["hvps"] == w["hvps"]


def test_hessian_actors_share_one_gpu_with_fractions():
    """Two actors on 0.5 GPU each (gloo all-reduce of CUDA tensors) in float64 give the CPU
    single-process rows to 1e-8."""
    got, want = _rows(0.5, 2)
    _assert_close(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs two GPUs: fewer here")
def test_hessian_actors_on_whole_gpus_use_nccl():
    got, want = _rows(1.0, 2)
    _assert_close(got, want)


def test_precision_check_device_accepts_cuda():
    Precision(amp="fp16").check_device(CUDA)
    assert Precision(amp="fp16").grad_scaler(CUDA) is not None


def test_pipeline_on_cuda_with_fp16_and_channels_last(tmp_path):
    """All seven stages on the GPU with fp16 + channels_last (a CNN with BatchNorm); the
    fine-tuning state carries the GradScaler; the result is close to the float32 GPU run."""
    runs = {}
    for name, precision in (("f32", {}), ("f16", {"amp": "fp16", "channels_last": True})):
        changes = {"run": {"device": "cuda"}, "model": CNN, "precision": precision}
        config = write_config(tmp_path / f"{name}.yaml", changes)
        runs[name] = tmp_path / name
        assert main(["-q", "run", str(config), "--run-dir", str(runs[name])]) == 0
    with safe_open(str(runs["f16"] / "stages/finetune/state.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["qat"])
    assert meta["config"]["amp"] == "fp16" and meta["grad_scaler"]["scale"] > 0
    final = [
        pq.read_table(r / "stages/evaluate/metrics.parquet").to_pylist()[-1] for r in runs.values()
    ]
    assert abs(final[0]["eval_acc"] - final[1]["eval_acc"]) <= 0.05
