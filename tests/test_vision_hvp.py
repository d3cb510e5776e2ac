"""Hessian-vector products through torchvision's building blocks and whole models.

* A shrunken network made of torchvision's own ``Bottleneck``, ``InvertedResidual`` (ReLU6,
  depthwise conv) and ``Fire`` (concatenation) modules, in float64 with non-trivial eval
  BatchNorm: every block's HVP (the operator's lean double backward) equals the dense block
  Hessian from ``torch.func.hessian`` times v, under each grouping.
* torchvision's own ``ResNet`` class with ``Bottleneck`` layers shrunk to 4-8 channels (its
  7x7/2 stem, BatchNorm, ReLU, 3x3/2 max-pool, projection and identity shortcuts, adaptive
  average pool, fc), in float64: every block's HVP equals the dense block Hessian times v under
  the layer and the residual grouping, and ``analyze``'s top eigenvalues equal ``eigvalsh``'s.
* Every op of the five CI models differentiates twice (the support check finds no module),
  and a joint HVP over all blocks is finite and non-zero.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchvision = pytest.importorskip(
    "torchvision",
    reason="torchvision is not installed: pip install -c constraints.txt -e '.[vision]'",
)

from conftest import randomise_bn  # noqa: E402
from torchvision.models.mobilenetv2 import InvertedResidual  # noqa: E402
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402
from torchvision.models.squeezenet import Fire  # noqa: E402

from hawq.blocks import partition_blocks  # noqa: E402
from hawq.hessian.backward_support import find_double_backward_failures  # noqa: E402
from hawq.hessian.operator import HessianOperator  # noqa: E402
from hawq.hessian.table import HessianConfig, analyze  # noqa: E402


def shrunken_net() -> nn.Module:
    """stem conv -> Bottleneck(4, 2, stride 2) -> InvertedResidual(8, 8, t=2) -> Fire -> fc."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(2, 4, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(4),
            relu=nn.ReLU(inplace=True),
            bottleneck=Bottleneck(4, 2, stride=2, downsample=down),  # 4 -> 8 channels
            inverted=InvertedResidual(8, 8, stride=1, expand_ratio=2),  # with its shortcut
            fire=Fire(8, 2, 4, 4),  # 8 -> 8 channels (concatenated expands)
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, 3),
        )
    ).double()
    randomise_bn(model, torch.Generator().manual_seed(1))
    return model.eval()


# block -> parameters by hand: Bottleneck 1x1 4->2, 3x3 2->2, 1x1 2->8, projection 4->8;
# InvertedResidual 1x1 8->16, depthwise 3x3 16, 1x1 16->8; Fire 1x1 8->2 (+b), 1x1 2->4 (+b),
# 3x3 2->4 (+b).
SIZES = {"bottleneck": 8 + 36 + 16 + 32, "inverted": 128 + 144 + 128, "fire": 18 + 12 + 76}


@pytest.mark.parametrize(
    ("grouping", "block"),
    [("residual", "bottleneck"), ("inverted_residual", "inverted"), ("fire", "fire")],
)
def test_block_hvps_of_torchvision_blocks_match_dense_hessian(grouping, block, dense_block_hessian):
    model = shrunken_net()
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(n, 2, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1][:n]))
        for n in (3, 2)
    ]
    blocks = partition_blocks(model, grouping=grouping)
    grouped = [b for b in blocks if b.name == block]
    assert len(grouped) == 1 and grouped[0].n_params == SIZES[block]
    assert len(grouped[0].module_names) > 1
    with HessianOperator(model, F.cross_entropy, batches, blocks) as op:
        for b in blocks:
            H = dense_block_hessian(model, F.cross_entropy, batches, b.param_names)
            v = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            expected = H @ v
            assert expected.abs().max() > 0, b.name
            error = (op.hvp(b.name, v) - expected).abs().max() / expected.abs().max()
            assert float(error) < 1e-10, (b.name, float(error))


def shrunken_resnet50() -> nn.Module:
    """torchvision's ResNet-50 architecture (``ResNet`` + ``Bottleneck``, its ``_make_layer``
    and forward) at 4-8 channels: stem 7x7/2 conv 3->4, BN, ReLU, max-pool 3x3/2;
    layer1 = Bottleneck 4->8 (projection); layer2 = Bottleneck 8->8 stride 2 (projection) +
    Bottleneck 8->8 (identity shortcut); layer3/4 empty; avg-pool; fc 8->3."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3)
    model.inplanes = 4
    model.conv1 = nn.Conv2d(3, 4, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(4)
    model.layer1 = model._make_layer(Bottleneck, 2, 1)
    model.layer2 = model._make_layer(Bottleneck, 2, 2, stride=2)
    model.layer3, model.layer4 = nn.Sequential(), nn.Sequential()
    model.fc = nn.Linear(8, 3)
    model = model.double()
    gen = torch.Generator().manual_seed(3)
    randomise_bn(model, gen)  # affine parameters; the statistics from data (no dead ReLUs):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32, generator=gen, dtype=torch.float64))
    return model.eval()


# block -> parameters: stem 3*4*49; layer1.0 1x1 4->2, 3x3 2->2, 1x1 2->8, projection 4->8;
# layer2.0 1x1 8->2, 3x3 2->2, 1x1 2->8, projection 8->8; layer2.1 without projection; fc
RESNET_SIZES = {
    "conv1": 588, "layer1.0": 8 + 36 + 16 + 32, "layer2.0": 16 + 36 + 16 + 64,
    "layer2.1": 16 + 36 + 16, "fc": 27,
}  # fmt: skip


@pytest.mark.parametrize("grouping", ["layer", "residual"])
def test_shrunken_torchvision_resnet50_blocks_match_dense_hessians(grouping, dense_block_hessian):
    model = shrunken_resnet50()
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64), torch.tensor(t))
        for n, t in ((3, [0, 2, 1]), (2, [1, 1]))
    ]
    blocks = partition_blocks(model, grouping=grouping)
    if grouping == "residual":
        assert {b.name: b.n_params for b in blocks} == RESNET_SIZES
    else:
        assert len(blocks) == 2 + 4 + 4 + 3  # stem, 3 bottlenecks (+2 projections), fc
    dense = {b.name: dense_block_hessian(model, F.cross_entropy, batches, b.param_names)
             for b in blocks}  # fmt: skip
    with HessianOperator(model, F.cross_entropy, batches, blocks) as op:
        for b in blocks:
            v = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            expected = dense[b.name] @ v
            assert expected.abs().max() > 0, b.name
            error = (op.hvp(b.name, v) - expected).abs().max() / expected.abs().max()
            assert float(error) < 1e-10, (b.name, float(error))
    if grouping == "residual":
        config = HessianConfig(tol=1e-10, max_iter=200, trace=False)
        table = analyze(model, F.cross_entropy, batches, config, blocks=blocks, progress=False)
        for row in table.to_pylist():
            evals = torch.linalg.eigvalsh(dense[row["block"]])
            top = float(evals[evals.abs().argmax()])
            assert row["converged"] and abs(row["eigenvalue"] - top) <= 1e-7 * abs(top), row


MODELS = {
    "resnet18": ({}, 32, "residual"),
    "resnet50": ({}, 32, "residual"),
    "mobilenet_v2": ({}, 32, "inverted_residual"),
    "squeezenet1_1": ({}, 32, "fire"),
    "inception_v3": ({"aux_logits": False, "init_weights": False}, 75, "layer"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_op_of_the_ci_models_differentiates_twice(name):
    kwargs, side, grouping = MODELS[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=4, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    params = dict(model.named_parameters())
    assert find_double_backward_failures(model, params, x) == []
    blocks = partition_blocks(model, grouping=grouping)
    gen = torch.Generator().manual_seed(0)
    vs = {b.name: torch.randn(b.n_params, generator=gen) for b in blocks}
    with HessianOperator(model, F.cross_entropy, [(x, torch.tensor([0, 3]))], blocks) as op:
        out = op.hvp_joint(vs)
    assert list(out) == [b.name for b in blocks]
    for name_, hv in out.items():
        assert torch.isfinite(hv).all() and hv.abs().max() > 0, name_
