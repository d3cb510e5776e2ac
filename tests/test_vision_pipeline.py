"""The whole pipeline (baseline -> hessian -> allocate -> order -> finetune -> evaluate -> export)
and ``hawq export --format onnx --check`` on the paper's ImageNet architectures, with tiny
generated inputs.

ResNet-18/50, Inception-V3 (aux logits off, at 75x75: the smallest input it accepts),
MobileNet-V2 and SqueezeNet 1.1 come from torchvision (``weights=None``, nothing downloads;
skipped when torchvision is missing), SqueezeNext from ``hawq.models``. Data: 3x32x32 (75x75)
Gaussian images labelled by a random teacher (``data.name: synthetic``), 4 training and 4
evaluation images, one Hessian batch of 2: one optimisation step per training stage.

Checked against values written from the architectures (block names) or recomputed from the
model outside the pipeline (parameters per block, compression from the bits).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import onnx
import pyarrow.parquet as pq
import pytest
import yaml
from tiny_run import REPO
from torch import nn

from hawq.blocks import partition_blocks
from hawq.size import MB
from pipeline.cli import main
from pipeline.config.inputs import ModelConfig
from pipeline.models import build_model

needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed: pip install -c constraints.txt -e '.[vision]'",
)
COMPRESSION = 6.0


def resnet_blocks(units: tuple[int, ...]) -> list[str]:
    stages = [f"layer{s + 1}.{i}" for s, n in enumerate(units) for i in range(n)]
    return ["conv1", *stages, "fc"]


INCEPTION_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1"]
INCEPTION_MIXED = ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]
SQUEEZENEXT_UNITS = [f"stage{s + 1}.{i}" for s, n in enumerate((6, 6, 8, 1)) for i in range(n)]
FIRES = (3, 4, 6, 7, 9, 10, 11, 12)

# name -> (model section, image side, hessian section extras, expected block names)
CASES = {
    "resnet18": (
        {"name": "torchvision:resnet18"},
        32,
        {"grouping": "residual"},
        resnet_blocks((2, 2, 2, 2)),
    ),
    "resnet50": (
        {"name": "torchvision:resnet50"},
        32,
        {"grouping": "residual"},
        resnet_blocks((3, 4, 6, 3)),
    ),
    "inception_v3": (
        {
            "name": "torchvision:inception_v3",
            "kwargs": {"aux_logits": False, "init_weights": False},
        },
        75,
        {"grouping": "layer", "patterns": [[r"(Mixed_\w+)\..*", r"\1"]]},
        [f"{s}.conv" for s in [*INCEPTION_STEM, "Conv2d_4a_3x3"]]
        + [f"Mixed_{m}" for m in INCEPTION_MIXED]
        + ["fc"],
    ),
    "mobilenet_v2": (
        {"name": "torchvision:mobilenet_v2"},
        32,
        {"grouping": "inverted_residual"},
        ["features.0.0", *(f"features.{i}" for i in range(1, 18)), "features.18.0", "classifier.1"],
    ),
    "squeezenet1_1": (
        {"name": "torchvision:squeezenet1_1"},
        32,
        {"grouping": "fire"},
        ["features.0", *(f"features.{i}" for i in FIRES), "classifier.1"],
    ),
    "squeezenext23": (
        {"name": "squeezenext23"},
        64,
        {"grouping": "residual"},
        ["stem.conv", *SQUEEZENEXT_UNITS, "head.conv", "fc"],
    ),
}


def config(model: dict, side: int, hessian: dict) -> dict:
    return {
        "run": {"name": "vision", "seed": 0, "device": "cpu", "torch_threads": 1},
        "model": {"num_classes": 4, "in_channels": 3, **model},
        "data": {
            "name": "synthetic",
            "channels": 3,
            "image_size": side,
            "num_classes": 4,
            "train_size": 4,
            "eval_size": 4,
            "hessian_samples": 2,
            "hessian_batch_size": 2,
            "batch_size": 4,
        },
        "baseline": {"train_epochs": 1, "lr": 1e-3, "batch_size": 4},
        "hessian": {"max_iter": 3, "trace_min_probes": 2, "trace_max_probes": 2, **hessian},
        "allocation": {"method": "ilp", "candidate_bits": [2, 4, 8], "compression": COMPRESSION},
        "finetune": {"epochs_per_stage": 1, "blocks_per_stage": 100, "lr": 1e-4, "batch_size": 4},
        "backend": {"kind": "local"},
    }


def weight_modules(model: nn.Module) -> dict[str, int]:
    """Conv/Linear module name -> its own parameter count (weight + bias)."""
    return {
        name: sum(p.numel() for p in m.parameters(recurse=False))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


@pytest.mark.slow  # ~2 min for the six on 2 busy cores (CI runs slow tests too)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[] if ":" not in CASES[n][0]["name"] else needs_torchvision)
        for n in CASES
    ],
)
def test_whole_pipeline_on_tiny_images(name: str, tmp_path: Path):
    model_section, side, hessian, expected_blocks = CASES[name]
    cfg = config(model_section, side, hessian)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / "run"
    assert main(["-q", "run", str(path), "--run-dir", str(run)]) == 0

    def table(name: str) -> list[dict]:
        return pq.read_table(run / "stages" / f"{name}.parquet").to_pylist()

    model = build_model(ModelConfig(**cfg["model"]))
    layers = weight_modules(model)
    sensitivity = table("hessian/sensitivity")
    assert [r["block"] for r in sensitivity] == expected_blocks
    for row in sensitivity:  # each block's size is the sum over its Conv/Linear modules
        assert row["n_params"] == sum(layers[m] for m in row["modules"]), row["block"]
        assert row["hvps"] >= 1 and math.isfinite(row["eigenvalue"]), row["block"]
        assert math.isfinite(row["trace"]) and row["trace_probes"] == 2, row["block"]
    assert sorted(m for r in sensitivity for m in r["modules"]) == sorted(layers)

    bits = {r["block"]: r["bits"] for r in table("allocate/bits")}
    assert set(bits) == set(expected_blocks) and set(bits.values()) <= {2, 4, 8}
    weights = {m: model.get_submodule(m).weight.numel() for m in layers}  # W-Comp: no biases
    owner = {m: r["block"] for r in sensitivity for m in r["modules"]}
    summary = table("allocate/summary")[0]
    compression = 32 * sum(weights.values()) / sum(w * bits[owner[m]] for m, w in weights.items())
    assert summary["weight_compression"] == pytest.approx(compression, rel=1e-9)
    assert compression >= COMPRESSION

    exported = {r["module"]: r for r in table("export/layers")}
    assert set(exported) == set(layers)
    for module, row in exported.items():
        assert row["weight_bits"] == bits[owner[module]], module
    assert len(table("baseline/epochs")) == 1 and len(table("finetune/epochs")) == 1
    phases = {r["phase"]: r for r in table("evaluate/metrics")}
    assert {"float", "ptq", "final"} <= set(phases)
    assert all(math.isfinite(r["eval_loss"]) for r in phases.values())
    assert phases["final"]["weight_compression"] == pytest.approx(compression, rel=1e-9)
    # the grouping the config names is the partition the pipeline used
    patterns = [tuple(p) for p in hessian.get("patterns", [])] or None
    blocks = partition_blocks(model, grouping=hessian["grouping"], patterns=patterns)
    assert [b.name for b in blocks] == expected_blocks

    # the user's deploy command: ONNX QDQ (checked by onnx on export) with each layer's codes
    # at its exported width, run in onnxruntime against the rebuilt model (--check); the
    # numerics are proven layer by layer in tests/test_onnx_torchvision.py
    assert main(["-q", "export", str(run), "--format", "onnx", "--check"]) == 0
    sizes = json.loads((run / "deploy" / "sizes.json").read_text())
    assert sizes["packed_bytes"]["total"] == round(sizes["computed_size_mb"] * MB)
    assert math.isfinite(sizes["max_abs_logit_diff"]) and 0 <= sizes["agreement"] <= 1
    proto = onnx.load(run / "deploy" / "model.onnx")
    codes = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for module, row in exported.items():
        assert abs(codes[f"{module}.weight_int"]).max() == 2 ** (row["weight_bits"] - 1) - 1
    ops = [nd.op_type for nd in proto.graph.node]
    assert ops.count("QuantizeLinear") == len(exported)


@needs_torchvision
def test_shipped_inception_config_model_takes_299_and_at_least_75():
    """The CI run above uses 75x75; the shipped config's network runs at the paper's 299x299."""
    import torch

    section = yaml.safe_load((REPO / "configs/inception_v3_imagenet.yaml").read_text())["model"]
    section.update(checkpoint=None, checkpoint_ignore=[])
    model = build_model(ModelConfig(**section)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 299, 299)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 1000)
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            model(torch.randn(1, 3, 74, 74))
