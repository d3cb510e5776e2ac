"""ONNX QDQ export checked in onnxruntime against hawq's fake-quant PyTorch model.

Ground truth: the fake-quant model (``quantize_`` + ``calibrate_``) as hawq evaluates it.

Tolerance on the logits, derived. (1) Every QDQ node is bit-exact: the activation Q->DQ in
onnxruntime equals ``hawq.quant.primitives.quantize_act`` on every input, ties and +-1 ulp
neighbours included (``test_activation_qdq_is_bit_exact``), and the weights are the same int8
codes times the same float32 scales. (2) So ONNX and PyTorch differ only in the float32
accumulation order of Conv/Gemm/BatchNorm/Add/Pool. Between two quantizers such a difference
(~1e-7 relative) vanishes at the next quantizer unless a value lies that close to a rounding
boundary; then that one code differs by 1 (a "flip"). (3) At the last layer ``y = W x + b``
both runtimes see their own quantized input ``x_t`` / ``x_o``; a K-term dot product plus
bias in float32 in any order is within ``gamma_{K+1} (|W||x| + |b|)`` of the exact value
(Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5; ``gamma_n = n u / (1 - n u)``,
``u = 2^-24``). Hence, per image and class,
``|y_o - y_t| <= |W (x_o - x_t)| + gamma_{K+1} (|W| (|x_t| + |x_o|) + 2 |b|)``
(first term in float64), which the test checks for every image: it is ~1e-5 where no code
flipped, and follows the flips exactly where one did. Flips must stay rare (<= 5% of images).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_checks import last_layer_bound, load_cifar10, probe_session
from torch import nn

from hawq.deploy import (
    FrozenLinear,
    compare_onnx,
    export_onnx,
    freeze_quantized,
    onnx_session,
    run_onnx,
)
from hawq.deploy.frozen import _ActQDQ
from hawq.quant.bitconfig import BitConfig, LayerBits
from hawq.quant.modules import calibrate_, quantize_, quantized_modules
from hawq.quant.primitives import act_qparams, quantize_act
from hawq.size import weight_compression_ratio
from pipeline.config import ModelConfig, load_config
from pipeline.data import load_data
from pipeline.models import build_model, loss_fn_for

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cifar10"
needs_shared = pytest.mark.skipif(
    not (SHARED / "cifar10_subset.npz").is_file(),
    reason=f"shared CIFAR-10 data not found at {SHARED} (see shared/data/README.md)",
)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_activation_qdq_is_bit_exact(bits: int, tmp_path: Path) -> None:
    lo, hi = torch.tensor(-0.37), torch.tensor(1.91)
    s, z = act_qparams(lo, hi, bits)
    n, zf = 2**bits - 1, float(z)
    clip = (float(torch.tensor(-zf) * s), float(torch.tensor(n - zf) * s))

    class QDQ(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _ActQDQ.apply(x, s, int(z), bits, *clip)

    torch.manual_seed(0)
    k = torch.arange(-300, 300, dtype=torch.float32)
    x = torch.cat([torch.randn(20000) * 2, (k + 0.5) * s, k * s])  # ties and exact codes
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)]).reshape(-1, 1)
    path = export_onnx(QDQ(), x[:8], tmp_path / "qdq.onnx")  # batch = values: dynamic
    got = run_onnx(onnx_session(path), x, batch_size=len(x))
    assert torch.equal(got, quantize_act(x, lo, hi, bits))
    ops = [nd.op_type for nd in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 1
    assert ("Clip" in ops) == (bits < 8)


def _last_layer_bound(
    frozen: nn.Module, onnx_path: Path, x: torch.Tensor, tmp: Path, optimize: bool
) -> tuple[torch.Tensor, int]:
    """Per-image, per-class bound of |logits_onnx - logits_torch| (module docstring) and the
    number of images whose last-layer input codes differ."""
    last = [m for m in frozen.modules() if isinstance(m, FrozenLinear)][-1]
    gemm = [nd for nd in onnx.load(onnx_path).graph.node if nd.op_type == "Gemm"][-1]
    sess = probe_session(onnx_path, [gemm.input[0]], tmp, optimize=optimize)
    xo = torch.cat(
        [
            torch.from_numpy(sess.run([gemm.input[0]], {"input": x[i : i + 256].numpy()})[0])
            for i in range(0, len(x), 256)
        ]
    )
    seen = []
    h = last.register_forward_pre_hook(lambda m, a: seen.append(m.quantized_input(a[0])))
    with torch.no_grad():
        for i in range(0, len(x), 256):
            frozen(x[i : i + 256])
    h.remove()
    xt = torch.cat(seen)
    bound = last_layer_bound(last.dequantized_weight(), last.bias, xt, xo)
    flipped = int((xo != xt).any(dim=1).sum())
    return bound, flipped


def _check_export(model: nn.Module, x: torch.Tensor, tmp: Path) -> dict:
    """Freeze, export, run in onnxruntime; check the graph, codes, scales and the logits."""
    frozen = freeze_quantized(model)
    with torch.no_grad():
        assert torch.equal(frozen(x[:256]), model(x[:256])), "frozen model is not bit-identical"
    path = export_onnx(model, x[:2], tmp / "model.onnx", metadata={"hawq.test": "1"})
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {p.key: p.value for p in proto.metadata_props} == {"hawq.test": "1"}
    ops = [nd.op_type for nd in proto.graph.node]
    layers = quantized_modules(model)
    n_act = sum(m.input_quant.bits < 32 for m in layers.values())
    n_w = sum(m.weight_bits < 32 for m in layers.values())
    assert ops.count("QuantizeLinear") == n_act and ops.count("DequantizeLinear") == n_act + n_w
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name, m in layers.items():
        codes, scale = inits[f"{name}.weight_int"], inits[f"{name}.weight_scale"]
        qmax = 2 ** (m.weight_bits - 1) - 1
        assert codes.dtype == np.int8 and np.abs(codes).max() <= qmax, name
        assert set(np.unique(codes)) <= set(range(-qmax, qmax + 1))
        assert np.all(scale > 0) and np.all(np.isfinite(scale)), name
        assert scale.shape == (m.weight.shape[0],)
        assert f"{name}.weight" not in inits  # no float copy of a quantized weight
    out = {}
    for optimize in (False, True):  # the QDQ graph as written / onnxruntime's default fusions
        res = compare_onnx(model, path, x, optimize=optimize)
        bound, flipped = _last_layer_bound(frozen, path, x, tmp, optimize)
        diff = (res["onnx_logits"] - res["torch_logits"]).abs().double()
        assert res["agreement"] >= 0.999, (optimize, res["agreement"])
        assert bool((diff <= bound).all()), (optimize, float((diff - bound).max()))
        out[optimize] = res | {"flipped": flipped}
    # written QDQ: only float32 accumulation order differs, so a flip needs a value within
    # ~1e-7 (relative) of a rounding boundary somewhere upstream: a few percent of the images
    # in a 56-layer net (measured: R20 0.2%, R56 2.8%), where a wrong scale or zero point
    # would flip nearly all. (The fused integer kernels requantize with their own rounding
    # and flip more codes; the bound above covers them too.)
    assert out[False]["flipped"] <= 0.05 * len(x), out[False]["flipped"]
    res = out[True] | {"strict": out[False]}
    res.update(onnx_bytes=path.stat().st_size, model=frozen, proto=proto)
    return res


def _cifar_resnet(depth: int, weight_bits: int, tmp: Path) -> dict:
    """Pretrained CIFAR ResNet, A4 with an 8-bit input image, PTQ; ``weight_bits`` 2: ~13x
    weight compression (layer1 and layer2.0-1 at 4 bits), 4: ~8x."""
    data = load_cifar10(SHARED / "cifar10_subset.npz")
    ckpt = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}[depth]
    model = build_model(
        ModelConfig(name=f"cifar_resnet{depth}", checkpoint=str(SHARED / ckpt))
    ).eval()
    layers = {
        "conv1": LayerBits(8, 8),  # 8-bit input image
        "linear": LayerBits(8, 4),
        r"re:layer1\..*": LayerBits(4, 4),
        r"re:layer2\.[01]\..*": LayerBits(4, 4),
    }
    # 98th-percentile clipping keeps the 2-bit PTQ model a real classifier (max|w| scaling
    # leaves ~11%); it also exercises the clamped-code path of the weight quantizer
    bc = BitConfig(weight_bits=weight_bits, act_bits=4, layers=layers, percentile=98.0)
    compression = weight_compression_ratio(model, bc)
    quantize_(model, bc)
    calibrate_(model, [x for x, _ in list(data.train_batches(128, seed=0))[:4]])
    model.eval()
    assert len(data.eval_y) == 932
    res = _check_export(model, data.eval_x, tmp)
    acc = float((res["torch_logits"].argmax(1) == data.eval_y).double().mean())
    print(
        f"\nResNet-{depth}: W-comp {compression:.2f}x, fake-quant acc {acc:.4f}, agreement "
        f"{res['agreement']:.4%}, max|dlogit| {res['max_abs_diff']:.3g}, flipped images "
        f"{res['flipped']}; unoptimised graph: agreement {res['strict']['agreement']:.4%}, "
        f"max|dlogit| {res['strict']['max_abs_diff']:.3g}, flipped {res['strict']['flipped']}; "
        f"ONNX {res['onnx_bytes']} B"
    )
    res["compression"] = compression
    return res


@needs_shared
def test_resnet20_13x_onnx_matches_fake_quant(tmp_path: Path) -> None:
    res = _cifar_resnet(20, 2, tmp_path)
    assert 12.5 <= res["compression"] <= 14.0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res["proto"].graph.initializer}
    assert set(np.unique(inits["layer3.2.conv2.weight_int"])) <= {-1, 0, 1}  # a 2-bit layer


@needs_shared
def test_resnet56_onnx_matches_fake_quant(tmp_path: Path) -> None:
    """The deeper CIFAR ResNet-56 at W4A4 (its 2-bit PTQ model has near-tied logits, where one
    flip can change an argmax); torchvision models: ``tests/test_onnx_torchvision.py``."""
    res = _cifar_resnet(56, 4, tmp_path)
    assert 7.5 <= res["compression"] <= 8.5


def test_quickstart_model_onnx_matches_fake_quant(tmp_path: Path) -> None:
    """configs/quickstart.yaml's small CNN on digits, trained briefly, at the quickstart bits."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    data = load_data(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = loss_fn_for(cfg.model)
    for epoch in range(4):
        for x, y in data.train_batches(64, seed=0, epoch=epoch):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    model.eval()
    layers = {"conv1": LayerBits(8, 8), "conv2": LayerBits(8, 8), "fc1": LayerBits(4, 8)}
    bc = BitConfig(weight_bits=8, act_bits=8, layers=layers)  # the quickstart run's allocation
    quantized = quantize_(copy.deepcopy(model), bc)
    calibrate_(quantized, [x for x, _ in list(data.train_batches(64, seed=0))[:4]])
    quantized.eval()
    res = _check_export(quantized, data.eval_x, tmp_path)
    acc = float((res["torch_logits"].argmax(1) == data.eval_y).double().mean())
    print(
        f"\nquickstart CNN: acc {acc:.4f}, agreement {res['agreement']:.4%}, max|dlogit| "
        f"{res['max_abs_diff']:.3g} (unoptimised {res['strict']['max_abs_diff']:.3g}), "
        f"ONNX {res['onnx_bytes']} B"
    )
    assert acc > 0.9, acc
