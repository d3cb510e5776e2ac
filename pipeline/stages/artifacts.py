"""Upstream results as the downstream stages use them: bits, QAT stages, the fine-tuned model.

The one place that knows where ``allocate``, ``order`` and ``finetune`` keep these files; a
stage reads another stage's outputs through here (or :class:`StageContext`), never by
importing that stage.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hawq import BitConfig, quantize_
from pipeline.models import model_factory
from pipeline.stages.base import StageContext

CALIBRATION_BATCHES = 4


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A picklable recipe of a model: its architecture and weights (each data-parallel rank
    builds its own copy)."""

    build: Callable[[], nn.Module]
    weights: Mapping[str, torch.Tensor]

    def model(self, device: torch.device) -> nn.Module:
        """A fresh copy (eval mode) on ``device``."""
        model = self.build()
        model.load_state_dict(self.weights)
        return model.to(device).eval()


def float_source(ctx: StageContext) -> ModelSource:
    """The baseline's float model as a :class:`ModelSource`."""
    return ModelSource(build=model_factory(ctx.cfg.model), weights=ctx.float_weights())


def load_bit_config(ctx: StageContext) -> BitConfig:
    """The allocated bit config (``allocate/bit_config.yaml``)."""
    path = ctx.store.stage_dir("allocate") / "bit_config.yaml"
    return BitConfig.from_yaml(path.read_text())


def qat_stages(ctx: StageContext) -> list[list[str]]:
    """Module names to quantize at each fine-tuning stage (``order/order.parquet``)."""
    cols = ctx.read_table("order", "order.parquet").to_pydict()
    stages: dict[int, list[str]] = {}
    for s, mods in zip(cols["ft_stage"], cols["modules"], strict=True):
        stages.setdefault(int(s), []).extend(mods)
    return [stages[s] for s in sorted(stages)]


def quantized_float_model(ctx: StageContext) -> nn.Module:
    """The baseline model with every block of the fine-tuning order quantized (untrained)."""
    model = ctx.float_model()
    quantize_(model, load_bit_config(ctx), modules=[m for st in qat_stages(ctx) for m in st])
    return model


def quantized_model(ctx: StageContext) -> nn.Module:
    """The fine-tuned fake-quant model, rebuilt from ``finetune/model.safetensors``."""
    model = quantized_float_model(ctx)
    weights, _ = ctx.store.read_tensors("finetune", "model.safetensors")
    model.load_state_dict(weights)
    return model.to(ctx.device).eval()


def calibration_inputs(ctx: StageContext) -> list[torch.Tensor]:
    """The first ``CALIBRATION_BATCHES`` fine-tuning batches' inputs (activation ranges)."""
    batches = ctx.data.train_batches(ctx.cfg.finetune.batch_size, seed=ctx.cfg.run.seed)
    return [x.to(ctx.device) for x, _ in itertools.islice(batches, CALIBRATION_BATCHES)]
