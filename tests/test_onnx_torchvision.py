"""ONNX QDQ export of mixed-precision torchvision models, checked layer by layer in onnxruntime.

Models: torchvision ResNet-18 (residual blocks, max pool, downsample branch) and MobileNet-V2
(inverted residuals, depthwise = grouped convs, ReLU6), ``weights=None`` (nothing downloads),
10 classes, on the 932 real CIFAR-10 test images (3x32x32). No training: the checks compare
two runtimes of one model, which needs realistic activations and distinct logits, not an
accurate classifier, so only the BatchNorm statistics are estimated (256 training images).
Bits: W2/W4/W8 by layer, A4, the network input and the last layer's input at 8 bits.

Path: the one ``hawq export --format onnx`` takes: ``integer_state_dict`` (what the export
stage writes) -> ``load_quantized`` into a freshly initialised float model -> ``export_onnx``.
Ground truth: hawq's fake-quant model (``quantize_`` + ``calibrate_``).

Checks:

1. Graph: ONNX checker, opset 17, dynamic batch; per quantized layer one weight
   ``DequantizeLinear`` on int8 codes whose every output channel reaches exactly
   ``+-(2^(b-1) - 1)`` for the BitConfig's ``b`` (max-scaling), and one input
   ``[Clip] -> QuantizeLinear -> DequantizeLinear`` (Clip iff the BitConfig's act bits < 8).
2. Layer by layer, the graph as written (no onnxruntime optimisation), every quantizer's input
   and output fetched from onnxruntime: (a) every weight DequantizeLinear equals the fake-quant
   weight and every activation Q->DQ equals hawq's quantizer applied to onnxruntime's own
   input, bit for bit; (b) the float ops between quantizers agree: up to and including the
   first layer where an image's codes differ (a "flip"), ``|x_onnx - x_torch| <= 1e-4`` of the
   quantizer's range ``(2^a - 1) s``. Measured <= 1.2e-6 (float32 accumulation order only);
   a wrong scale, zero point, bit width or op moves values by whole steps, >= 1/255 of the
   range. So every flip is a value within float32 rounding of a rounding boundary; flipped
   images <= 5% (measured 0.4% and 0.9%). After a flip the images legitimately differ.
3. Logits, as written and with onnxruntime's default optimisations: per image and class within
   the flip-aware last-layer bound (``onnx_checks``; worst case, rigorous); where the last
   layer's input codes agree, within 1e-4 of the logit standard deviation (measured <= 4e-6:
   the float32 rounding of one Gemm); top-1 identical on every image whose PyTorch margin
   exceeds twice its largest bound.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_checks import last_layer_bound, load_cifar10, probe_session
from shared_data import CIFAR10, needs
from torch import nn

from hawq.deploy import export_onnx, integer_state_dict, load_quantized, packed_size_bytes
from hawq.quant.bitconfig import BitConfig, LayerBits
from hawq.quant.modules import calibrate_, quantize_, quantized_modules
from hawq.quant.primitives import act_qparams
from hawq.size import model_size_bytes, weight_compression_ratio
from pipeline.config import ModelConfig
from pipeline.models import build_model

pytestmark = [
    needs("cifar10_subset.npz"),
    pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None,
        reason="torchvision is not installed: pip install -c constraints.txt -e '.[vision]'",
    ),
]

A8, W8A4, W2A4 = LayerBits(8, 8), LayerBits(8, 4), LayerBits(2, 4)  # the rest: W4A4
LAYERS = {
    "resnet18": {
        "conv1": A8,
        "fc": A8,
        r"re:layer3\..*": W8A4,
        r"re:layer4\..*": W2A4,
    },
    "mobilenet_v2": {
        "features.0.0": A8,
        "classifier.1": A8,
        r"re:features\.[2-5]\..*": W8A4,
        r"re:features\.1[4-7]\..*": W2A4,
    },
}
BATCH = 128
RANGE_TOL = 1e-4  # |x_onnx - x_torch| before the first flip, as a fraction of the range
LOGIT_TOL = 1e-4  # |logit diff| where the last layer's input codes agree, / the logit std


def _quantized_torchvision(arch: str, batches: list[torch.Tensor]) -> tuple[nn.Module, BitConfig]:
    """The float model with BatchNorm statistics of ``batches``, quantized and calibrated."""
    model = build_model(ModelConfig(name=f"torchvision:{arch}", num_classes=10, in_channels=3))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics = the plain average over the batches
    model.train()
    with torch.no_grad():
        for xb in batches:
            model(xb)
    bc = BitConfig(weight_bits=4, act_bits=4, layers=LAYERS[arch])
    quantize_(model.eval(), bc)
    calibrate_(model, batches)
    return model.eval(), bc


def _value(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer or Constant output, through Identity nodes."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {o: nd for nd in proto.graph.node for o in nd.output}
    while name not in inits and nodes[name].op_type == "Identity":
        name = nodes[name].input[0]
    if name in inits:
        return onnx.numpy_helper.to_array(inits[name])
    return onnx.numpy_helper.to_array(nodes[name].attribute[0].t)


def _check_graph(proto: onnx.ModelProto, model: nn.Module, bc: BitConfig) -> dict:
    """Check 1 (module docstring); returns ``{layer: (weight DQ output, act input, act DQ
    output)}`` with the names of the tensors that check 2 fetches."""
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    nodes = {o: nd for nd in proto.graph.node for o in nd.output}
    users: dict[str, list] = {}
    for nd in proto.graph.node:
        for i in nd.input:
            users.setdefault(i, []).append(nd)
    layers = quantized_modules(model)
    assert set(layers) == {
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
    }
    ops = [nd.op_type for nd in proto.graph.node]
    assert ops.count("QuantizeLinear") == len(layers)
    assert ops.count("DequantizeLinear") == 2 * len(layers)
    taps = {}
    for name, m in layers.items():
        want = bc.resolve(name)
        (w_dq,) = users[f"{name}.weight_int"]
        codes = _value(proto, f"{name}.weight_int")
        qmax = 2 ** (want.weight - 1) - 1
        assert w_dq.op_type == "DequantizeLinear" and codes.dtype == np.int8, name
        assert np.all(np.abs(codes).reshape(len(codes), -1).max(1) == qmax), name
        scale = _value(proto, w_dq.input[1])
        assert scale.shape == (m.weight.shape[0],) and np.all(scale > 0), name
        assert np.all(np.isfinite(scale)), name
        # the layer's input Q: the one whose scale is this layer's act_scale
        (q,) = [
            nd
            for nd in proto.graph.node
            if nd.op_type == "QuantizeLinear" and nd.input[1] == f"{name}.act_scale"
        ]
        (a_dq,) = users[q.output[0]]
        src = nodes.get(q.input[0])
        clipped = src is not None and src.op_type == "Clip"
        assert clipped == (want.act < 8), name
        assert _value(proto, q.input[2]).dtype == np.uint8, name
        taps[name] = (w_dq.output[0], src.input[0] if clipped else q.input[0], a_dq.output[0])
    return taps


@torch.no_grad()
def _layer_by_layer(model: nn.Module, path: Path, taps: dict, x: torch.Tensor, tmp: Path):
    """Check 2 (module docstring) of the ONNX file against the fake-quant ``model`` on ``x``;
    returns the per-image flips, both runtimes' logits and last-layer quantized inputs."""
    layers = quantized_modules(model)
    acts = sorted({t for _, a, dq in taps.values() for t in (a, dq) if t != "input"})
    weights = [w for w, _, _ in taps.values()]
    sess = probe_session(path, [*acts, *weights], tmp, optimize=False, threads=1)
    got = dict(zip(weights, sess.run(weights, {"input": x[:1].numpy()}), strict=True))
    for name, m in layers.items():  # (a) weights: ONNX DequantizeLinear == hawq's w_hat
        assert torch.equal(torch.from_numpy(got[taps[name][0]]), m.quantized_weight()), name
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, a, n=n: seen.__setitem__(n, a[0]))
        for n, m in layers.items()
    ]
    last = list(layers)[-1]
    fetch = ["logits", *acts]
    diffs, flips, out = [], [], {"yt": [], "yo": [], "xt": [], "xo": []}
    try:
        for i in range(0, len(x), BATCH):
            xb = x[i : i + BATCH]
            seen.clear()
            out["yt"].append(model(xb))
            res = dict(zip(fetch, sess.run(fetch, {"input": xb.numpy()}), strict=True))
            res["input"] = xb.numpy()
            d, f = [], []
            for name in seen:  # execution order
                quant, (_, a, dq) = layers[name].input_quant, taps[name]
                xo, xt = torch.from_numpy(res[a]), seen[name]
                qo, qt = quant(xo), quant(xt)
                assert torch.equal(torch.from_numpy(res[dq]), qo), name  # (a) activations
                s, _ = act_qparams(quant.running_min, quant.running_max, quant.bits)
                span = float(s) * (2**quant.bits - 1)  # the quantizer's range
                d.append((xo - xt).abs().flatten(1).amax(1).double() / span)
                f.append((qo != qt).flatten(1).any(1))
                if name == last:
                    out["xt"].append(qt)
                    out["xo"].append(qo)
            diffs.append(torch.stack(d, 1))
            flips.append(torch.stack(f, 1))
            out["yo"].append(torch.from_numpy(res["logits"]))
    finally:
        for h in hooks:
            h.remove()
    diff, flip = torch.cat(diffs), torch.cat(flips)
    n_layers = flip.shape[1]
    first = torch.where(flip.any(1), flip.int().argmax(1), n_layers - 1)
    upto = torch.arange(n_layers)[None] <= first[:, None]  # (b) up to the first flip
    worst = float(diff[upto].max())
    assert worst <= RANGE_TOL, worst
    return {k: torch.cat(v) for k, v in out.items()} | {"flipped": flip.any(1), "worst": worst}


def _check_logits(yt, yo, xt, xo, w, b) -> dict:
    """Check 3 (module docstring) of logits ``yo`` whose last layer saw ``xo``."""
    bound = last_layer_bound(w, b, xt, xo)
    diff = (yo - yt).abs().double()
    assert bool((diff <= bound).all()), float((diff - bound).max())
    same = (xo == xt).all(1)  # the same last-layer input codes: only the Gemm's rounding
    tight = float(diff[same].max() / yt.std())
    assert tight <= LOGIT_TOL, tight
    top2 = yt.double().topk(2, dim=1).values
    decided = top2[:, 0] - top2[:, 1] > 2 * bound.max(1).values
    agree = yo.argmax(1) == yt.argmax(1)
    assert bool(agree[decided].all())
    return {
        "agreement": float(agree.double().mean()),
        "decided": float(decided.double().mean()),
        "max_diff": float(diff.max()),
        "tight": tight,
    }


def _optimised_run(path: Path, x: torch.Tensor, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the last Gemm's input from onnxruntime with its default optimisations."""
    gemm = [nd for nd in onnx.load(path).graph.node if nd.op_type == "Gemm"][-1]
    sess = probe_session(path, [gemm.input[0]], tmp, optimize=True, threads=1)
    outs = [
        sess.run(["logits", gemm.input[0]], {"input": x[i : i + BATCH].numpy()})
        for i in range(0, len(x), BATCH)
    ]
    logits = torch.cat([torch.from_numpy(o[0]) for o in outs])
    return logits, torch.cat([torch.from_numpy(o[1]) for o in outs])


@pytest.mark.parametrize("arch", list(LAYERS))
def test_torchvision_onnx_matches_fake_quant(arch: str, tmp_path: Path) -> None:
    data = load_cifar10(CIFAR10 / "cifar10_subset.npz")
    torch.manual_seed(0)
    model, bc = _quantized_torchvision(arch, [x for x, _ in data.train_batches(128, seed=0)][:2])
    tensors = integer_state_dict(model)  # what the export stage writes
    packed = packed_size_bytes(tensors)["total"]
    assert packed == model_size_bytes(model, bc)  # the size the evaluate stage reports
    fresh = build_model(ModelConfig(name=f"torchvision:{arch}", num_classes=10, in_channels=3))
    frozen = load_quantized(fresh, tensors, bc)  # what `hawq export --format onnx` rebuilds
    x = data.eval_x
    with torch.no_grad():
        assert torch.equal(frozen(x[:BATCH]), model(x[:BATCH])), "not bit-identical"
    meta = {"hawq.bit_config": json.dumps(bc.to_dict())}
    path = export_onnx(frozen, x[:2], tmp_path / f"{arch}.onnx", metadata=meta)
    proto = onnx.load(path)
    assert {p.key: p.value for p in proto.metadata_props} == meta
    taps = _check_graph(proto, model, bc)
    probe = _layer_by_layer(model, path, taps, x, tmp_path)
    flipped = probe["flipped"]
    assert int(flipped.sum()) <= 0.05 * len(x), int(flipped.sum())
    # the last quantized layer computes the logits, so the bound of check 3 applies
    assert [nd for nd in proto.graph.node if nd.op_type == "Gemm"][-1].output[0] == "logits"
    last = list(quantized_modules(model).values())[-1]
    w, b, yt, xt = last.quantized_weight(), last.bias, probe["yt"], probe["xt"]
    strict = _check_logits(yt, probe["yo"], xt, probe["xo"], w, b)
    yo, xo = _optimised_run(path, x, tmp_path)  # what users run: the same logit checks
    default = _check_logits(yt, yo, xt, xo, w, b)
    print(
        f"\n{arch}: W-comp {weight_compression_ratio(model, bc):.2f}x, {len(taps)} layers, "
        f"packed {packed} B, ONNX {path.stat().st_size} B; max|dx| before a flip "
        f"{probe['worst']:.2g} of the range; flipped images {int(flipped.sum())}/{len(x)}; "
        f"max|dlogit| {strict['max_diff']:.3g}, {strict['tight']:.2g} logit std "
        f"({float(yt.std()):.3g}) where the last layer's input agrees; agreement "
        f"{strict['agreement']:.4%}, decided by the margin {strict['decided']:.2%}; default "
        f"optimisations: agreement {default['agreement']:.4%}, max|dlogit| "
        f"{default['max_diff']:.3g} ({default['tight']:.2g} std)"
    )
