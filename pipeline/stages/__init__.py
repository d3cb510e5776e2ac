"""The pipeline's stages, in execution (topological) order.

baseline -> hessian -> allocate -> order -> finetune -> evaluate -> export. Each stage's key
hashes its own settings (``Stage.params``), its upstream keys and the hawq version, so a changed
setting re-runs that stage and everything downstream of it.
"""

from __future__ import annotations

from pipeline.stages import allocate, baseline, final, finetune, hessian
from pipeline.stages.base import Stage, StageContext

__all__ = ["STAGES", "Stage", "StageContext", "stage_by_name"]

STAGES: tuple[Stage, ...] = (
    Stage(
        name="baseline",
        deps=(),
        params=baseline.params,
        run=baseline.run,
        outputs=("model.safetensors", "metrics.parquet"),
        summary="float model: load the checkpoint or train, then evaluate",
    ),
    Stage(
        name="hessian",
        deps=("baseline",),
        params=hessian.params,
        run=hessian.run,
        outputs=("sensitivity.parquet",),
        summary="per-block top eigenvalue and trace of the Hessian",
    ),
    Stage(
        name="allocate",
        deps=("hessian",),
        params=allocate.params,
        run=allocate.run,
        outputs=("bits.parquet", "bit_config.yaml", "summary.parquet"),
        summary="bits per block under the size target (+ Pareto frontier)",
    ),
    Stage(
        name="order",
        deps=("allocate",),
        params=allocate.order_params,
        run=allocate.run_order,
        outputs=("order.parquet",),
        summary="fine-tuning order by Omega",
    ),
    Stage(
        name="finetune",
        deps=("order",),
        params=finetune.params,
        run=finetune.run,
        outputs=("model.safetensors", "epochs.parquet"),
        summary="block-wise quantization-aware fine-tuning",
    ),
    Stage(
        name="evaluate",
        deps=("finetune",),
        params=final.no_params,
        run=final.run_evaluate,
        outputs=("metrics.parquet",),
        summary="accuracy: float, PTQ, per fine-tuning stage, final",
    ),
    Stage(
        name="export",
        deps=("finetune",),
        params=final.no_params,
        run=final.run_export,
        outputs=("model_int.safetensors", "bit_config.yaml", "layers.parquet"),
        summary="integer weights + scales (safetensors), bit config (YAML)",
    ),
)


def stage_by_name(name: str) -> Stage:
    """The stage called ``name`` (``KeyError`` listing the valid names otherwise)."""
    for st in STAGES:
        if st.name == name:
            return st
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
