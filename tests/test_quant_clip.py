"""Weight clipping per bit width, MSE-optimal clip search, first/last activation bits, and 8-bit
per-channel PTQ of the pretrained ResNet-20 (within 0.5 points of float)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from hawq.allocate import AllocConfig, to_bit_config
from hawq.quant import BitConfig, LayerBits, export_integer, quantize_
from hawq.quant.primitives import (
    MSE_CLIP_GRID,
    clip_range,
    clips_at,
    mse_clip_ratios,
    quantize_weight,
    weight_range,
)

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / ".." / "shared" / "data" / "cifar10"


def _brute_force_ratio(row: np.ndarray, bits: int) -> float:
    """Independent reference: loop over the grid in float64 arithmetic on float32 values."""
    qmax = 2 ** (bits - 1) - 1
    m = np.float32(np.abs(row).max())
    best, best_err = None, np.inf
    for c in MSE_CLIP_GRID:
        r = np.float32(m * np.float32(c))
        s = np.float32(r / np.float32(qmax)) if r > 0 else np.float32(1.0)
        q = np.clip(np.round(row / s), -qmax, qmax).astype(np.float32) * s
        err = float(np.sum((q.astype(np.float64) - row.astype(np.float64)) ** 2))
        if err < best_err:
            best, best_err = c, err
    return best


def test_mse_clip_hand_value():
    # 2 bits (codes -1, 0, 1), w = twelve 1s and one 4. For c < 1/2 every value maps to
    # s = 4c: err(c) = 12 (1 - 4c)^2 + 16 (1 - c)^2, minimal at c = 4/13 = 0.3077 -> grid 0.31
    # (err 8.3088; 0.30: 8.32; 0.32: 8.3392); c = 1 gives 12 (the ones round to 0).
    w = torch.tensor([1.0] * 12 + [4.0])
    assert float(mse_clip_ratios(w, 2, per_channel=False)) == np.float32(0.31)
    s = np.float32(np.float32(4.0) * np.float32(0.31))
    out = quantize_weight(w, 2, per_channel=False, mse_clip=True)
    assert torch.equal(out, torch.full((13,), float(s)))
    # at 8 bits clipping cannot help this tensor: max-scaling (ratio 1) is kept
    assert float(mse_clip_ratios(w, 8, per_channel=False)) == 1.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_clip_matches_brute_force_per_channel(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 3, 3, generator=gen)
    w[1] *= 0.0  # an all-zero channel keeps ratio 1 (every ratio ties)
    w[2, 0, 0, 0] = 25.0  # an outlier: clipping pays
    w[3] = torch.distributions.Laplace(0.0, 1.0).sample((3, 3, 3))
    got = mse_clip_ratios(w, bits).tolist()
    want = [float(np.float32(_brute_force_ratio(row, bits))) for row in w.reshape(6, -1).numpy()]
    assert got == want
    assert got[1] == 1.0
    # the chosen range never has more error than max-scaling, per channel
    r = clip_range(w, bits, mse_clip=True)
    assert torch.equal(r, weight_range(w) * mse_clip_ratios(w, bits))
    q_mse = quantize_weight(w, bits, mse_clip=True)
    q_max = quantize_weight(w, bits)
    e_mse = ((q_mse - w) ** 2).reshape(6, -1).sum(1)
    e_max = ((q_max - w) ** 2).reshape(6, -1).sum(1)
    assert bool((e_mse <= e_max).all())


def test_clip_bits_limits_clipping_to_low_widths():
    # sorted |w| = [0.25, 0.5, 1.25, 3.5, 100]; the 75th percentile is 3.5
    w = torch.tensor([0.5, -1.25, 3.5, -0.25, 100.0])
    kw = {"per_channel": False, "percentile": 75.0, "clip_bits": 2}
    assert float(clip_range(w, 2, **kw)) == 3.5
    assert float(clip_range(w, 4, **kw)) == 100.0
    assert torch.equal(quantize_weight(w, 4, **kw), quantize_weight(w, 4, per_channel=False))
    assert torch.equal(
        quantize_weight(w, 2, **kw), quantize_weight(w, 2, per_channel=False, percentile=75.0)
    )
    assert clips_at(2, percentile=75.0, clip_bits=2) and not clips_at(3, mse_clip=True, clip_bits=2)
    assert not clips_at(4) and not clips_at(4, percentile=100.0)
    # max-scaled 4-bit (clip_bits excludes it): the gradient is the identity (nothing clipped)
    x = w.clone().requires_grad_(True)
    quantize_weight(x, 4, **kw).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(w))


def test_bad_clip_options_fail_with_the_key():
    w = torch.ones(3)
    with pytest.raises(ValueError, match="not both"):
        quantize_weight(w, 4, percentile=99.0, mse_clip=True)
    with pytest.raises(ValueError, match="clip_bits"):
        BitConfig(clip_bits=9)
    with pytest.raises(ValueError, match="mse_clip"):
        BitConfig(mse_clip=True, percentile=99.0)
    with pytest.raises(ValueError, match="input_act_bits"):
        AllocConfig(compression=8.0, input_act_bits=1)
    with pytest.raises(ValueError, match="grid"):
        mse_clip_ratios(w, 4, grid=(1.5,))


def test_bit_config_round_trips_clip_options(tmp_path):
    cfg = BitConfig(weight_bits=4, act_bits=4, mse_clip=True, clip_bits=3, layers={"a": (2, 8)})
    for suffix in ("yaml", "json", "parquet"):
        cfg.save(tmp_path / f"b.{suffix}")
        assert BitConfig.load(tmp_path / f"b.{suffix}") == cfg


def test_modules_and_export_use_the_clip_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    cfg = BitConfig(weight_bits=2, act_bits=8, mse_clip=True, clip_bits=2, layers={"2": (8, 8)})
    quantize_(model, cfg)
    w0 = model[0].weight
    assert torch.equal(model[0].quantized_weight(), quantize_weight(w0, 2, mse_clip=True))
    w2 = model[2].weight  # 8 bits > clip_bits: max-scaled
    assert torch.equal(model[2].quantized_weight(), quantize_weight(w2, 8))
    out = export_integer(model)
    deq = out["0.weight_int"].float() * out["0.weight_scale"].view(-1, 1, 1, 1)
    assert torch.equal(deq, quantize_weight(w0, 2, mse_clip=True))


def test_to_bit_config_keeps_network_input_and_last_layer_at_8_bits():
    table = pa.table(
        {"modules": [["conv1"], ["layer1.0.conv1", "layer1.0.conv2"], ["fc"]], "bits": [8, 4, 8]}
    )
    cfg = to_bit_config(table, act_bits=4, input_act_bits=8, last_act_bits=8)
    assert cfg.resolve("conv1") == LayerBits(8, 8)
    assert cfg.resolve("layer1.0.conv1") == LayerBits(4, 4)
    assert cfg.resolve("layer1.0.conv2") == LayerBits(4, 4)
    assert cfg.resolve("fc") == LayerBits(8, 8)
    same = to_bit_config(table, act_bits=4)  # None: every input at act_bits
    assert same.resolve("conv1").act == 4 and same.resolve("fc").act == 4


@pytest.mark.skipif(
    not (CIFAR / "cifar10_subset.npz").exists() or not (CIFAR / "resnet20-12fca82f.th").exists(),
    reason="needs ../shared/data/cifar10 (CIFAR-10 subset and pretrained ResNet-20)",
)
def test_8bit_per_channel_ptq_of_pretrained_resnet20_is_within_half_a_point():
    import copy

    from hawq.qat import evaluate
    from hawq.quant import calibrate_
    from pipeline.config import load_config
    from pipeline.data import load_data
    from pipeline.models import build_model

    torch.set_num_threads(2)
    cwd = Path.cwd()
    import os

    os.chdir(ROOT)
    try:
        cfg = load_config(ROOT / "configs" / "resnet20_cifar10.yaml", ["data.hessian_samples=128"])
        data = load_data(cfg.data)
        model = build_model(cfg.model).eval()
    finally:
        os.chdir(cwd)
    assert len(data.eval_y) == 932
    _, fp = evaluate(model, (data.eval_x, data.eval_y), batch_size=466)
    q = quantize_(copy.deepcopy(model), BitConfig(weight_bits=8, act_bits=8))
    calibrate_(q, [data.train_x[i : i + 256] for i in range(0, 1024, 256)])
    _, acc = evaluate(q, (data.eval_x, data.eval_y), batch_size=466)
    assert fp > 0.9
    assert abs(acc - fp) <= 0.005, (fp, acc)
