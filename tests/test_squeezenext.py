"""SqueezeNext (hawq.models): golden parameter counts, block partition, exact HVPs, configs.

The golden counts come from :func:`count`, a formula over the architecture's definition (the
paper / the authors' Caffe files), not from the model. With a bias on every conv and on the
classifier the same formula gives the counts published for a widely used PyTorch port
(imgclsmob's ``sqnxt23_w1`` 724,056, ``sqnxt23_w3d2`` 1,511,824, ``sqnxt23v5_w1`` 921,816,
``sqnxt23v5_w3d2`` 1,953,616), which checks that it reads the architecture as others do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_bn

from hawq.blocks import partition_blocks
from hawq.hessian.operator import HessianOperator
from hawq.models import SqueezeNext, SqueezeNextBlock, squeezenext
from pipeline.config import ConfigError
from pipeline.config.inputs import ModelConfig
from pipeline.models import build_model

STAGES = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}


def unit(c_in: int, c_out: int, stride: int, conv) -> int:
    """1x1 to r, 1x1 to r/2, 3x1/1x3 to r, 1x3/3x1 to r, 1x1 to c_out, 1x1 projection."""
    d = 1 if stride == 2 else 4 if c_in > c_out else 2
    r = c_in // d
    total = conv(c_in, r, 1) + conv(r, r // 2, 1)
    total += conv(r // 2, r, 3) + conv(r, r, 3) + conv(r, c_out, 1)
    if stride != 1 or c_in != c_out:
        total += conv(c_in, c_out, 1)
    return total


def units(version: str, width: float, stem: int) -> list[tuple[str, int, int, int]]:
    """(name, c_in, c_out, stride) of every unit, stage widths 32/64/128/256 x width."""
    out, c_in = [], stem
    for s, (n, c) in enumerate(zip(STAGES[version], (32, 64, 128, 256), strict=True)):
        for j in range(n):
            out.append((f"stage{s + 1}.{j}", c_in, int(c * width), 2 if j == 0 and s else 1))
            c_in = int(c * width)
    return out


def count(
    version: str = "23", width: float = 1.0, classes: int = 1000, bias=False, norm=True
) -> dict[str, int]:
    """Parameters of the stem, each unit, the 1x1 head and the classifier.

    Every conv is followed by BatchNorm (a weight and a bias per channel; ``norm=False`` leaves
    them out: the block sizes), plus a bias of its own when ``bias``.
    """

    def conv(c_in: int, c_out: int, taps: int) -> int:
        return c_in * c_out * taps + c_out * (2 * norm + bias)

    stem, head = int(64 * width), int(128 * width)
    blocks = {"stem.conv": conv(3, stem, 49)}
    blocks |= {name: unit(a, b, s, conv) for name, a, b, s in units(version, width, stem)}
    blocks["head.conv"] = conv(int(256 * width), head, 1)
    blocks["fc"] = head * classes + bias * classes
    return blocks


@pytest.mark.parametrize(
    ("version", "width", "published"),
    [
        ("23", 1.0, 724_056),
        ("23", 1.5, 1_511_824),
        ("23v5", 1.0, 921_816),
        ("23v5", 1.5, 1_953_616),
    ],
)
def test_formula_reproduces_published_counts_with_biases(version, width, published):
    assert sum(count(version, width, bias=True).values()) == published


def test_golden_parameter_count_1_0_sqnxt_23():
    golden = sum(count("23").values())
    assert golden == 717_280  # bias-free convs and classifier (the authors' definition): 0.72M
    assert sum(p.numel() for p in squeezenext("23").parameters()) == golden
    assert sum(p.numel() for p in squeezenext("23v5").parameters()) == sum(count("23v5").values())
    two = squeezenext("23", width=2.0, num_classes=10)
    assert sum(p.numel() for p in two.parameters()) == sum(count("23", 2.0, 10).values())


def test_residual_grouping_one_block_per_unit():
    model = squeezenext("23")
    blocks = partition_blocks(model, grouping="residual")
    expected = count("23", norm=False)  # blocks hold conv / linear weights, never BatchNorm's
    assert len(blocks) == 24  # stem, 21 units, head, fc
    assert {b.name: b.n_params for b in blocks} == expected
    assert [b.name for b in blocks] == list(expected)
    first = blocks[1]
    assert first.module_names == tuple(
        f"stage1.0.{m}.conv"
        for m in ("squeeze1", "squeeze2", "separable1", "separable2", "expand", "shortcut")
    )
    assert isinstance(model.get_submodule("stage1.1"), SqueezeNextBlock)
    assert model.get_submodule("stage1.1.separable1.conv").kernel_size == (1, 3)  # alternating
    assert model.get_submodule("stage1.0.separable1.conv").kernel_size == (3, 1)


def test_forward_shapes_and_bad_arguments():
    model = squeezenext("23", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 227, 227)).shape == (1, 7)  # the paper's crop
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="version"):
        squeezenext("24")
    with pytest.raises(ValueError, match="width"):
        SqueezeNext(width=0.0)
    with pytest.raises(ValueError, match="separable_first"):
        SqueezeNextBlock(8, 8, separable_first="3x3")


def test_block_hvps_match_dense_hessian_float64(dense_block_hessian):
    """A 1/8-width SqueezeNext with one unit per stage: lean double backward vs torch.func."""
    torch.manual_seed(0)
    model = SqueezeNext(blocks=(1, 1, 1, 1), width=0.125, num_classes=3, in_channels=2).double()
    randomise_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(n, 2, 24, 24, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1][:n]))
        for n in (3, 2)
    ]
    blocks = partition_blocks(model, grouping="residual")
    checked = [b for b in blocks if b.n_params <= 800]  # all but stage4.0 (2,560)
    assert [b.name for b in checked] == [
        "stem.conv",
        *(f"stage{i}.0" for i in (1, 2, 3)),
        "head.conv",
        "fc",
    ]
    with HessianOperator(model, F.cross_entropy, batches, blocks) as op:
        for b in checked:
            H = dense_block_hessian(model, F.cross_entropy, batches, b.param_names)
            v = torch.randn(b.n_params, generator=gen, dtype=torch.float64)
            hv = op.hvp(b.name, v)
            # float64 rounding through ~25 layers: ~5e-10 relative; a wrong term would be O(1)
            assert float((hv - H @ v).abs().max() / (H @ v).abs().max()) < 1e-8, b.name


def test_selectable_in_configs():
    model = build_model(ModelConfig(name="squeezenext23", num_classes=10))
    assert sum(p.numel() for p in model.parameters()) == sum(count("23", 1.0, 10).values())
    wide = build_model(ModelConfig(name="squeezenext23v5", num_classes=10, kwargs={"width": 1.5}))
    assert sum(p.numel() for p in wide.parameters()) == sum(count("23v5", 1.5, 10).values())
    with pytest.raises(ConfigError, match="model.kwargs.*takes only 'width'"):
        build_model(ModelConfig(name="squeezenext23", kwargs={"depth": 3}))
    with pytest.raises(ConfigError, match="model.kwargs.*width must be a positive"):
        build_model(ModelConfig(name="squeezenext23", kwargs={"width": -1.0}))
