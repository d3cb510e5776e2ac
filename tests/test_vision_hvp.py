"""Hessian-vector products through torchvision's building blocks and whole models.

* A shrunken network made of torchvision's own ``Bottleneck``, ``InvertedResidual`` (ReLU6,
  depthwise conv) and ``Fire`` (concatenation) modules, in float64 with non-trivial eval
  BatchNorm: every block's HVP (the operator's lean double backward) equals the dense block
  Hessian from ``torch.func.hessian`` times v, under each grouping.
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
from torchvision.models.resnet import Bottleneck  # noqa: E402
from torchvision.models.squeezenet import Fire  # noqa: E402

from hawq.blocks import partition_blocks  # noqa: E402
from hawq.hessian.backward_support import find_double_backward_failures  # noqa: E402
from hawq.hessian.operator import HessianOperator  # noqa: E402


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
