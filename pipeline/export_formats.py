"""Deployable formats of a finished run: ``hawq export RUN_DIR --format {safetensors,onnx}``.

``safetensors`` is the export stage's own output (integer codes + scales, bit config, per-layer
table). ``onnx`` rebuilds the evaluated model from those files (:func:`load_quantized_run`,
``hawq.deploy.load_quantized``) and writes ``model.onnx`` (QDQ, opset 17, dynamic batch; its
metadata holds the bit config and the run's stage keys) and ``sizes.json``: the weights packed
at their real bit widths against the ``size_mb`` the evaluate stage computed, and the ONNX
file size. Export needs a finished run: the unfinished stages are named, ``--finish`` runs them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hawq
from hawq.deploy import compare_onnx, export_onnx, load_quantized, packed_size_bytes, read_exported
from hawq.quant.bitconfig import BitConfig
from hawq.size import MB
from pipeline.atomic import StoreError, atomic_write_json, read_parquet
from pipeline.models import model_factory
from pipeline.scheduler import load_run_config, status
from pipeline.store import RunStore

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ONNX_FORMAT",
    "ExportError",
    "check_format",
    "export_run_onnx",
    "load_quantized_run",
    "unfinished_stages",
]

FORMATS = ("safetensors", "onnx")
ONNX_FORMAT = "hawq.onnx/1"
DEPLOY_DIR = "deploy"
ONNX_CHECK_SAMPLES = 2048  # --check on streamed data: the first evaluation images


class ExportError(ValueError):
    """Bad export request (unknown format, unfinished run): names the problem and the fix."""


def check_format(fmt: str) -> str:
    """``fmt`` if it is a supported format, else ``ExportError`` listing the supported ones."""
    if fmt not in FORMATS:
        raise ExportError(
            f"--format {fmt!r} is not supported. Fix: use one of {', '.join(FORMATS)}."
        )
    return fmt


def unfinished_stages(run_dir: str | os.PathLike) -> list[str]:
    """``"stage (state)"`` for every stage of the run that is not done with its current key."""
    rows, _ = status(run_dir)
    return [f"{r.stage} ({r.state})" for r in rows if r.state != "done"]


def require_finished(run_dir: str | os.PathLike) -> None:
    """``ExportError`` naming the unfinished stages, if any."""
    missing = unfinished_stages(run_dir)
    if missing:
        raise ExportError(
            f"run {run_dir} is unfinished: {', '.join(missing)} not done. Fix: run "
            f"`hawq resume {run_dir}` first, or pass --finish to run the missing stages."
        )


def _export_files(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], BitConfig]:
    stage = RunStore(Path(run_dir)).stage_dir("export")
    tensors, _ = read_exported(stage / "model_int.safetensors")
    return tensors, BitConfig.load(stage / "bit_config.yaml")


def load_quantized_run(run_dir: str | os.PathLike) -> nn.Module:
    """The model the evaluate stage evaluated, rebuilt from the run's exported files (CPU)."""
    require_finished(run_dir)
    cfg = load_run_config(run_dir)
    tensors, bit_config = _export_files(run_dir)
    return load_quantized(model_factory(cfg.model)(), tensors, bit_config)


def _example_input(run_dir: str | os.PathLike) -> torch.Tensor:
    from pipeline.data import load_data

    cfg = load_run_config(run_dir)
    shape = cfg.data.shape()
    if shape is not None:
        channels, side, _ = shape
        return torch.zeros(1, channels, side, side)
    return load_data(cfg.data).example(1).float()


def _final_size_mb(run_dir: str | os.PathLike) -> float:
    path = RunStore(Path(run_dir)).stage_dir("evaluate") / "metrics.parquet"
    rows = read_parquet(path).to_pylist()
    final = [r for r in rows if r["phase"] == "final"]
    if not final:
        raise StoreError(f"{path} has no 'final' row. Fix: run `hawq resume {run_dir} --repair`.")
    return float(final[-1]["size_mb"])


def export_run_onnx(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, check: bool = False
) -> dict[str, Any]:
    """Write ``model.onnx`` and ``sizes.json`` to ``out_dir`` (default ``RUN_DIR/deploy``).

    Returns the sizes (bytes and MB) and, with ``check``, onnxruntime's argmax agreement and
    max |logit difference| against the rebuilt PyTorch model on the run's evaluation split.
    """
    model = load_quantized_run(run_dir)
    tensors, bit_config = _export_files(run_dir)
    manifest = RunStore(Path(run_dir)).read_manifest()
    meta = {
        "hawq.format": ONNX_FORMAT,
        "hawq.version": hawq.__version__,
        "hawq.bit_config": json.dumps(bit_config.to_dict()),
        "hawq.stage_keys": json.dumps({s: row.key for s, row in manifest.items()}),
    }
    dest = Path(out_dir) if out_dir is not None else Path(run_dir) / DEPLOY_DIR
    onnx_path = export_onnx(model, _example_input(run_dir), dest / "model.onnx", metadata=meta)
    packed = packed_size_bytes(tensors)
    sizes: dict[str, Any] = {
        "onnx_path": str(onnx_path),
        "onnx_bytes": onnx_path.stat().st_size,
        "packed_bytes": packed,
        "packed_mb": packed["total"] / MB,
        "computed_size_mb": _final_size_mb(run_dir),
    }
    if check:
        from pipeline.data import DataBundle, load_data

        data = load_data(load_run_config(run_dir).data)
        # in-RAM data: the whole evaluation set; streamed: its first ONNX_CHECK_SAMPLES
        eval_x = (
            data.eval_x
            if isinstance(data, DataBundle)
            else data.example(min(data.n_eval, ONNX_CHECK_SAMPLES))
        )
        cmp = compare_onnx(model, onnx_path, eval_x)
        sizes.update(agreement=cmp["agreement"], max_abs_logit_diff=cmp["max_abs_diff"])
    atomic_write_json(dest / "sizes.json", sizes)
    return sizes


def print_onnx_export(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None, *, check: bool
) -> dict[str, Any]:
    """:func:`export_run_onnx`, then the sizes (and the check) as a terminal table."""
    from pipeline.report import format_table

    sizes = export_run_onnx(run_dir, out_dir, check=check)
    packed = sizes["packed_bytes"]
    rows = [
        ["weights packed at their bit widths", packed["weights"], packed["weights"] / MB],
        ["total packed (+ scales, act qparams, floats)", packed["total"], sizes["packed_mb"]],
        ["computed size_mb (evaluate stage)", "", sizes["computed_size_mb"]],
        ["ONNX file (int8 containers)", sizes["onnx_bytes"], sizes["onnx_bytes"] / MB],
    ]
    print(format_table("Deployable sizes", ["what", "bytes", "MB"], rows))
    if check:
        print(
            f"\nonnxruntime vs PyTorch on the evaluation split: argmax agreement "
            f"{sizes['agreement']:.4%}, max |logit diff| {sizes['max_abs_logit_diff']:.3g}"
        )
    print(f"\n{sizes['onnx_path']}")
    return sizes
