"""Mixed precision (bf16 autocast, for real on the CPU) and channels_last in training/evaluation.

Ground truths: the quantizer's closed form in float32 (codes must not depend on autocast), the
same run in float32 / contiguous memory (close, to a stated tolerance), an uninterrupted run
(a resumed one equals it bit for bit), and hawq's own HVP outside autocast. fp16 needs CUDA: on
the CPU its configs fail before any work (the fp16 / GPU paths themselves: tests/test_gpu.py).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch
from torch import nn

from hawq.hessian.operator import HessianOperator
from hawq.precision import Precision, exact_float32
from hawq.qat import QATConfig, QATState, evaluate, run_qat, train_float
from hawq.quant import ActQuant, BitConfig, LayerBits, QuantConv2d, QuantLinear, calibrate_
from hawq.quant.modules import quantize_
from hawq.quant.primitives import (
    act_qparams,
    fake_quantize,
    quantize_act,
    quantize_weight,
    quantize_weight_int,
)
from pipeline.models import SmallCNN

BF16 = torch.bfloat16


def _autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=BF16)


@pytest.fixture(scope="module")
def cnn(digits):
    """A SmallCNN (conv-BN x2, fc x2) trained 2 epochs in float32."""
    torch.manual_seed(0)
    model = SmallCNN(width=8, hidden=32)
    train_float(model, digits[0], None, QATConfig(epochs=2, lr=0.05, batch_size=64, seed=1))
    return model.eval()


def _closed_form(x: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s, all in float32."""
    n = 2**bits - 1
    s = torch.tensor((max(hi, 0.0) - min(lo, 0.0)) / n, dtype=torch.float32)
    z = torch.round(-torch.tensor(min(lo, 0.0), dtype=torch.float32) / s).clamp(0, n)
    return (torch.clamp(torch.round(x.float() / s) + z, 0, n) - z) * s


# ------------------------------------------------------------------ quantizers under autocast


def test_activation_codes_under_autocast_equal_float32_bit_exactly():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(20000, generator=gen) * 3).to(BF16)  # an autocast activation
    lo, hi, bits = -2.5, 7.3, 4
    ref = _closed_form(x, lo, hi, bits)
    with _autocast():
        out = quantize_act(x, torch.tensor(lo), torch.tensor(hi), bits)
    assert out.dtype == BF16
    assert torch.equal(out, ref.to(BF16))  # float32 codes, rounded to the input's dtype
    # the same arithmetic in bfloat16 gives other codes: the float32 guard is what matters
    s, z = act_qparams(lo, hi, bits)
    naive = torch.clamp(torch.round(x / s.to(BF16)) + z.to(BF16), 0, 15)
    exact = torch.clamp(torch.round(x.float() / s) + z, 0, 15)
    assert (naive.float() != exact).sum() > 100
    # float32 and float64 inputs keep their dtype and values under autocast
    x32 = torch.randn(1000, generator=gen)
    with _autocast():
        a32 = quantize_act(x32, lo, hi, bits)
        a64 = quantize_act(x32.double(), lo, hi, bits)
    assert torch.equal(a32, quantize_act(x32, lo, hi, bits)) and a64.dtype == torch.float64


def test_weight_codes_and_ste_gradient_under_autocast():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=gen, requires_grad=True)
    plain = quantize_weight(w, 3, mse_clip=True)
    codes, scale = quantize_weight_int(w, 3, mse_clip=True)
    with _autocast():
        amp = quantize_weight(w, 3, mse_clip=True)
        amp_codes, amp_scale = quantize_weight_int(w, 3, mse_clip=True)
    assert amp.dtype == torch.float32 and torch.equal(amp, plain)
    assert torch.equal(amp_codes, codes) and torch.equal(amp_scale, scale)
    # a bfloat16 weight: scales and codes from its float32 values
    wb = w.detach().to(BF16)
    with _autocast():
        qb = quantize_weight(wb, 4)
        cb, sb = quantize_weight_int(wb, 4)
    assert torch.equal(qb, quantize_weight(wb.float(), 4).to(BF16))
    assert torch.equal(cb, quantize_weight_int(wb.float(), 4)[0]) and sb.dtype == torch.float32
    # straight-through gradient through the casts: 1 inside the range, 0 where clipped
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 5.0], dtype=BF16, requires_grad=True)
    with _autocast():
        y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7)
    y.float().sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_quantized_model_under_autocast_quantizes_in_float32(cnn, digits):
    """Every activation quantizer of a bf16 forward returns the closed-form float32 codes of
    the (bfloat16) activation it receives; the quantized weights equal the float32 ones."""
    model = quantize_(copy.deepcopy(cnn), BitConfig(weight_bits=4, act_bits=4))
    calibrate_(model, [digits[0][0][:256]])
    seen = []

    def grab(module: ActQuant, args: tuple, out: torch.Tensor) -> None:
        seen.append((module, args[0].detach(), out.detach()))

    hooks = [m.register_forward_hook(grab) for m in model.modules() if isinstance(m, ActQuant)]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)}
    weights = {n: m.quantized_weight() for n, m in layers.items()}
    with torch.no_grad(), _autocast():
        model(digits[1][0][:64])
        amp_weights = {n: m.quantized_weight() for n, m in layers.items()}
    for h in hooks:
        h.remove()
    assert {x.dtype for _, x, _ in seen} == {torch.float32, BF16}  # the image, then activations
    for m, x, out in seen:
        lo, hi = float(m.running_min), float(m.running_max)
        assert torch.equal(out, _closed_form(x, lo, hi, m.bits).to(x.dtype))
    assert all(torch.equal(amp_weights[n], w) for n, w in weights.items())


def test_hvp_inside_autocast_stays_in_float32():
    """The Hessian operator ignores a caller's autocast: same HVP bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    v = torch.randn(8 * 6 + 8)
    with HessianOperator(model, nn.functional.cross_entropy, [(x, y)]) as op:
        plain = op.hvp("0", v)
    with HessianOperator(model, nn.functional.cross_entropy, [(x, y)]) as op, _autocast():
        amp = op.hvp("0", v)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is untouched
    assert amp.dtype == torch.float32 and torch.equal(amp, plain)
    with _autocast(), exact_float32(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------ training and evaluation


def _qat(model, data, cfg, **kw):
    bits = BitConfig(weight_bits=4, act_bits=4, layers={"fc2": LayerBits(8, 8)})
    return run_qat(model, [["conv1", "conv2"], ["fc1", "fc2"]], data, None, cfg, bit_config=bits,
                   **kw)  # fmt: skip


def _max_rel(a: dict, b: dict) -> float:
    """Largest |a - b| over the float tensors, relative to each tensor's largest |a|."""
    return max(
        float((a[k].double() - b[k].double()).abs().max() / a[k].abs().max().clamp(min=1e-12))
        for k in a
        if a[k].is_floating_point()
    )


def test_channels_last_matches_contiguous(cnn, digits):
    """channels_last changes memory order only: evaluation to 1e-5 of the loss, and 3 QAT steps
    (quantized convs, BatchNorm in training) to 1e-4 of each weight's scale. The tolerances
    are float32 reassociation in the convolution kernels (~1e-7 per op) grown through the
    network and three SGD steps; a wrong layout (e.g. a transposed weight) is off by O(1)."""
    test = (digits[1][0][:300], digits[1][1][:300])
    nchw = evaluate(copy.deepcopy(cnn), test)
    model = copy.deepcopy(cnn)
    nhwc = evaluate(model, test, precision=Precision(channels_last=True))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc[1] == nchw[1] and abs(nhwc[0] - nchw[0]) <= 1e-5 * nchw[0]
    train = (digits[0][0][:192], digits[0][1][:192])  # 3 steps of 64
    cfg = QATConfig(epochs=1, lr=0.05, batch_size=64, seed=2)
    a, b = copy.deepcopy(cnn), copy.deepcopy(cnn)
    _qat(a, train, cfg)
    _qat(b, train, QATConfig(**{**cfg.to_dict(), "channels_last": True}))
    assert b.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert _max_rel(a.state_dict(), b.state_dict()) < 1e-4
    assert not torch.equal(a.conv1.weight, cnn.conv1.weight)  # it did train


def _change(start: dict, a: dict, b: dict) -> tuple[float, float]:
    """(||a - b||, ||a - start||) over the trained tensors (not BatchNorm statistics)."""
    keys = [k for k in start if start[k].is_floating_point() and "running" not in k]
    diff = sum(float((a[k] - b[k]).double().norm() ** 2) for k in keys) ** 0.5
    moved = sum(float((a[k] - start[k]).double().norm() ** 2) for k in keys) ** 0.5
    return diff, moved


def test_bf16_training_is_close_to_float32_but_not_equal(cnn, digits):
    """bf16 autocast really runs (weights differ from float32) and stays close.

    Float training, 1 epoch (22 steps): within 10% of the float32 run's weight change.
    bfloat16 keeps 8 significant bits (rounding 2^-9 ~ 0.2% per value), which perturbs each
    step's gradient by about a percent through the network; measured 3.0% here (1.5% in the
    pipeline test's MLP), against 0.13% for float32 channels_last vs contiguous. QAT is
    compared by its losses and accuracy, not weights: a 4-bit weight flips a code on any
    perturbation, so even float32 reassociation (channels_last) moves QAT weights by ~15% of
    their change at this learning rate (measured); the QAT bound is a sanity check (measured:
    train loss 0.0867 vs 0.0819, eval loss 0.124 vs 0.114, accuracy 95.5% vs 96.7%), which a
    quantizer broken under autocast would miss by far."""
    base = QATConfig(epochs=1, lr=0.01, batch_size=64, seed=3)
    f32, b16 = copy.deepcopy(cnn), copy.deepcopy(cnn)
    train_float(f32, digits[0], None, base)
    train_float(b16, digits[0], None, QATConfig(**{**base.to_dict(), "amp": "bf16"}))
    diff, moved = _change(cnn.state_dict(), f32.state_dict(), b16.state_dict())
    assert 1e-3 * moved < diff < 0.1 * moved, (diff, moved)
    assert all(v.dtype == torch.float32 for v in b16.state_dict().values() if v.is_floating_point())
    cfg = QATConfig(epochs=1, lr=0.05, batch_size=64, seed=3)
    test = (digits[1][0], digits[1][1])
    q32, q16 = copy.deepcopy(cnn), copy.deepcopy(cnn)
    r32 = _qat(q32, digits[0], cfg)
    r16 = _qat(q16, digits[0], QATConfig(**{**cfg.to_dict(), "amp": "bf16"}))
    assert abs(r16[-1].train_loss - r32[-1].train_loss) < 0.25 * r32[-1].train_loss
    l32, acc32 = evaluate(q32, test)
    l16, acc16 = evaluate(q16, test, precision=Precision(amp="bf16"))
    assert abs(acc16 - acc32) < 0.03 and abs(l16 - l32) < 0.25 * l32, (acc16, acc32, l16, l32)


def _strip(recs):
    return [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in recs]


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_resume_mid_epoch_is_bit_identical(cnn, digits, tmp_path, channels_last):
    """A bf16 (and channels_last) QAT run resumed from its state 5 steps into its third epoch,
    persisted as the pipeline does (safetensors + JSON), ends bit for bit as the uninterrupted
    run (weights, quantizer ranges, momentum, records)."""
    from safetensors.torch import load_file, save_file

    train = (digits[0][0][:640], digits[0][1][:640])  # 10 steps per epoch
    cfg = QATConfig(epochs=2, lr=0.05, batch_size=64, seed=4, amp="bf16",
                    channels_last=channels_last)  # fmt: skip
    saved: dict[str, QATState] = {}

    def at_step(global_epoch, steps, capture):
        if (global_epoch, steps) == (2, 5):
            saved["state"] = capture()

    ends: dict[int, QATState] = {}
    again: dict[int, QATState] = {}

    def keep(into: dict[int, QATState]):
        def at_end(rec, state) -> None:
            into[rec.global_epoch] = state

        return at_end

    full = copy.deepcopy(cnn)
    recs = _qat(full, train, cfg, on_step=at_step, on_epoch_end=keep(ends))
    st = saved["state"]
    save_file(st.tensors, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(st.meta))
    tensors, meta = load_file(str(tmp_path / "s.safetensors")), (tmp_path / "s.json").read_text()
    resumed = copy.deepcopy(cnn)
    back = QATState(tensors, json.loads(meta))
    res_recs = _qat(resumed, train, cfg, state=back, on_epoch_end=keep(again))
    assert _strip(res_recs) == _strip(recs)
    assert sorted(again) == [2, 3]
    for g in (2, 3):
        a, b = ends[g].tensors, again[g].tensors
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), g
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "grad_scaler" not in st.meta  # bf16 needs no loss scaling


def test_fp16_needs_cuda_before_any_training(cnn, digits):
    model = copy.deepcopy(cnn)
    cfg = QATConfig(epochs=1, amp="fp16")
    with pytest.raises(ValueError, match="fp16.*needs a CUDA device.*bf16"):
        train_float(model, digits[0], None, cfg)
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="fp16"):
        evaluate(model, digits[1], precision=Precision(amp="fp16"))
    with pytest.raises(ValueError, match="amp must be one of"):
        QATConfig(amp="fp8")
    with pytest.raises(ValueError, match="channels_last must be a bool"):
        Precision(channels_last="yes")


def test_state_saved_before_the_precision_keys_still_resumes(cnn, digits):
    """A state whose config predates ``amp`` / ``channels_last`` (their defaults) resumes; one
    saved with bf16 is refused by a float32 run."""
    train = (digits[0][0][:256], digits[0][1][:256])
    cfg = QATConfig(epochs=2, lr=0.05, batch_size=64, seed=5)
    states: dict[int, QATState] = {}

    def keep(rec, state) -> None:
        states[rec.global_epoch] = state

    full = copy.deepcopy(cnn)
    train_float(full, train, None, cfg, on_epoch_end=keep)
    old = states[0]
    old.meta["config"] = {
        k: v for k, v in old.meta["config"].items() if k not in ("amp", "channels_last")
    }
    resumed = copy.deepcopy(cnn)
    train_float(resumed, train, None, cfg, state=old)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    bf16 = QATConfig(**{**cfg.to_dict(), "amp": "bf16"})
    with pytest.raises(ValueError, match="different config"):
        train_float(copy.deepcopy(cnn), train, None, bf16, state=states[0])
