"""Block partitions of the torchvision models: names and parameter counts against hand sums.

Each expected count is written from the architecture's published definition (layer widths,
kernel sizes, which layers carry a bias), never read from the model.
"""

from __future__ import annotations

import pytest
from torch import nn

torchvision = pytest.importorskip(
    "torchvision",
    reason="torchvision is not installed: pip install -c constraints.txt -e '.[vision]'",
)

from hawq.blocks import partition_blocks  # noqa: E402

K = 10  # classes


def tv(name: str, **kwargs) -> nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=K, **kwargs)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def basic(c_in: int, c_out: int, stride: int) -> int:
    """3x3 conv c_in->c_out, 3x3 c_out->c_out, 1x1 projection when the shape changes."""
    proj = c_in * c_out if stride != 1 or c_in != c_out else 0
    return 9 * c_in * c_out + 9 * c_out * c_out + proj


def bottleneck(c_in: int, width: int, stride: int) -> int:
    """1x1 c_in->w, 3x3 w->w, 1x1 w->4w, 1x1 projection c_in->4w when the shape changes."""
    proj = c_in * 4 * width if stride != 1 or c_in != 4 * width else 0
    return c_in * width + 9 * width * width + width * 4 * width + proj


def resnet_expected(unit, units: tuple[int, ...], expansion: int) -> dict[str, int]:
    expected = {"conv1": 3 * 64 * 7 * 7}
    c_in = 64
    for s, (n, width) in enumerate(zip(units, (64, 128, 256, 512), strict=True)):
        for i in range(n):
            stride = 2 if i == 0 and s > 0 else 1
            expected[f"layer{s + 1}.{i}"] = unit(c_in, width, stride)
            c_in = width * expansion
    expected["fc"] = linear(c_in, K)
    return expected


def check(blocks, expected: dict[str, int], model: nn.Module) -> None:
    assert [b.name for b in blocks] == list(expected)
    assert {b.name: b.n_params for b in blocks} == expected
    weights = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
        for p in m.parameters(recurse=False)
    )
    assert sum(expected.values()) == weights  # every Conv/Linear parameter is in one block
    no_bn = {p for b in blocks for p in b.param_names}
    assert not any(".bn" in p or "downsample.1" in p for p in no_bn)


def test_resnet18_residual_blocks():
    model = tv("resnet18")
    blocks = partition_blocks(model, grouping="residual")
    check(blocks, resnet_expected(basic, (2, 2, 2, 2), 1), model)
    assert blocks[3].module_names == ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0")
    assert blocks[3].n_params == 73728 + 147456 + 8192


def test_resnet50_bottleneck_blocks():
    model = tv("resnet50")
    blocks = partition_blocks(model, grouping="residual")
    check(blocks, resnet_expected(bottleneck, (3, 4, 6, 3), 4), model)
    assert len(blocks) == 18
    assert blocks[1].n_params == 64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256  # 75,008


def test_mobilenet_v2_inverted_residual_blocks():
    model = tv("mobilenet_v2")
    blocks = partition_blocks(model, grouping="inverted_residual")
    # (expansion t, output channels c, repeats n, first stride s): the paper's Table 2
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2)]
    settings += [(6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    expected = {"features.0.0": 3 * 32 * 9}
    c_in, index = 32, 1
    for t, c, n, _ in settings:
        for _ in range(n):
            hidden = c_in * t
            expand = c_in * hidden if t != 1 else 0
            expected[f"features.{index}"] = expand + 9 * hidden + hidden * c  # dw 3x3 + project
            c_in, index = c, index + 1
    expected["features.18.0"] = 320 * 1280
    expected["classifier.1"] = linear(1280, K)
    check(blocks, expected, model)
    assert blocks[1].module_names == ("features.1.conv.0.0", "features.1.conv.1")  # t = 1
    assert len(blocks[2].module_names) == 3


def test_squeezenet1_1_fire_blocks():
    model = tv("squeezenet1_1")
    blocks = partition_blocks(model, grouping="fire")

    def fire(c_in: int, squeeze: int, expand: int) -> int:  # every conv has a bias
        return linear(c_in, squeeze) + linear(squeeze, expand) + 9 * squeeze * expand + expand

    fires = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128)}
    fires |= {9: (256, 48, 192), 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}
    expected = {"features.0": 3 * 64 * 9 + 64}
    expected |= {f"features.{i}": fire(*args) for i, args in fires.items()}
    expected["classifier.1"] = linear(512, K)  # a 1x1 conv with bias
    check(blocks, expected, model)
    assert blocks[1].module_names == (
        "features.3.squeeze",
        "features.3.expand1x1",
        "features.3.expand3x3",
    )


def test_inception_v3_module_blocks_by_pattern():
    """The shipped config's grouping: one block per Mixed_* module, other convs one each."""
    model = tv("inception_v3", aux_logits=False, init_weights=False)
    blocks = partition_blocks(model, patterns=[(r"(Mixed_\w+)\..*", r"\1")])
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    mixed = ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]
    names = [f"{s}.conv" for s in stem] + [f"Mixed_{m}" for m in mixed] + ["fc"]
    sizes = {b.name: b.n_params for b in blocks}
    assert list(sizes) == names
    assert sizes["Conv2d_1a_3x3.conv"] == 3 * 32 * 9  # BasicConv2d: bias-free conv + BN
    assert sizes["Conv2d_4a_3x3.conv"] == 80 * 192 * 9
    # InceptionA(192, pool_features=32): 1x1 64 | 1x1 48, 5x5 64 | 1x1 64, 3x3 96, 3x3 96 | pool 32
    a = 192 * 64 + (192 * 48 + 25 * 48 * 64) + (192 * 64 + 9 * 64 * 96 + 9 * 96 * 96) + 192 * 32
    assert sizes["Mixed_5b"] == a
    assert sizes["fc"] == linear(2048, K)
    check(blocks, sizes, model)


@pytest.mark.parametrize(
    ("name", "grouping", "fits"),
    [("mobilenet_v2", "residual", "'inverted_residual'"), ("resnet18", "fire", "'residual'")],
)
def test_grouping_without_its_blocks_names_the_fitting_one(name, grouping, fits):
    with pytest.raises(ValueError, match=f"found no .* use grouping 'layer' or {fits}"):
        partition_blocks(tv(name), grouping=grouping)
