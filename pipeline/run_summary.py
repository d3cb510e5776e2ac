"""The run in one row: final accuracy (with its 95% interval), size, compression and bits.

Read from the stage files alone (missing stages give nulls). ``execute`` writes it as
``RUN_DIR/summary.parquet`` at the end of every run; ``hawq status --json`` and
``hawq report --json`` print it. Column names are those of the stage files (README glossary).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from hawq import BitConfig
from pipeline.atomic import atomic_write_parquet, read_parquet
from pipeline.config import RunConfig, load_config
from pipeline.store import RunStore

__all__ = [
    "RUN_SUMMARY_SCHEMA",
    "SUMMARY_FILE",
    "json_ready",
    "run_summary",
    "stage_rows",
    "write_run_summary",
]

SUMMARY_FILE = "summary.parquet"
ALLOCATION_KEYS = (
    "size_mb", "float_size_mb", "target_size_mb", "weight_compression", "activation_compression",
    "model_compression", "total_omega", "bops",
)  # fmt: skip
RUN_SUMMARY_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("stages_done", pa.int64()),
        ("stages_total", pa.int64()),
        ("final_acc", pa.float64()),
        ("final_acc_low", pa.float64()),
        ("final_acc_high", pa.float64()),
        ("final_loss", pa.float64()),
        ("float_acc", pa.float64()),
        ("float_loss", pa.float64()),
        ("ptq_acc", pa.float64()),
        ("eval_samples", pa.int64()),
        ("size_mb", pa.float64()),
        ("float_size_mb", pa.float64()),
        ("target_size_mb", pa.float64()),
        ("weight_compression", pa.float64()),
        ("activation_compression", pa.float64()),
        ("model_compression", pa.float64()),
        ("total_omega", pa.float64()),
        ("bops", pa.float64()),
        ("layers", pa.list_(pa.string())),
        ("weight_bits", pa.list_(pa.int64())),
        ("act_bits", pa.list_(pa.int64())),
    ]
)


def stage_rows(store: RunStore, stage: str, name: str) -> list[dict[str, Any]] | None:
    """The rows of ``stages/<stage>/<name>``, or None when the run has not written it yet."""
    path = store.stage_dir(stage) / name
    return read_parquet(path).to_pylist() if path.exists() else None


def run_summary(store: RunStore, cfg: RunConfig | None = None) -> dict[str, Any]:
    """The summary row (``RUN_SUMMARY_SCHEMA`` keys; None for what the run has not made yet);
    ``cfg``: the run's config when the caller has already loaded it."""
    from pipeline.stages import STAGES

    row: dict[str, Any] = dict.fromkeys(RUN_SUMMARY_SCHEMA.names)
    manifest = store.read_manifest()
    if cfg is None and store.config_path.exists():
        cfg = load_config(store.config_path)
    if cfg is not None:  # run.name, not the directory's name
        row["run"] = cfg.run.name
    row["stages_done"] = sum(
        1 for st in STAGES if getattr(manifest.get(st.name), "status", "") == "done"
    )
    row["stages_total"] = len(STAGES)
    summary = stage_rows(store, "allocate", "summary.parquet")
    if summary:
        s = summary[0]
        for key in ALLOCATION_KEYS:
            row[key] = s[key]
    bits = stage_rows(store, "allocate", "bits.parquet")
    config_file = store.stage_dir("allocate") / "bit_config.yaml"
    if bits and config_file.exists():
        bit_config = BitConfig.from_yaml(config_file.read_text())
        layers = [m for r in bits for m in r["modules"]]
        row["layers"] = layers
        row["weight_bits"] = [bit_config.resolve(m).weight for m in layers]
        row["act_bits"] = [bit_config.resolve(m).act for m in layers]
    metrics = stage_rows(store, "evaluate", "metrics.parquet")
    if metrics:
        by_phase = {r["phase"]: r for r in metrics}
        final, fl, ptq = by_phase["final"], by_phase["float"], by_phase["ptq"]
        row.update(
            final_acc=final["eval_acc"], final_acc_low=final["eval_acc_low"],
            final_acc_high=final["eval_acc_high"], final_loss=final["eval_loss"],
            float_acc=fl["eval_acc"], float_loss=fl["eval_loss"], ptq_acc=ptq["eval_acc"],
            eval_samples=final["eval_samples"],
        )  # fmt: skip
    return row


def write_run_summary(store: RunStore, cfg: RunConfig | None = None) -> Path:
    """Write ``RUN_DIR/summary.parquet`` (atomically)."""
    path = store.root / SUMMARY_FILE
    atomic_write_parquet(
        path, pa.Table.from_pylist([run_summary(store, cfg)], schema=RUN_SUMMARY_SCHEMA)
    )
    return path


def json_ready(value: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
