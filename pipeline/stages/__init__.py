"""The pipeline's stages, in execution (topological) order; each module declares its ``STAGE``.

baseline -> hessian -> allocate -> order -> finetune -> evaluate -> export. Each stage's key
hashes its own settings (``Stage.params``), its upstream keys and the hawq version, so a changed
setting re-runs that stage and everything downstream of it.
"""

from __future__ import annotations

from pipeline.stages import allocate, baseline, evaluate, export, finetune, hessian, order
from pipeline.stages.base import Stage, StageContext

__all__ = ["STAGES", "Stage", "StageContext", "stage_by_name"]

STAGES: tuple[Stage, ...] = tuple(
    m.STAGE for m in (baseline, hessian, allocate, order, finetune, evaluate, export)
)


def stage_by_name(name: str) -> Stage:
    """The stage called ``name`` (``KeyError`` listing the valid names otherwise)."""
    for st in STAGES:
        if st.name == name:
            return st
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
