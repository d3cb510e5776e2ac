"""What every stage shares: the :class:`Stage` spec, the :class:`StageContext`, model loading.

A stage is a function of its context: it reads upstream outputs from the run store, writes its
own through the context (atomic, stamped with its key) and reports progress for ``hawq status``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from pipeline.atomic import pause_point
from pipeline.config import RunConfig
from pipeline.data import DataBundle
from pipeline.data_factory import FactoryData
from pipeline.data_images import StreamingImages
from pipeline.models import LossFn, model_factory, task_loss_fn
from pipeline.store import RunStore

log = logging.getLogger(__name__)

Params = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One node of the pipeline DAG.

    ``params(cfg, fingerprint)`` returns the flat ``{"section.key": value}`` settings that the
    stage's key hashes (with the upstream keys and the hawq version); ``outputs`` are the files
    that must exist for a finished stage to count as done.
    """

    name: str
    deps: tuple[str, ...]
    params: Callable[[RunConfig, str], Params]
    run: Callable[[StageContext], None]
    outputs: tuple[str, ...]
    summary: str


@dataclass(kw_only=True)
class StageContext:
    """The run-time inputs of one stage."""

    cfg: RunConfig
    store: RunStore
    stage: str
    key: str
    data: DataBundle | FactoryData | StreamingImages
    device: torch.device
    progress: bool = True
    backend: Callable[[], Any] | None = None  # -> HessianBackend (hessian stage only)
    cache: dict[str, Any] = field(default_factory=dict)
    resources: contextlib.ExitStack | None = None  # the run's: e.g. a Ray cluster a stage started

    # ---- own outputs
    def write_table(self, name: str, table: pa.Table) -> Path:
        return self.store.write_table(self.stage, self.key, name, table)

    def write_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], **meta: str) -> Path:
        return self.store.write_tensors(self.stage, self.key, name, tensors, **meta)

    def path(self, name: str) -> Path:
        return self.store.stage_dir(self.stage) / name

    def report_progress(self, done: int, total: int, unit: str) -> None:
        """Record ``done``/``total`` for ``hawq status``."""
        self.store.write_progress(self.stage, done, total, unit)

    def pause(self, point: str) -> None:
        """Test hook ``<stage>:<point>`` (see :func:`pipeline.atomic.pause_point`)."""
        pause_point(f"{self.stage}:{point}")

    def loss_fn(self) -> LossFn | None:
        """The task loss for training and evaluation (None: hawq's cross-entropy)."""
        return task_loss_fn(self.cfg)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(loss, accuracy) of ``model`` on the evaluation set (accuracy NaN without classes)."""
        from hawq import evaluate

        bs = self.cfg.data.batch_size
        return evaluate(model, self.data.eval_data(bs), batch_size=bs, loss_fn=self.loss_fn())

    # ---- upstream outputs
    def read_table(self, stage: str, name: str) -> pa.Table:
        """An upstream table without the ``stage_key`` column."""
        table = self.store.read_table(stage, name)
        return table.drop_columns(["stage_key"]) if "stage_key" in table.column_names else table

    def float_weights(self) -> dict[str, torch.Tensor]:
        """The baseline's float state dict."""
        if "float_weights" not in self.cache:
            weights, _ = self.store.read_tensors("baseline", "model.safetensors")
            self.cache["float_weights"] = weights
        return self.cache["float_weights"]

    def float_model(self) -> nn.Module:
        """A fresh baseline model (float32, eval mode, on the run's device)."""
        model = model_factory(self.cfg.model)()
        model.load_state_dict(self.float_weights())
        return model.to(self.device).eval()


def flat(prefix: str, section: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> Params:
    """``{"prefix.key": value}`` for a section dict, minus ``skip``."""
    return {f"{prefix}.{k}": v for k, v in section.items() if k not in skip}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def no_params(cfg: RunConfig, fingerprint: str) -> Params:
    """Stages with no settings of their own (their keys follow the upstream keys)."""
    return {}
