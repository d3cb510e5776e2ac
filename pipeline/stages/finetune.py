"""Stage ``finetune``: block-wise QAT in the Omega order (``hawq.qat.run_qat``), resumable.

After every epoch the QAT state is written as ``state.safetensors`` (tensors, with the JSON
metadata of ``QATState.meta`` under the ``qat`` key, so tensors and counters commit in one
atomic rename) and the epoch rows as ``epochs.parquet``. A resumed run feeds the state back
to ``run_qat``, which continues bit-identically. Output: ``model.safetensors`` (the fake-quant
model's state dict) and ``epochs.parquet``. ``epochs_per_stage: 0`` means post-training
quantization: quantize everything, calibrate activation ranges, no training.
"""

from __future__ import annotations

import itertools
import json
import logging
import time

import pyarrow as pa
from torch import nn

from hawq.qat import EpochRecord, QATState, run_qat
from hawq.quant import calibrate_, quantize_
from pipeline.config import RunConfig, qat_config, section_dict
from pipeline.stages.allocate import load_bit_config
from pipeline.stages.base import EPOCH_SCHEMA, Params, StageContext, flat

log = logging.getLogger(__name__)

STATE = "state.safetensors"
CALIBRATION_BATCHES = 4


def params(cfg: RunConfig, fingerprint: str) -> Params:
    return {
        **flat("finetune", section_dict(cfg, "finetune"), skip=("order", "blocks_per_stage")),
        "run.seed": cfg.run.seed,
        "data.batch_size": cfg.data.batch_size,
    }


def qat_stages(ctx: StageContext) -> list[list[str]]:
    """Module names to quantize at each fine-tuning stage, from ``order/order.parquet``."""
    cols = ctx.read_table("order", "order.parquet").to_pydict()
    stages: dict[int, list[str]] = {}
    for s, mods in zip(cols["stage"], cols["modules"], strict=True):
        stages.setdefault(int(s), []).extend(mods)
    return [stages[s] for s in sorted(stages)]


def quantized_model(ctx: StageContext) -> nn.Module:
    """The fine-tuned fake-quant model, rebuilt from ``finetune/model.safetensors``."""
    model = ctx.float_model()
    modules = [m for st in qat_stages(ctx) for m in st]
    quantize_(model, load_bit_config(ctx), modules=modules)
    weights, _ = ctx.store.read_tensors("finetune", "model.safetensors")
    model.load_state_dict(weights)
    return model.to(ctx.device).eval()


def _load_state(ctx: StageContext) -> QATState | None:
    if not ctx.path(STATE).exists():
        return None
    tensors, meta = ctx.store.read_tensors(ctx.stage, STATE)
    if meta.get("hawq.key") != ctx.key:
        return None
    state = QATState(tensors=tensors, meta=json.loads(meta["qat"]))
    log.info(
        "finetune: resuming after stage %d epoch %d",
        state.meta["stage"] + 1,
        state.meta["epoch"],
    )
    return state


def _rows(history: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"phase": "finetune", **r} for r in history], schema=EPOCH_SCHEMA)


def run(ctx: StageContext) -> None:
    """QAT stage by stage; state and metrics persisted after every epoch."""
    cfg = ctx.cfg
    stages = qat_stages(ctx)
    bit_config = load_bit_config(ctx)
    model = ctx.float_model()
    train = (ctx.data.train_x, ctx.data.train_y)
    evald = (ctx.data.eval_x, ctx.data.eval_y)
    if cfg.finetune.epochs_per_stage == 0:
        quantize_(model, bit_config, modules=[m for st in stages for m in st])
        calibrate_(model, calibration_inputs(ctx))
        ctx.write_tensors("model.safetensors", model.state_dict())
        ctx.write_table("epochs.parquet", _rows([]))
        return
    qcfg = qat_config(cfg)
    total = qcfg.epochs * len(stages)
    state = _load_state(ctx)
    teacher = ctx.float_model() if qcfg.loss == "distill" else None
    t0, first = time.perf_counter(), 0 if state is None else int(state.meta["global_epoch"])

    def on_epoch_end(rec: EpochRecord, st: QATState) -> None:
        ctx.write_tensors(STATE, st.tensors, qat=json.dumps(st.meta))
        ctx.write_table("epochs.parquet", _rows(st.meta["history"]))
        done = rec.global_epoch + 1
        ctx.report_progress(done, total, "epochs")
        eta = (time.perf_counter() - t0) / max(1, done - first) * (total - done)
        log.info("finetune: epoch %d/%d done (ETA %.0fs)", done, total, eta)
        ctx.pause(f"epoch:{done}")

    ctx.report_progress(first, total, "epochs")
    run_qat(
        model,
        stages,
        train,
        evald,
        qcfg,
        bit_config=bit_config,
        state=state,
        teacher=teacher,
        on_epoch_end=on_epoch_end,
    )
    ctx.write_tensors("model.safetensors", model.state_dict())


def calibration_inputs(ctx: StageContext) -> list:
    """The first ``CALIBRATION_BATCHES`` fine-tuning batches' inputs (activation ranges)."""
    batches = ctx.data.train_batches(ctx.cfg.finetune.batch_size, seed=ctx.cfg.run.seed)
    return [x.to(ctx.device) for x, _ in itertools.islice(batches, CALIBRATION_BATCHES)]
