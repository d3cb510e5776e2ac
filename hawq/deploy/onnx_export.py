"""ONNX QDQ export of a frozen (or fake-quant) model, and running it in onnxruntime.

``export_onnx`` traces the model with torch's TorchScript exporter (``dynamo=False``: the
torch.export-based exporter needs the ``onnxscript`` package and has no hook for our QDQ
symbolics), at opset 17 (per-axis ``DequantizeLinear`` needs 13; onnxruntime's CPU EP and
TensorRT >= 8.6 run 17), with a dynamic batch dimension. Quantized layers become int8 weight
initializers + ``DequantizeLinear`` and input ``[Clip] -> QuantizeLinear -> DequantizeLinear``
(:mod:`hawq.deploy.frozen`); float layers stay plain ``Conv``/``Gemm``. ``metadata`` lands in
the model's ``metadata_props``. Needs the ``onnx`` and ``onnxruntime`` packages (the ``onnx``
extra); they are imported on use only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hawq.deploy.frozen import FROZEN_TYPES
from hawq.deploy.loading import freeze_quantized
from hawq.quant.modules import QUANT_TYPES

log = logging.getLogger(__name__)

__all__ = ["ONNX_OPSET", "compare_onnx", "export_onnx", "onnx_session", "run_onnx"]

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _deployable(model: nn.Module) -> nn.Module:
    if any(isinstance(m, QUANT_TYPES) for m in model.modules()):
        return freeze_quantized(model)
    return model.eval()


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
    opset: int = ONNX_OPSET,
) -> Path:
    """Write ``model`` (frozen, fake-quant or float) as ONNX to ``path`` (atomically).

    The input is named ``input`` (batch dimension ``batch`` dynamic), the output ``logits``.
    Fake-quant models are frozen first (:func:`~hawq.deploy.loading.freeze_quantized`).
    """
    import onnx

    if opset < 13:
        raise ValueError(f"opset must be >= 13 (per-axis DequantizeLinear), got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deploy = _deployable(model).to("cpu")
    n_frozen = sum(isinstance(m, FROZEN_TYPES) for m in deploy.modules())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # deprecation notice; constants traced on purpose
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            torch.onnx.export(
                deploy,
                (example_input.detach().to("cpu"),),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        proto = onnx.load(tmp)
        for key, value in (metadata or {}).items():
            proto.metadata_props.add(key=str(key), value=str(value))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("exported %s (%d quantized layers, opset %d)", path, n_frozen, opset)
    return path


def onnx_session(
    path: str | os.PathLike, *, optimize: bool = True, threads: int | None = None
) -> Any:
    """An onnxruntime CPU ``InferenceSession``: default graph optimisations, or none.

    The default ones fuse ``DQ -> Gemm/Conv -> Q`` into integer kernels (``QGemm``) whose
    requantization rounds differently from float32 QDQ; ``optimize=False`` runs the QDQ graph
    as written (the reference semantics).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Logits of ``x`` from an onnxruntime session, batch by batch (float32, CPU)."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = np.ascontiguousarray(x[i : i + batch_size].detach().cpu().numpy(), dtype=np.float32)
        outs.append(torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: xb})[0]))
    return torch.cat(outs)


@torch.no_grad()
def compare_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    optimize: bool = True,
) -> dict[str, Any]:
    """onnxruntime vs ``model`` (eval mode) on ``x``: argmax agreement, max |logit diff|, logits.

    Returns ``{"agreement", "max_abs_diff", "torch_logits", "onnx_logits"}``.
    """
    model.eval()
    ref = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    got = run_onnx(onnx_session(path, optimize=optimize), x, batch_size=batch_size)
    agree = float((ref.argmax(1) == got.argmax(1)).double().mean())
    diff = float((ref.cpu() - got).abs().max())
    return {"agreement": agree, "max_abs_diff": diff, "torch_logits": ref, "onnx_logits": got}
