"""Stage ``hessian``: per-block top eigenvalue(s) and trace, through the configured backend.

Each block's eigen row is written to ``blocks/<index>.parquet`` the moment it finishes, and
each Hutchinson probe's per-block samples ``v_b^T (H v)_b`` to ``probes/<p>.parquet`` (columns
probe, block, sample); a resumed run passes both to the backend (``done``, ``probes``) so only
the missing blocks and probes are computed, and the traces (means over the same samples in the
same order) are bit for bit those of an uninterrupted run. Output: ``sensitivity.parquet``
(``hawq.hessian.table.SENSITIVITY_SCHEMA`` + ``stage_key``). With
``hessian.trace_method: deflated`` the done blocks' Lanczos bases, which are not persisted, are
solved again for the trace (same numbers, their eigen HVPs once more).
"""

from __future__ import annotations

import logging
import shutil

import pyarrow as pa
import torch

from hawq import SENSITIVITY_SCHEMA, partition_blocks
from hawq.hessian.table import EIGEN_COLUMNS
from pipeline.backends.base import HessianJob
from pipeline.config import RunConfig
from pipeline.models import loss_fn_for, model_factory
from pipeline.stages.base import Params, Stage, StageContext, flat

log = logging.getLogger(__name__)

ROWS_DIR = "blocks"
PROBES_DIR = "probes"
EIGEN_SCHEMA = pa.schema([SENSITIVITY_SCHEMA.field(c) for c in EIGEN_COLUMNS])
PROBE_SCHEMA = pa.schema([("probe", pa.int64()), ("block", pa.string()), ("sample", pa.float64())])


def params(cfg: RunConfig, fingerprint: str) -> Params:
    """The hessian section and the Hessian sample sizes (the backend does not change rows)."""
    return {
        **flat("hessian", cfg.hessian.to_dict()),
        "data.hessian_samples": cfg.data.hessian_samples,
        "data.hessian_batch_size": cfg.data.hessian_batch_size,
    }


def make_job(ctx: StageContext) -> HessianJob:
    """The self-contained job a backend runs (batches cast to ``hessian.dtype``)."""
    cfg = ctx.cfg
    dtype = torch.float64 if cfg.hessian.dtype == "float64" else torch.float32
    blocks = partition_blocks(
        ctx.float_model(),
        grouping=cfg.hessian.grouping,
        patterns=[tuple(p) for p in cfg.hessian.patterns] or None,
    )
    return HessianJob(
        build_model=model_factory(cfg.model),
        state_dict=ctx.float_weights(),
        loss_fn=loss_fn_for(cfg),
        batches=[(x.to(dtype), y) for x, y in ctx.data.hessian],
        blocks=blocks,
        config=cfg.hessian.to_hawq(),
        dtype=dtype,
        metadata={"run": cfg.run.name, "stage_key": ctx.key},
    )


def _done_rows(ctx: StageContext) -> dict[str, dict]:
    rows = {}
    folder = ctx.path(ROWS_DIR)
    if folder.exists():
        for f in sorted(folder.glob("[!.]*.parquet")):
            table = ctx.store.read_table(ctx.stage, f"{ROWS_DIR}/{f.name}", key=ctx.key)
            for row in table.drop_columns(["stage_key"]).to_pylist():
                rows[row["block"]] = row
    return rows


def _done_probes(ctx: StageContext) -> dict[int, dict[str, float]]:
    probes: dict[int, dict[str, float]] = {}
    folder = ctx.path(PROBES_DIR)
    if folder.exists():
        for f in sorted(folder.glob("[!.]*.parquet")):
            table = ctx.store.read_table(ctx.stage, f"{PROBES_DIR}/{f.name}", key=ctx.key)
            for row in table.to_pylist():
                probes.setdefault(row["probe"], {})[row["block"]] = row["sample"]
    return probes


def run(ctx: StageContext) -> None:
    """Run the backend, persisting each block's row as it finishes."""
    job = make_job(ctx)
    index = {b.name: i for i, b in enumerate(job.blocks)}
    done = {k: v for k, v in _done_rows(ctx).items() if k in index}
    total = len(job.blocks)
    finished = len(done)
    if done:
        log.info("hessian: %d/%d blocks already done, computing the rest", finished, total)
    ctx.report_progress(finished, total, "blocks")

    def on_row(row: dict) -> None:
        nonlocal finished
        table = pa.Table.from_pylist([{c: row[c] for c in EIGEN_COLUMNS}], schema=EIGEN_SCHEMA)
        ctx.write_table(f"{ROWS_DIR}/{index[row['block']]:04d}.parquet", table)
        finished += 1
        ctx.report_progress(finished, total, "blocks")
        ctx.pause(f"block:{finished}")

    probes = _done_probes(ctx)
    if probes:
        log.info("hessian: %d Hutchinson probe(s) already done", len(probes))

    def on_probe(p: int, samples: dict[str, float]) -> None:
        rows = [{"probe": p, "block": b, "sample": v} for b, v in samples.items()]
        ctx.write_table(f"{PROBES_DIR}/{p:05d}.parquet", pa.Table.from_pylist(rows, PROBE_SCHEMA))
        probes[p] = samples
        ctx.pause(f"probe-saved:{len(probes)}")

    backend = ctx.backend() if ctx.backend is not None else None
    if backend is None:
        raise RuntimeError("the hessian stage needs a backend")
    try:
        table = backend.run(
            job, done=done, on_row=on_row, probes=dict(probes), on_probe=on_probe,
            progress=ctx.progress,
        )  # fmt: skip
    finally:
        backend.close()
    ctx.write_table("sensitivity.parquet", table.cast(SENSITIVITY_SCHEMA))
    # the traces are in the table now; how many probes a backend computed ahead (Ray does)
    # varies, so the per-probe files go and finished run dirs are alike
    shutil.rmtree(ctx.path(PROBES_DIR), ignore_errors=True)


STAGE = Stage(
    name="hessian",
    deps=("baseline",),
    params=params,
    run=run,
    outputs=("sensitivity.parquet",),
    summary="per-block top eigenvalue and trace of the Hessian",
)
