"""Stage ``baseline``: the float model, loaded from ``model.checkpoint`` or trained, evaluated.

Outputs: ``model.safetensors`` (float state dict), ``metrics.parquet`` (one row), and when
training ``epochs.parquet`` plus ``train_state.safetensors`` (model, SGD momentum, epoch and
history after every epoch) so a killed run resumes at the next epoch with identical results.
Epoch ``e`` shuffles with ``DataBundle.train_batches(seed=run.seed, epoch=e)`` and seeds the
global torch RNG from ``derive_seed(run.seed, "baseline-torch", e)``.
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from hawq.qat import QATConfig, evaluate
from hawq.seeding import derive_seed
from pipeline.config import RunConfig, section_dict
from pipeline.models import build_model, model_factory
from pipeline.stages.base import EPOCH_SCHEMA, Params, StageContext, flat

log = logging.getLogger(__name__)

STATE = "train_state.safetensors"
METRICS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("epochs", pa.int64()),
        ("n_params", pa.int64()),
        ("eval_loss", pa.float64()),
        ("eval_acc", pa.float64()),
        ("eval_samples", pa.int64()),
    ]
)


def params(cfg: RunConfig, fingerprint: str) -> Params:
    """Model, data, baseline settings, the run seed and the data fingerprint."""
    return {
        **flat("model", section_dict(cfg, "model")),
        **flat("data", section_dict(cfg, "data"), skip=("hessian_samples", "hessian_batch_size")),
        **flat("baseline", section_dict(cfg, "baseline")),
        "run.seed": cfg.run.seed,
        "data.fingerprint": fingerprint,
    }


def initial_model(cfg: RunConfig) -> nn.Module:
    """The checkpoint's model, or a fresh one initialised from ``derive_seed(seed, "init")``."""
    if cfg.model.checkpoint is not None:
        return build_model(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, "init"))
        return model_factory(cfg.model)()


def _schedule(cfg: RunConfig) -> QATConfig:
    b = cfg.baseline
    return QATConfig(
        epochs=b.train_epochs,
        lr=b.lr,
        momentum=b.momentum,
        weight_decay=b.weight_decay,
        batch_size=b.batch_size,
        schedule=b.schedule,
        step_size=max(1, b.train_epochs // 3),
    )


def _save_state(ctx: StageContext, model: nn.Module, opt: torch.optim.Optimizer, history) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
    ctx.write_tensors(STATE, tensors, epoch=str(len(history)), history=json.dumps(history))


def _load_state(ctx: StageContext, model: nn.Module, opt: torch.optim.Optimizer) -> list[dict]:
    if not ctx.path(STATE).exists():
        return []
    tensors, meta = ctx.store.read_tensors(ctx.stage, STATE)
    if meta.get("hawq.key") != ctx.key:
        return []
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    history = json.loads(meta["history"])
    log.info("baseline: resuming training after epoch %d", len(history))
    return history


def _train_epoch(ctx: StageContext, model: nn.Module, opt, sched: QATConfig, e: int) -> dict:
    t0 = time.perf_counter()
    lr = sched.lr_at(e)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    total, correct, n = 0.0, 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.cfg.run.seed, "baseline-torch", e))
        for xb, yb in ctx.data.train_batches(sched.batch_size, seed=ctx.cfg.run.seed, epoch=e):
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            correct += int((out.detach().argmax(1) == yb).sum())
            n += len(yb)
    ev_loss, ev_acc = evaluate(
        model, (ctx.data.eval_x, ctx.data.eval_y), batch_size=ctx.cfg.data.batch_size
    )
    return {
        "phase": "baseline",
        "stage": 0,
        "epoch": e,
        "global_epoch": e,
        "lr": lr,
        "train_loss": total / n,
        "train_acc": correct / n,
        "eval_loss": ev_loss,
        "eval_acc": ev_acc,
        "n_quantized": 0,
        "seconds": time.perf_counter() - t0,
    }


def train(ctx: StageContext, model: nn.Module) -> list[dict]:
    """Train ``baseline.train_epochs`` epochs of SGD, persisting state after each."""
    sched = _schedule(ctx.cfg)
    opt = torch.optim.SGD(
        model.parameters(), lr=sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay
    )
    history = _load_state(ctx, model, opt)
    t_start, first = time.perf_counter(), len(history)
    for e in range(first, sched.epochs):
        rec = _train_epoch(ctx, model, opt, sched, e)
        history.append(rec)
        _save_state(ctx, model, opt, history)
        ctx.write_table("epochs.parquet", pa.Table.from_pylist(history, schema=EPOCH_SCHEMA))
        ctx.report_progress(e + 1, sched.epochs, "epochs")
        eta = (time.perf_counter() - t_start) / (e + 1 - first) * (sched.epochs - e - 1)
        log.info(
            "baseline epoch %d/%d: lr %.4g train loss %.4f acc %.4f, eval acc %.4f (ETA %.0fs)",
            e + 1, sched.epochs, rec["lr"], rec["train_loss"], rec["train_acc"],
            rec["eval_acc"], eta,
        )  # fmt: skip
        ctx.pause(f"epoch:{e + 1}")
    return history


def run(ctx: StageContext) -> None:
    """Load or train the float model, evaluate it, save weights and metrics."""
    cfg = ctx.cfg
    model = initial_model(cfg).to(ctx.device)
    history = train(ctx, model) if cfg.baseline.train_epochs > 0 else []
    loss, acc = evaluate(model, (ctx.data.eval_x, ctx.data.eval_y), batch_size=cfg.data.batch_size)
    source = "trained" if history else "checkpoint" if cfg.model.checkpoint else "random init"
    log.info("baseline (%s): eval loss %.4f, accuracy %.4f", source, loss, acc)
    ctx.write_tensors("model.safetensors", model.state_dict())
    row = {
        "source": source,
        "epochs": len(history),
        "n_params": sum(p.numel() for p in model.parameters()),
        "eval_loss": loss,
        "eval_acc": acc,
        "eval_samples": len(ctx.data.eval_y),
    }
    ctx.write_table("metrics.parquet", pa.Table.from_pylist([row], schema=METRICS_SCHEMA))
