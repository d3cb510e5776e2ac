"""The one block-wise quantization-aware training (QAT) loop, resumable bit-identically.

Stage ``s`` quantizes the modules named in ``stages[s]`` (``quantize_`` with the bit config;
a name covers its descendants), optionally freezes the layers quantized in earlier stages
(``requires_grad = False``), then trains ``config.epochs`` epochs with SGD and a fresh
optimizer, evaluating after each, at the per-epoch LR of the stage's schedule
(:class:`hawq.qat_config.QATConfig`).
``train_float`` runs the same loop on a float model (one stage that quantizes nothing).

Loss: ``ce`` = the task loss (cross-entropy on logits, or ``loss_fn(output, target)`` for
other tasks, see :mod:`hawq.metrics`); ``distill`` = ``alpha * T^2 * KL(p_t^T || p_s^T) +
(1 - alpha) * CE`` against a frozen float teacher (by default a copy of ``model`` as passed).

Data parallelism: called in every rank of an initialised ``torch.distributed`` group, the loop
trains data-parallel (rank slices of each global batch, gradients and observer ranges
all-reduced, evaluation sharded; see :mod:`hawq.data_parallel`) and gives the single-process
weights at the same global batch; ``batchnorm`` chooses how BatchNorm behaves.

Precision (``amp``, ``channels_last``; :mod:`hawq.precision`): forward passes of training and
evaluation run under autocast (bf16, or fp16 with a ``GradScaler`` whose state is part of the
``QATState``) and/or in channels_last memory; losses, parameters, optimizer state and the
fake quantizers' arithmetic stay float32.

Determinism: epoch ``g`` (counted over all stages) shuffles with a ``torch.Generator`` seeded
by ``derive_seed(seed, "qat-data", g)``; the global torch RNG (dropout) is forked, seeded from
the config and saved in the state. A ``QATState`` taken after any epoch or step holds the model
(with the fake-quant EMA ranges), optimizer, RNG and counters as flat tensors + JSON metadata
(:mod:`hawq.qat_state`); passing it back as ``state=`` continues exactly where the uninterrupted
run would be.

This module is the one entry point of QAT: it re-exports ``QATConfig`` (:mod:`hawq.qat_config`)
and ``QATState``, ``EpochRecord``, ``STATE_FORMAT`` (:mod:`hawq.qat_state`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hawq.data_parallel import (
    all_reduce_sums,
    batchnorm_mode,
    broadcast_buffers,
    reduce_step,
    world,
)
from hawq.metrics import Data, LossFn, batches, count_correct, evaluate, model_device, task_loss
from hawq.precision import full_precision
from hawq.qat_config import QATConfig
from hawq.qat_state import (
    STATE_FORMAT,
    EpochRecord,
    QATState,
    Scaler,
    capture_state,
    freeze_modules,
    restore_state,
    stage_modules,
)
from hawq.quant.bitconfig import BitConfig
from hawq.quant.modules import quantize_, quantized_modules
from hawq.seeding import derive_seed

StepHook = Callable[[int, int, Callable[[], QATState]], None]
"""``on_step(global_epoch, steps_done_in_epoch, capture)``: after every optimizer step."""

logger = logging.getLogger(__name__)

__all__ = [
    "STATE_FORMAT",
    "EpochRecord",
    "QATConfig",
    "QATState",
    "StepHook",
    "evaluate",
    "run_qat",
    "train_float",
]


def _loss(cfg: QATConfig, out, y, t_out: torch.Tensor | None, loss_fn: LossFn | None):
    ce = task_loss(out, y, loss_fn)
    if cfg.loss == "ce" or t_out is None:
        return ce
    temp = cfg.temperature
    kl = F.kl_div(
        F.log_softmax(out / temp, dim=1),
        F.log_softmax(t_out / temp, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return cfg.alpha * temp * temp * kl + (1.0 - cfg.alpha) * ce


def _num(value: float | None) -> str:
    """Log text of a metric: '-' when it is missing or undefined (NaN accuracy)."""
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def run_qat(
    model: nn.Module,
    stages: Sequence[Sequence[str]],
    train_data: Data,
    eval_data: Data | None,
    config: QATConfig,
    *,
    bit_config: BitConfig,
    state: QATState | None = None,
    teacher: nn.Module | None = None,
    on_epoch_end: Callable[[EpochRecord, QATState], bool | None] | None = None,
    loss_fn: LossFn | None = None,
    on_step: StepHook | None = None,
) -> list[EpochRecord]:
    """Block-wise QAT of ``model`` in place; returns all epoch records (resumed ones included).

    ``stages``: list of lists of module names, in fine-tuning order. ``train_data``/
    ``eval_data``: ``(X, y)`` tensors or ``callable(generator) -> iterable of (x, y)`` (the
    callable draws its order from the generator; ``batch_size``/``drop_last`` then apply
    only to tensors). To resume, pass a *float* model built as for the original run plus
    ``state``.
    ``on_epoch_end(record, state)`` runs after every epoch; returning True stops the run.
    ``loss_fn(output, target)``: the task loss (default cross-entropy; see :mod:`hawq.metrics`).
    ``on_step(global_epoch, steps_done, capture)`` runs after every optimizer step;
    ``capture()`` returns the mid-epoch :class:`QATState` (model, optimizer, RNG, the epoch's
    running sums and its step): resumed from, the epoch redraws its data order from its seed,
    skips the ``steps_done`` batches already trained on (without producing them when the data
    callable has ``from_step``, see :func:`hawq.metrics.batches`) and ends bit-identically.
    """
    stages = [list(s) for s in stages]
    if not stages or any(not s for s in stages):
        raise ValueError("stages must be a non-empty list of non-empty lists of module names")
    return _train(
        model, stages, train_data, eval_data, config,
        bit_config=bit_config, state=state, teacher=teacher, on_epoch_end=on_epoch_end,
        loss_fn=loss_fn,
        on_step=on_step,
    )  # fmt: skip


def train_float(
    model: nn.Module,
    train_data: Data,
    eval_data: Data | None,
    config: QATConfig,
    *,
    state: QATState | None = None,
    on_epoch_end: Callable[[EpochRecord, QATState], bool | None] | None = None,
    loss_fn: LossFn | None = None,
    on_step: StepHook | None = None,
) -> list[EpochRecord]:
    """Train a float ``model`` in place for ``config.epochs`` epochs: the QAT loop, unquantized.

    One stage that quantizes nothing, so the LR schedule, data order, RNG handling, records and
    bit-identical resume (``state``, ``on_epoch_end``, ``on_step``) are exactly those of
    :func:`run_qat`.
    """
    if config.loss != "ce":
        raise ValueError(f"float training has no teacher: loss must be 'ce', got {config.loss!r}")
    return _train(
        model, [[]], train_data, eval_data, config,
        bit_config=None, state=state, teacher=None, on_epoch_end=on_epoch_end, loss_fn=loss_fn,
        on_step=on_step,
    )  # fmt: skip


def _train(
    model: nn.Module,
    stages: list[list[str]],
    train_data: Data,
    eval_data: Data | None,
    config: QATConfig,
    *,
    bit_config: BitConfig | None,
    state: QATState | None,
    teacher: nn.Module | None,
    on_epoch_end: Callable[[EpochRecord, QATState], bool | None] | None,
    loss_fn: LossFn | None,
    on_step: StepHook | None = None,
) -> list[EpochRecord]:
    """The loop of :func:`run_qat` / :func:`train_float` (``bit_config=None``: no quantization)."""
    dev = model_device(model)
    precision = config.precision
    precision.check_device(dev)
    if config.loss == "distill":
        teacher = copy.deepcopy(model) if teacher is None else teacher
        precision.model(teacher).eval().requires_grad_(False)
    precision.model(model)
    scaler = precision.grad_scaler(dev)
    base_meta = {
        "format": STATE_FORMAT,
        "stages": stages,
        "config": config.to_dict(),
        "bit_config": None if bit_config is None else bit_config.to_dict(),
    }
    history: list[EpochRecord] = []
    stage0, epoch0, opt_state, partial = 0, 0, None, None
    fork = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
    with fork, batchnorm_mode(model, config.batchnorm):
        if state is None:
            torch.manual_seed(derive_seed(config.seed, "qat-torch"))
        else:
            stage0, epoch0, opt_state, history = restore_state(
                model, state, base_meta, bit_config, scaler
            )
            partial = state.meta.get("partial")  # a mid-epoch state: the epoch's progress
        for s in range(stage0, len(stages)):
            if opt_state is None:  # entering stage s afresh
                if bit_config is not None:
                    quantize_(model, bit_config, modules=stages[s])
                if config.freeze_quantized:
                    freeze_modules(model, stage_modules(stages, s))
                model.zero_grad(set_to_none=True)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
            if opt_state is not None:
                opt.load_state_dict(opt_state)
                opt_state = None
            for e in range(epoch0 if s == stage0 else 0, config.epochs):
                g = s * config.epochs + e
                hook = None
                if on_step is not None:
                    meta = {**base_meta, "stage": s, "epoch": e, "global_epoch": g,
                            "history": [asdict(r) for r in history]}  # fmt: skip
                    hook = _step_hook(on_step, model, opt, meta, scaler)
                rec = _train_epoch(
                    model, opt, train_data, eval_data, config, teacher, loss_fn, dev, (s, e, g),
                    partial=partial, on_step=hook, scaler=scaler,
                )  # fmt: skip
                partial = None
                history.append(rec)
                logger.info(
                    "qat stage %d/%d epoch %d/%d lr %.4g loss %.4f (eval %s) acc %s (eval %s)",
                    *(s + 1, len(stages), e + 1, config.epochs, rec.lr, rec.train_loss),
                    *(_num(rec.eval_loss), _num(rec.train_acc), _num(rec.eval_acc)),
                )
                if on_epoch_end is not None:
                    meta = {
                        **base_meta,
                        "stage": s,
                        "epoch": e + 1,
                        "global_epoch": g + 1,
                        "history": [asdict(r) for r in history],
                    }
                    if on_epoch_end(rec, capture_state(model, opt, meta, scaler)):
                        return history
    return history


def _step_hook(
    on_step: StepHook, model: nn.Module, opt: torch.optim.Optimizer, meta: dict, scaler: Scaler
):  # fmt: skip
    """``(steps_done, sums) -> None`` for :func:`_train_epoch`, calling the user's ``on_step``."""

    def hook(steps: int, sums: dict[str, Any]) -> None:
        def capture() -> QATState:
            return capture_state(model, opt, {**meta, "partial": {"step": steps, **sums}}, scaler)

        on_step(meta["global_epoch"], steps, capture)

    return hook


def _train_epoch(
    model, opt, train_data, eval_data, cfg, teacher, loss_fn, dev, where, *, partial=None,
    on_step=None, scaler=None,
) -> EpochRecord:  # fmt: skip
    s, e, g = where
    t0 = time.perf_counter()
    lr = cfg.lr_at(e)
    for group in opt.param_groups:
        group["lr"] = lr
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "qat-data", g))
    model.train()
    rank, world_size = world()
    precision = cfg.precision
    params = [p for group in opt.param_groups for p in group["params"]]
    tot, correct, total, n, classification, skip = 0.0, 0, 0, 0, True, 0
    if partial is not None:  # resumed mid-epoch: same order, the first `skip` batches done
        tot, correct, total, n = partial["tot"], partial["correct"], partial["total"], partial["n"]
        classification, skip = partial["classification"], partial["step"]
    cut = batches(
        train_data, cfg.batch_size, gen, True, cfg.drop_last,
        start=skip, rank=rank, world_size=world_size,
    )  # fmt: skip
    for k, (xb, yb) in enumerate(cut, start=skip):  # resumed: the first `skip` not drawn
        xb, yb = precision.inputs(xb, dev), yb.to(dev)
        t_out = None
        with precision.autocast(dev):
            out = model(xb)
            if teacher is not None and cfg.loss == "distill":
                with torch.no_grad():
                    t_out = teacher(xb)
        out, t_out = full_precision(out), full_precision(t_out)  # losses in float32
        b = yb.shape[0]
        if world_size == 1:
            loss = _loss(cfg, out, yb, t_out, loss_fn)
            opt.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()
            step_loss, counts = loss.item() * b, count_correct(out, yb)
        else:  # this rank's share of the global batch mean; gradients and sums over all ranks
            b, step_loss, counts = _data_parallel_step(
                cfg, opt, params, out, yb, t_out, loss_fn, scaler
            )
        if scaler is None:
            opt.step()
        else:  # unscale, skip the step on inf/NaN gradients, adapt the scale
            scaler.step(opt)
            scaler.update()
        if world_size > 1 and cfg.batchnorm == "local":
            broadcast_buffers(model)
        tot += step_loss
        classification = classification and counts is not None
        if counts is not None:
            correct, total = correct + counts[0], total + counts[1]
        n += b
        if on_step is not None:
            sums = {"tot": tot, "correct": correct, "total": total, "n": n}
            on_step(k + 1, {**sums, "classification": classification})
    if n == 0:
        raise ValueError("training data is empty")
    ev_loss = ev_acc = None
    if eval_data is not None:
        ev_loss, ev_acc = evaluate(
            model, eval_data, batch_size=cfg.eval_batch_size, loss_fn=loss_fn, precision=precision
        )
    nq = len(quantized_modules(model))
    return EpochRecord(
        stage=s,
        epoch=e,
        global_epoch=g,
        lr=lr,
        train_loss=tot / n,
        train_acc=correct / total if classification and total else math.nan,
        eval_loss=ev_loss,
        eval_acc=ev_acc,
        n_quantized=nq,
        seconds=time.perf_counter() - t0,
    )


def _data_parallel_step(cfg, opt, params, out, yb, t_out, loss_fn, scaler):  # noqa: ANN001, ANN202
    """Backward of this rank's share ``(b_r / b) L_r`` (times the fp16 loss scale) and the
    all-reduce of the gradients; returns the global ``(b, loss sum, (correct, total) or None)``
    of the step. The summed gradients are equal on every rank, so every rank's ``GradScaler``
    takes the same skip / scale decisions."""
    b_r = yb.shape[0]
    (b,) = all_reduce_sums([b_r], out.device)
    # an empty slice (a global batch smaller than the world) still joins the collectives
    loss = _loss(cfg, out, yb, t_out, loss_fn) if b_r else out.sum() * 0.0
    opt.zero_grad(set_to_none=True)
    share = loss * (b_r / b)
    (share if scaler is None else scaler.scale(share)).backward()
    counts = count_correct(out, yb)
    local = [loss.item() * b_r, *(counts or (0, 0)), float(counts is None)]
    step_loss, correct, total, no_counts = reduce_step(params, local)
    return round(b), step_loss, None if no_counts else (round(correct), round(total))
