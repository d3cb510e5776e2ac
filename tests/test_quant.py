"""Quantizer primitives (bit-exact vs hand-computed values), modules, quantize_, BitConfig."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hawq.quant import (
    ActQuant,
    BitConfig,
    LayerBits,
    QuantConv2d,
    QuantLinear,
    act_qparams,
    bit_config_of,
    calibrate_,
    export_integer,
    quantize_,
    quantize_act,
    quantize_weight,
    quantize_weight_int,
    weight_range,
    weight_scale,
)

torch.set_num_threads(1)

# Multipliers m of the scale s (a power of two, so s * m and (s * m) / s are exact in float32)
# and their codes round-half-to-even(m), written out by hand.
MULTS_ALL = [0.3, 0.5, -0.75, -0.5, 0.0]
CODES_ALL = [0, 0, -1, 0, 0]
MULTS_3UP = [1.5, 2.5, -2.5, 1.2]
CODES_3UP = [2, 2, -2, 1]


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_tensor_weight_matches_hand_values(bits):
    qmax = 2 ** (bits - 1) - 1
    s = 0.125
    mults = [qmax, -qmax, *MULTS_ALL] + (MULTS_3UP if bits >= 3 else [])
    codes = [qmax, -qmax, *CODES_ALL] + (CODES_3UP if bits >= 3 else [])
    w = torch.tensor(mults, dtype=torch.float32) * s
    out = quantize_weight(w, bits, per_channel=False)
    assert torch.equal(out, torch.tensor(codes, dtype=torch.float32) * s)
    q, scale = quantize_weight_int(w, bits, per_channel=False)
    assert q.dtype == torch.int8 and scale.shape == ()
    assert float(scale) == s
    assert q.tolist() == codes


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_channel_scales_are_per_output_channel(bits):
    qmax = 2 ** (bits - 1) - 1
    # conv weight (3 out, 1 in, 1, 3); channel maxima 0.25*qmax, 2*qmax, and an all-zero channel
    w = torch.tensor(
        [[[[0.25 * qmax, -0.125, 0.0625]]], [[[-2.0 * qmax, 1.0, -1.5]]], [[[0.0, 0.0, 0.0]]]]
    )
    scale = weight_scale(w, bits)
    assert scale.shape == (3,)
    assert scale.tolist() == [0.25, 2.0, 1.0]  # r / qmax; 1 for the zero channel
    q, s2 = quantize_weight_int(w, bits)
    assert torch.equal(s2, scale)
    # codes by hand: -0.125/0.25=-0.5 -> -0 ; 0.0625/0.25=0.25 -> 0 ; 1/2=0.5 -> 0 ;
    # -1.5/2=-0.75 -> -1
    assert q[:, 0, 0, :].tolist() == [[qmax, 0, 0], [-qmax, 0, -1], [0, 0, 0]]
    out = quantize_weight(w, bits)
    assert torch.equal(out, q.float() * scale.view(3, 1, 1, 1))


def test_linear_weight_scales_per_row_and_float_bits_identity():
    w = torch.tensor([[0.5, -7.0], [0.25, 0.125]])
    assert weight_scale(w, 4).tolist() == [1.0, float(np.float32(0.25) / np.float32(7))]
    assert quantize_weight(w, 32) is w


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_quantizer_bit_exact_vs_numpy_formula(bits, per_channel):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=g)
    qmax = 2 ** (bits - 1) - 1
    a = w.numpy().reshape(16, -1) if per_channel else w.numpy().reshape(1, -1)
    scale = (np.abs(a).max(axis=1) / np.float32(qmax)).astype(np.float32)
    codes = np.clip(np.round(a / scale[:, None]), -qmax, qmax)
    expect = (codes * scale[:, None]).astype(np.float32).reshape(w.shape)
    out = quantize_weight(w, bits, per_channel=per_channel)
    assert np.array_equal(out.numpy(), expect)


def test_percentile_clipping_hand_values():
    # sorted |w| = [0.25, 0.5, 1.25, 3.5, 100]; 75th percentile sits at index 3 -> r = 3.5,
    # 4 bits: s = 3.5 / 7 = 0.5; codes round([0.5, -1, 2.5, 7, 200]) -> [0, -1, 2, 7, 7]
    w = torch.tensor([0.25, -0.5, 1.25, 3.5, 100.0])
    assert float(weight_range(w, per_channel=False, percentile=75)) == 3.5
    out = quantize_weight(w, 4, per_channel=False, percentile=75)
    assert out.tolist() == [0.0, -0.5, 1.0, 3.5, 3.5]


def test_percentile_interpolates_like_numpy_per_channel():
    w = torch.randn(5, 37, generator=torch.Generator().manual_seed(0))
    r = weight_range(w, per_channel=True, percentile=99.0)
    expect = np.percentile(np.abs(w.numpy()), 99.0, axis=1)
    np.testing.assert_allclose(r.numpy(), expect, rtol=1e-6)
    assert torch.all(r < w.abs().amax(dim=1))


def test_sqnr_rises_with_bits():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))

    def sqnr(b):
        err = (quantize_weight(w, b) - w).pow(2).sum()
        return 10 * math.log10(float(w.pow(2).sum() / err))

    vals = [sqnr(b) for b in range(2, 9)]
    diffs = np.diff(vals)
    assert np.all(diffs > 0)
    assert np.all(diffs[1:] > 4.5)  # ~6 dB per bit once the grid is fine enough


def test_ste_weight_gradient_zero_for_clipped_weights():
    w = torch.tensor([0.25, -0.5, 1.25, 3.5, 100.0], requires_grad=True)
    quantize_weight(w, 4, per_channel=False, percentile=75).sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", range(2, 9))
def test_ste_weight_gradient_identity_when_nothing_is_clipped(bits):
    w = torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(bits), requires_grad=True)
    quantize_weight(w, bits).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # max|w| included: it is not clipped


def test_ste_activation_gradient_identity_inside_range_only():
    x = torch.tensor([-0.5, 0.0, 0.2, 0.7, 1.0, 1.5], requires_grad=True)
    y = quantize_act(x, 0.0, 1.0, 4)
    (y * torch.arange(6.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]


def test_asymmetric_activation_hand_values():
    # range [-1, 2] at 2 bits: n = 3, s = 1, z = 1; codes clamp(round(x + 1), 0, 3)
    s, z = act_qparams(-1.0, 2.0, 2)
    assert float(s) == 1.0 and float(z) == 1.0
    x = torch.tensor([-1.7, -1.0, -0.4, 0.5, 1.5, 2.2, 3.0])
    # round(x) = [-2, -1, 0, 0, 2, 2, 3] (half to even) -> + z = [-1, 0, 1, 1, 3, 3, 4]
    # -> clamp [0, 3] = [0, 0, 1, 1, 3, 3, 3] -> minus z
    assert quantize_act(x, -1.0, 2.0, 2).tolist() == [-1.0, -1.0, 0.0, 0.0, 2.0, 2.0, 2.0]
    xg = torch.tensor([-2.6, -2.4, 0.3, 2.4, 2.6], requires_grad=True)
    quantize_act(xg, -1.0, 2.0, 2).sum().backward()
    # x/s + z in [0, 3] <=> x in [-1, 2]: only 0.3 lies inside (x/s + z = -1.6, -1.4, 1.3, ...)
    assert xg.grad.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("lo", "hi"), [(-0.7, 2.3), (0.0, 1.9), (-3.1, -0.2)])
def test_activation_quantizer_bit_exact_vs_numpy_formula(bits, lo, hi):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(bits)) * 2
    n = 2**bits - 1
    f32 = np.float32
    lo32, hi32 = min(f32(lo), f32(0)), max(f32(hi), f32(0))
    s = f32((hi32 - lo32) / f32(n))
    z = np.clip(np.round(-lo32 / s), 0, n)
    expect = ((np.clip(np.round(x.numpy() / s) + z, 0, n) - z) * s).astype(f32)
    assert np.array_equal(quantize_act(x, lo, hi, bits).numpy(), expect)


def test_unsigned_activation_hand_values_and_range_widened_to_zero():
    # [0.5, 3.75] widens to [0, 3.75]: 4 bits, s = 3.75 / 15 = 0.25, z = 0
    s, z = act_qparams(0.5, 3.75, 4)
    assert float(s) == 0.25 and float(z) == 0.0
    x = torch.tensor([-1.0, 0.1, 0.125, 0.375, 1.0, 9.0])
    # x / s = [-4, .4, .5, 1.5, 4, 36] -> round [-4, 0, 0, 2, 4, 36] -> clamp [0, 15]
    assert quantize_act(x, 0.5, 3.75, 4).tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 3.75]
    assert torch.equal(quantize_act(x, 0.0, 1.0, 32), x)


def test_act_quant_ema_ranges_and_state_dict():
    aq = ActQuant(8, momentum=0.5)
    aq(torch.tensor([-1.0, 3.0]))
    assert (float(aq.running_min), float(aq.running_max)) == (-1.0, 3.0)  # first batch sets
    aq(torch.tensor([1.0, 5.0]))
    assert (float(aq.running_min), float(aq.running_max)) == (0.0, 4.0)  # 0.5*old + 0.5*new
    aq.eval()
    aq(torch.tensor([-10.0, 10.0]))
    assert (float(aq.running_min), float(aq.running_max)) == (0.0, 4.0)  # no update in eval
    fresh = ActQuant(8, momentum=0.5)
    fresh.load_state_dict(aq.state_dict())
    assert float(fresh.running_max) == 4.0 and bool(fresh.initialized)
    x = torch.linspace(-1, 5, 50)
    assert torch.equal(fresh.eval()(x), quantize_act(x, 0.0, 4.0, 8))
    unseen = ActQuant(4).eval()
    assert torch.equal(unseen(x), x)  # no range observed yet: pass-through


@pytest.mark.parametrize("bad", [0, 1, 9, 16, 64, 4.0, True, "8"])
def test_bad_bits_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        quantize_weight(torch.ones(3), bad)
    with pytest.raises(ValueError, match="LayerBits.weight"):
        LayerBits(bad, 8)
    with pytest.raises(ValueError, match="act_bits"):
        BitConfig(act_bits=bad)


def test_bad_config_fields_raise():
    with pytest.raises(ValueError, match="percentile"):
        BitConfig(percentile=0)
    with pytest.raises(ValueError, match="act_momentum"):
        BitConfig(act_momentum=1.0)
    with pytest.raises(ValueError, match="not a valid regex"):
        BitConfig(layers={"re:(": LayerBits(4, 4)})
    with pytest.raises(ValueError, match="unknown bit config keys"):
        BitConfig.from_dict({"weight_bit": 4})


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.Linear(5, 3),
    )


def test_resolve_exact_beats_regex_first_regex_wins_then_default():
    cfg = BitConfig(
        weight_bits=6,
        act_bits=8,
        layers={
            "re:3\\..*": LayerBits(2, 4),
            "re:.*": LayerBits(3, 3),
            "3.0": LayerBits(5, 5),
            "re:6": LayerBits(7, 7),
        },
    )
    assert cfg.resolve("3.0") == LayerBits(5, 5)  # exact beats an earlier regex
    assert cfg.resolve("3.1") == LayerBits(2, 4)  # first matching regex
    assert cfg.resolve("6") == LayerBits(3, 3)  # "re:.*" comes before "re:6"
    assert BitConfig(layers={"re:5": (4, 4)}).resolve("55") == LayerBits(8, 8)  # fullmatch


def test_quantize_replaces_the_right_modules_with_the_right_bits():
    net = _net()
    keys = list(net.state_dict())
    params = {n: p for n, p in net.named_parameters()}
    cfg = BitConfig(
        weight_bits=4,
        act_bits=8,
        layers={"0": LayerBits(8, 8), "re:3\\..*": LayerBits(2, 4), "6": LayerBits(32, 32)},
    )
    assert quantize_(net, cfg) is net
    assert isinstance(net[0], QuantConv2d) and net[0].bits == LayerBits(8, 8)
    assert isinstance(net[3][0], QuantConv2d) and net[3][0].bits == LayerBits(2, 4)
    assert isinstance(net[5], QuantLinear) and net[5].bits == LayerBits(4, 8)
    assert type(net[6]) is nn.Linear  # (32, 32) stays float
    assert type(net[1]) is nn.BatchNorm2d
    new_params = dict(net.named_parameters())
    assert all(new_params[n] is p for n, p in params.items())  # same Parameter objects
    assert set(keys) <= set(net.state_dict())
    assert bit_config_of(net).layers == {
        "0": LayerBits(8, 8),
        "3.0": LayerBits(2, 4),
        "5": LayerBits(4, 8),
    }


def test_quantize_only_named_modules_and_unknown_name():
    net = _net()
    quantize_(net, BitConfig(weight_bits=3, act_bits=4), modules=["3", "6"])
    assert [type(m).__name__ for m in (net[0], net[3][0], net[5], net[6])] == [
        "Conv2d",
        "QuantConv2d",
        "Linear",
        "QuantLinear",
    ]
    quantize_(net, BitConfig(weight_bits=5, act_bits=6), modules=["3.0"])
    assert net[3][0].bits == LayerBits(5, 6)  # already quantized: bits updated in place
    with pytest.raises(ValueError, match="nope"):
        quantize_(net, BitConfig(), modules=["nope"])


def test_quant_layers_compute_with_quantized_weight_and_input():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    ref = nn.Linear(6, 3)
    ref.load_state_dict(lin.state_dict())
    q = QuantLinear.from_float(lin, LayerBits(3, 4))
    x = torch.randn(5, 6)
    y = q(x)  # training mode: the first batch sets the range to (min x, max x)
    lo, hi = x.min(), x.max()
    xq = quantize_act(x, lo, hi, 4)
    wq = quantize_weight(ref.weight, 3)
    assert torch.equal(y, xq @ wq.t() + ref.bias)
    f = QuantLinear.from_float(ref, LayerBits(32, 32))
    assert torch.equal(f(x), ref(x))


def test_calibrate_observes_ranges_without_touching_batchnorm():
    net = _net()
    quantize_(net, BitConfig(weight_bits=4, act_bits=4))
    bn = net[1].running_mean.clone()
    x = torch.randn(8, 1, 6, 6)
    calibrate_(net, [x])
    assert float(net[0].input_quant.running_min) == float(x.min())
    assert torch.equal(net[1].running_mean, bn) and net.training


def test_export_integer_codes_scales_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    net = _net()
    quantize_(net, BitConfig(weight_bits=4, act_bits=8, layers={"6": LayerBits(32, 4)}))
    calibrate_(net, [torch.randn(4, 1, 6, 6)])
    out = export_integer(net)
    assert out["0.weight_int"].dtype == torch.int8 and out["0.weight_int"].shape == (4, 1, 3, 3)
    assert out["0.weight_scale"].shape == (4,)
    assert int(out["3.0.weight_bits"]) == 4 and out["0.weight_int"].abs().max() <= 7
    assert "6.weight_int" not in out and int(out["6.act_bits"]) == 4
    for name in ("0", "3.0", "5"):
        m = net.get_submodule(name)
        deq = out[f"{name}.weight_int"].float() * out[f"{name}.weight_scale"].view(
            -1, *[1] * (m.weight.dim() - 1)
        )
        assert torch.equal(deq, m.quantized_weight())
    s, z = act_qparams(net[0].input_quant.running_min, net[0].input_quant.running_max, 8)
    assert float(out["0.act_scale"]) == float(s) and int(out["0.act_zero_point"]) == int(z)
    save_file(out, str(tmp_path / "q.safetensors"))
    back = load_file(str(tmp_path / "q.safetensors"))
    assert back.keys() == out.keys() and all(torch.equal(back[k], out[k]) for k in out)


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".parquet"])
def test_bitconfig_file_round_trips(tmp_path, suffix):
    cfg = BitConfig(
        weight_bits=4,
        act_bits=8,
        layers={"conv1": LayerBits(8, 8), "re:layer3\\..*": LayerBits(2, 4), "fc": (3, 32)},
        per_channel=False,
        percentile=99.5,
        act_momentum=0.9,
    )
    path = tmp_path / f"bits{suffix}"
    cfg.save(path)
    back = BitConfig.load(path)
    assert back == cfg
    assert back.resolve("layer3.0.conv2") == LayerBits(2, 4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_bitconfig_parquet_columns_and_dict_round_trip(tmp_path):
    import pyarrow.parquet as pq

    cfg = BitConfig(weight_bits=6, layers={"a": LayerBits(2, 4), "b": LayerBits(8, 32)})
    cfg.save(tmp_path / "b.parquet")
    t = pq.read_table(tmp_path / "b.parquet")
    assert t.column_names == ["module", "weight_bits", "act_bits"]
    assert t.to_pydict() == {"module": ["a", "b"], "weight_bits": [2, 8], "act_bits": [4, 32]}
    assert BitConfig.from_dict(cfg.to_dict()) == cfg
    swapped = BitConfig(weight_bits=6, layers={"b": LayerBits(8, 32), "a": LayerBits(2, 4)})
    assert swapped != cfg  # order matters: regex keys resolve first-match
    assert BitConfig.from_yaml(cfg.to_yaml()) == cfg == BitConfig.from_json(cfg.to_json())
