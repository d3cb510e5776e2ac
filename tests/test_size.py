"""Size, compression and BOPs accounting against byte counts and MACs done by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawq.models.resnet_cifar import cifar_resnet
from hawq.quant import BitConfig, LayerBits, bit_config_of, quantize_
from hawq.size import (
    MB,
    activation_compression_ratio,
    bops,
    compression_ratio,
    layer_costs,
    model_size_bytes,
    model_size_mb,
    size_summary,
    weight_compression_ratio,
)

torch.set_num_threads(1)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


MIXED = BitConfig(weight_bits=8, act_bits=8, layers={"0": LayerBits(4, 8), "2": LayerBits(2, 32)})


def test_size_of_small_mlp_counted_by_hand():
    m = _mlp()
    # layer 0: 12 weights * 4 bits = 6 B, 3 float32 scales = 12 B, bias 3*4 = 12 B,
    #          act scale + zero point = 8 B                                      -> 38 B
    # BN: weight, bias, running_mean, running_var = 4 * 3 float32 (num_batches_tracked: no) -> 48
    # layer 2: 6 weights * 2 bits = 12 bits -> 2 B, 2 scales = 8 B, bias 8 B, float input -> 18
    assert model_size_bytes(m, MIXED) == 38 + 48 + 18
    assert model_size_mb(m, MIXED) == 104 / 2**20 and MB == 2**20
    # float: 12 + 3 + 12 + 6 + 2 = 35 float32 values
    float_cfg = BitConfig(weight_bits=32, act_bits=32)
    assert model_size_bytes(m, float_cfg) == 140
    assert compression_ratio(m, MIXED) == 140 / 104
    assert compression_ratio(m, float_cfg) == 1.0
    # weights only: 32 * 18 / (12 * 4 + 6 * 2) = 576 / 60
    assert weight_compression_ratio(m, MIXED) == 576 / 60
    assert activation_compression_ratio(m, MIXED) == (32 / 8 + 32 / 32) / 2


def test_size_per_tensor_scales_and_quantized_model_agree():
    m = _mlp()
    cfg = BitConfig(weight_bits=3, act_bits=4, per_channel=False)
    # layer 0: ceil(36/8)=5 + 1 scale 4 + bias 12 + act 8 = 29; BN 48; layer 2: ceil(18/8)=3
    # + 4 + 8 + 8 = 23
    assert model_size_bytes(m, cfg) == 29 + 48 + 23
    quantize_(m, cfg)
    m(torch.randn(4, 4))  # EMA buffers now exist and are set: they must not be counted twice
    assert model_size_bytes(m, bit_config_of(m)) == 29 + 48 + 23


def test_layer_costs_macs_by_hand():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 5x5 -> 4*5*5 outputs * (2*3*3) = 1800 MACs
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False),  # 4*3*3 * (2*9) = 648
        nn.Flatten(),
        nn.Linear(36, 7),  # 7 * 36 = 252
    )
    costs = layer_costs(net, torch.randn(3, 2, 5, 5))
    assert [(c.name, c.kind, c.params, c.bias, c.macs, c.out_channels) for c in costs] == [
        ("0", "conv", 72, 4, 1800, 4),
        ("1", "conv", 72, 0, 648, 4),
        ("3", "linear", 252, 7, 252, 7),
    ]
    cfg = BitConfig(weight_bits=8, act_bits=8, layers={"1": LayerBits(2, 4), "3": (32, 32)})
    assert bops(costs, cfg) == 1800 * 8 * 8 + 648 * 2 * 4 + 252 * 32 * 32


def test_mlp_bops_and_training_mode_restored():
    m = _mlp().train()
    costs = layer_costs(m, torch.randn(2, 4))
    assert [c.macs for c in costs] == [12, 6] and m.training
    assert bops(costs, MIXED) == 12 * 4 * 8 + 6 * 2 * 32


def test_resnet20_macs_and_size_by_hand():
    m = cifar_resnet(20)
    costs = layer_costs(m, torch.randn(1, 3, 32, 32))
    hw = {1: 32 * 32, 2: 16 * 16, 3: 8 * 8}
    ch = {1: 16, 2: 32, 3: 64}
    expect = 32 * 32 * 16 * 27  # conv1
    for s in (1, 2, 3):
        cin = 16 if s == 1 else ch[s - 1]
        expect += hw[s] * ch[s] * 9 * cin  # first conv of the stage
        expect += 5 * hw[s] * ch[s] * 9 * ch[s]  # the other five
    expect += 64 * 10  # linear
    assert sum(c.macs for c in costs) == expect == 40_551_040
    n_w = sum(c.params for c in costs)
    assert n_w == 16 * 27 + 6 * 16 * 144 + 32 * 144 + 5 * 32 * 288 + 64 * 288 + 5 * 64 * 576 + 640
    cfg = BitConfig(weight_bits=2, act_bits=4)
    bn = 2 * 2 * (16 * 7 + 32 * 6 + 64 * 6)  # weight+bias and mean+var of 19 BNs
    n_out = sum(c.out_channels for c in costs)
    expect_bytes = sum((c.params * 2 + 7) // 8 for c in costs) + 4 * n_out + 40 + 4 * bn + 8 * 20
    assert model_size_bytes(m, cfg) == expect_bytes
    s = size_summary(m, cfg, torch.randn(1, 3, 32, 32))
    assert s["bops"] == expect * 8 and s["float_bops"] == expect * 1024
    assert s["weight_compression"] == 16.0 and s["act_compression"] == 8.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_weight_compression_is_32_over_bits(bits):
    m = _mlp()
    assert weight_compression_ratio(m, BitConfig(weight_bits=bits)) == 32 / bits
