"""Resumable training inside a stage (``baseline`` and ``finetune``), epoch by epoch.

Both stages train through the one hawq loop (``hawq.qat.train_float`` / ``run_qat``). After
every epoch the loop's ``QATState`` is written as one safetensors file (tensors, with the JSON
metadata under the ``qat`` key, so tensors and counters commit in one atomic rename), the rows
so far as ``epochs.parquet``; then progress is recorded and the ``<stage>:epoch:<n>`` pause
point is passed. With ``every_steps`` (``finetune.checkpoint_every_steps``) the state is also
written mid-epoch (then ``<stage>:step:<epoch>:<steps>``), and at the next step boundary after a
preemption signal (:mod:`pipeline.preempt`). A resumed run feeds the state back to the loop,
which continues bit-identically (mid-epoch: same data order, finished batches skipped). A state
file stamped with another stage key is ignored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from hawq.qat import EpochRecord, QATState
from pipeline import preempt
from pipeline.stages.base import StageContext

log = logging.getLogger(__name__)

EPOCH_SCHEMA = pa.schema(
    [
        ("phase", pa.string()),
        ("ft_stage", pa.int64()),
        ("epoch", pa.int64()),
        ("global_epoch", pa.int64()),
        ("lr", pa.float64()),
        ("train_loss", pa.float64()),
        ("train_acc", pa.float64()),
        ("eval_loss", pa.float64()),
        ("eval_acc", pa.float64()),
        ("n_quantized", pa.int64()),
        ("seconds", pa.float64()),
    ]
)
"""Per-epoch metrics of baseline training (phase ``baseline``) and QAT (phase ``finetune``);
``ft_stage`` is the fine-tuning stage (0 for the baseline), ``epoch`` counts within it."""

TrainLoop = Callable[..., Any]  # (state=..., on_epoch_end=..., on_step=...) -> its result


def epoch_table(phase: str, history: Sequence[dict]) -> pa.Table:
    """``epochs.parquet`` rows: ``phase`` + the loop's epoch records (as dicts)."""
    rows = [{"phase": phase, "ft_stage": r["stage"], **r} for r in history]
    return pa.Table.from_pylist(rows, schema=EPOCH_SCHEMA)


def _load_state(ctx: StageContext, name: str) -> QATState | None:
    if not ctx.path(name).exists():
        return None
    tensors, meta = ctx.store.read_tensors(ctx.stage, name)
    if meta.get("hawq.key") != ctx.key or "qat" not in meta:  # another key or format
        return None
    state = QATState(tensors=tensors, meta=json.loads(meta["qat"]))
    m = state.meta
    where = f"stage {m['stage'] + 1} epoch {m['epoch']}" if len(m["stages"]) > 1 else ""
    where = where or f"epoch {m['epoch']}"
    if "partial" in m:  # saved mid-epoch
        where += f", {m['partial']['step']} steps into the next"
    log.info("%s: resuming training after %s", ctx.stage, where)
    return state


def train_resumably(
    ctx: StageContext, train: TrainLoop, *, state_file: str, total: int, every_steps: int = 0
) -> Any:
    """Run ``train(state=..., on_epoch_end=..., on_step=...)`` with the state persisted after
    every epoch, every ``every_steps`` optimizer steps (0: epoch ends only) and at the step a
    preemption (:mod:`pipeline.preempt`) is requested; the preemption then proceeds. Returns
    what ``train`` returns."""
    state = _load_state(ctx, state_file)
    t0, first = time.perf_counter(), 0 if state is None else int(state.meta["global_epoch"])

    def on_epoch_end(rec: EpochRecord, st: QATState) -> None:
        ctx.write_tensors(state_file, st.tensors, qat=json.dumps(st.meta))
        ctx.write_table("epochs.parquet", epoch_table(ctx.stage, st.meta["history"]))
        done = rec.global_epoch + 1
        ctx.report_progress(done, total, "epochs")
        eta = (time.perf_counter() - t0) / max(1, done - first) * (total - done)
        log.info(
            "%s: epoch %d/%d done, train loss %.4f, eval loss %.4f, acc %.4f (ETA %.0fs)",
            ctx.stage, done, total, rec.train_loss, rec.eval_loss, rec.eval_acc, eta,
        )  # fmt: skip
        with preempt.safe_point():  # saved: a preemption may proceed here
            ctx.pause(f"epoch:{done}")

    def on_step(global_epoch: int, steps: int, capture: Callable[[], QATState]) -> None:
        preempt.signal_point(f"{ctx.stage}:step:{global_epoch + 1}:{steps}")  # test hook
        wanted = preempt.requested()
        if not wanted and not (every_steps and steps % every_steps == 0):
            return
        st = capture()
        ctx.write_tensors(state_file, st.tensors, qat=json.dumps(st.meta))
        log.info("%s: state saved at epoch %d step %d", ctx.stage, global_epoch + 1, steps)
        with preempt.safe_point():  # runs a pending preemption (submitit: requeue and exit)
            ctx.pause(f"step:{global_epoch + 1}:{steps}")

    ctx.report_progress(first, total, "epochs")
    with preempt.deferrable():
        return train(state=state, on_epoch_end=on_epoch_end, on_step=on_step)
