"""The resumable state of the QAT loop (:mod:`hawq.qat`): capture after any step, restore exactly.

A ``QATState`` holds the model (with the fake-quant EMA ranges), the optimizer, the global
torch RNG (and the CUDA one on CUDA), the fp16 ``GradScaler`` and the counters as flat tensors
(safetensors-ready: contiguous, unshared, on the CPU) + JSON-able metadata: the format, stages,
config and bit config it was saved with, the stage / epoch to continue from, the
``EpochRecord`` history and, for a mid-epoch state, the epoch's running sums (``partial``).
Restoring checks that the stages, config and bit config match the resumed run's, re-quantizes
and re-freezes the stages reached, then loads the tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawq.metrics import model_device
from hawq.qat_config import QATConfig
from hawq.quant.bitconfig import BitConfig
from hawq.quant.modules import quantize_

Scaler = torch.amp.GradScaler | None

STATE_FORMAT = "hawq.qat/1"

__all__ = [
    "STATE_FORMAT",
    "EpochRecord",
    "QATState",
    "capture_state",
    "freeze_modules",
    "restore_state",
    "stage_modules",
]


@dataclass(frozen=True, kw_only=True)
class EpochRecord:
    """What one epoch did. ``epoch`` counts within the stage, ``global_epoch`` over all."""

    stage: int
    epoch: int
    global_epoch: int
    lr: float
    train_loss: float
    train_acc: float
    eval_loss: float | None
    eval_acc: float | None
    n_quantized: int
    seconds: float


@dataclass
class QATState:
    """Everything to resume after an epoch: flat tensors (safetensors-ready: contiguous,
    unshared) and JSON-able metadata (counters, stages, configs, optimizer groups, history)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def stage_modules(stages: Sequence[Sequence[str]], upto: int) -> list[str]:
    """The module names of ``stages[:upto]`` (the stages quantized before stage ``upto``)."""
    return [n for st in stages[:upto] for n in st]


def freeze_modules(model: nn.Module, names: Sequence[str]) -> None:
    """``requires_grad = False`` on the modules ``names`` of ``model`` (and their children)."""
    for n in names:
        model.get_submodule(n).requires_grad_(False)


def capture_state(
    model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any], scaler: Scaler
) -> QATState:
    """The state of the run now: ``meta`` (counters, history, ...) plus the model, optimizer,
    RNG and ``GradScaler`` state, copied to the CPU."""

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True).contiguous()

    tensors = {f"model.{k}": cpu(v) for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    state_meta: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = cpu(v)
            else:
                state_meta.setdefault(str(idx), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state().clone()
    dev = model_device(model)
    if dev.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(dev).clone()
    meta = {**meta, "optimizer": {"param_groups": sd["param_groups"], "state": state_meta}}
    if scaler is not None:  # fp16: the loss scale and its growth counter
        meta["grad_scaler"] = scaler.state_dict()
    return QATState(tensors=tensors, meta=meta)


def _optimizer_state(state: QATState) -> dict[str, Any]:
    st: dict[int, dict[str, Any]] = {}
    for k, v in state.tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            st.setdefault(int(idx), {})[name] = v.clone()
    for idx, extra in state.meta["optimizer"]["state"].items():
        st.setdefault(int(idx), {}).update(extra)
    return {"state": st, "param_groups": copy.deepcopy(state.meta["optimizer"]["param_groups"])}


def restore_state(
    model: nn.Module,
    state: QATState,
    base_meta: dict[str, Any],
    bit_config: BitConfig | None,
    scaler: Scaler,
) -> tuple[int, int, dict[str, Any] | None, list[EpochRecord]]:
    """Load ``state`` into the float ``model`` (quantized and frozen up to its stage), the RNG
    and ``scaler``; ``base_meta`` is the resumed run's format, stages, config and bit config,
    which must match the state's. Returns ``(stage, epoch, optimizer state dict or None when
    the stage starts afresh, history)``."""
    meta = state.meta
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"state format must be {STATE_FORMAT!r}, got {meta.get('format')!r}")
    cfg = QATConfig.from_dict(meta["config"])  # keys added since the state was saved: defaults
    saved = {**meta, "config": cfg.to_dict()}
    for key in ("stages", "config", "bit_config"):
        if saved[key] != base_meta[key]:
            raise ValueError(f"state was saved with a different {key}: {meta[key]!r}")
    if scaler is not None:  # same config: amp 'fp16', saved with the scaler's state
        scaler.load_state_dict(meta["grad_scaler"])
    stages, s, e = meta["stages"], int(meta["stage"]), int(meta["epoch"])
    if bit_config is not None:
        quantize_(model, bit_config, modules=stage_modules(stages, s + 1))
    if cfg.freeze_quantized:
        freeze_modules(model, stage_modules(stages, s))
    sd = {k[len("model.") :]: v for k, v in state.tensors.items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=True)
    torch.set_rng_state(state.tensors["rng.torch"].clone())
    dev = model_device(model)
    if dev.type == "cuda" and "rng.cuda" in state.tensors:
        torch.cuda.set_rng_state(state.tensors["rng.cuda"].clone(), dev)
    history = [EpochRecord(**r) for r in meta["history"]]
    if e >= cfg.epochs:  # the stage was finished: the next one starts afresh
        return s + 1, 0, None, history
    return s, e, _optimizer_state(state), history
