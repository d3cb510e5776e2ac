import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from hawq.blocks import Block, partition_blocks
from hawq.models import cifar_resnet
from hawq.seeding import derive_seed


def _weight_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_layer_grouping_resnet20_one_block_per_conv_or_linear():
    model = cifar_resnet(20)
    blocks = partition_blocks(model)
    expected = _weight_modules(model)
    assert [b.name for b in blocks] == [n for n, _ in expected]
    assert len(blocks) == 20
    for b, (name, module) in zip(blocks, expected, strict=True):
        assert b.module_names == (name,)
        own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        assert b.param_names == tuple(own)
        assert b.n_params == sum(p.numel() for p in module.parameters())
    assert blocks[-1].param_names == ("linear.weight", "linear.bias")
    in_blocks = {p for b in blocks for p in b.param_names}
    bn_params = {n for n, _ in model.named_parameters() if ".bn" in n or n.startswith("bn")}
    assert bn_params and not (in_blocks & bn_params)
    total = sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for _, m in expected
    )
    assert sum(b.n_params for b in blocks) == total


def test_residual_grouping_resnet20_groups_basic_blocks():
    model = cifar_resnet(20)
    blocks = partition_blocks(model, grouping="residual")
    names = [b.name for b in blocks]
    stages = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert names == ["conv1", *stages, "linear"]
    b = blocks[1]
    assert b.module_names == ("layer1.0.conv1", "layer1.0.conv2")
    assert b.param_names == ("layer1.0.conv1.weight", "layer1.0.conv2.weight")
    assert b.n_params == 2 * 16 * 16 * 9
    assert sum(b.n_params for b in blocks) == sum(
        b.n_params for b in partition_blocks(model, grouping="layer")
    )


class Bottleneck(nn.Module):
    """torchvision-style bottleneck with a downsample branch (detected by class name)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 8, 1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        return self.conv2(self.bn1(self.conv1(x))) + self.downsample(x)


def test_residual_grouping_includes_downsample_convs():
    model = nn.Sequential(
        OrderedDict(stem=nn.Conv2d(3, 4, 3), body=Bottleneck(), head=nn.Conv2d(8, 2, 1))
    )
    blocks = partition_blocks(model, grouping="residual")
    assert [b.name for b in blocks] == ["stem", "body", "head"]
    assert blocks[1].module_names == ("body.conv1", "body.conv2", "body.downsample.0")
    assert blocks[1].n_params == 4 * 2 + 2 * 8 + 4 * 8


def test_patterns_with_backreferences_and_fallback():
    model = cifar_resnet(20)
    blocks = partition_blocks(
        model, patterns=[(r"layer(\d)\.\d\.conv\d", r"stage\1"), (r"linear", "head")]
    )
    assert [b.name for b in blocks] == ["conv1", "stage1", "stage2", "stage3", "head"]
    assert len(blocks[1].module_names) == 6
    assert blocks[-1].param_names == ("linear.weight", "linear.bias")


def test_patterns_fullmatch_and_errors():
    model = cifar_resnet(20)
    with pytest.raises(ValueError, match="matched no"):
        partition_blocks(model, patterns=[(r"layer1", "x")])  # fullmatch: matches nothing
    with pytest.raises(ValueError, match="invalid regex"):
        partition_blocks(model, patterns=[(r"(", "x")])
    with pytest.raises(ValueError, match="pair"):
        partition_blocks(model, patterns=[("only-one",)])


def test_unknown_grouping_and_empty_model():
    with pytest.raises(ValueError, match="grouping"):
        partition_blocks(cifar_resnet(20), grouping="stage")
    with pytest.raises(ValueError, match="no blocks"):
        partition_blocks(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_tied_weights_across_blocks_rejected():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="shared"):
        partition_blocks(nn.Sequential(a, b))
    # the same two modules in one block are fine: the tensor counts once
    blocks = partition_blocks(nn.Sequential(a, b), patterns=[(r"\d", "all")])
    assert blocks[0].n_params == 9 + 3 + 3


def test_block_validates():
    with pytest.raises(ValueError, match="n_params"):
        Block(name="x", module_names=("x",), param_names=("x.weight",), n_params=0)


def test_derive_seed_stable_distinct_and_in_range():
    values = {
        derive_seed(0, "eig", "layer1.0.conv1"),
        derive_seed(0, "eig", "layer1.0.conv2"),
        derive_seed(1, "eig", "layer1.0.conv1"),
        derive_seed(0, "probe", 1),
        derive_seed(0, "probe", "1"),
        derive_seed(0, "probe1"),
        derive_seed(0),
    }
    assert len(values) == 7
    assert all(0 <= v < 2**63 for v in values)
    assert derive_seed(3, "a", 2) == derive_seed(3, "a", 2)
    with pytest.raises(ValueError):
        derive_seed(0, 1.5)
    # stable across processes with different hash salts (unlike Python's hash())
    code = "from hawq.seeding import derive_seed; print(derive_seed(7, 'eig', 'conv1'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == derive_seed(7, "eig", "conv1")
    torch.Generator().manual_seed(derive_seed(7, "eig", "conv1"))  # accepted as a seed


def test_grouping_without_its_block_class_names_the_fitting_grouping():
    with pytest.raises(ValueError, match=r"found no Fire module in CifarResNet.* or 'residual'"):
        partition_blocks(cifar_resnet(20), grouping="fire")
    with pytest.raises(ValueError, match=r"found no InvertedResidual .*use grouping 'layer'$"):
        partition_blocks(nn.Sequential(nn.Linear(2, 2)), grouping="inverted_residual")


def test_pipeline_config_accepts_exactly_the_hawq_groupings():
    import typing

    from hawq.blocks import GROUPINGS
    from pipeline.config.hessian import HessianSection

    hints = typing.get_type_hints(HessianSection)
    assert typing.get_args(hints["grouping"]) == GROUPINGS
