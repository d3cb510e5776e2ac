"""Shared by the ONNX export tests: graph probes, the flip-aware last-layer bound, CIFAR-10.

Bound (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5): a K-term dot product
plus bias in float32, summed in any order, is within ``gamma_{K+1} (|W||x| + |b|)`` of the
exact value, ``gamma_n = n u / (1 - n u)``, ``u = 2^-24``. When onnxruntime and PyTorch feed
the last layer ``y = W x + b`` their own quantized inputs ``x_o`` / ``x_t``, per image and
class ``|y_o - y_t| <= |W (x_o - x_t)| + gamma_{K+1} (|W| (|x_t| + |x_o|) + 2 |b|)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from hawq.deploy import onnx_session
from pipeline.config import DataConfig
from pipeline.data import DataBundle, load_data

U = 2.0**-24  # float32 unit roundoff


def last_layer_bound(
    w: torch.Tensor, b: torch.Tensor, xt: torch.Tensor, xo: torch.Tensor
) -> torch.Tensor:
    """Per-image, per-class bound of |logits_onnx - logits_torch| (module docstring), float64."""
    w, b, xt, xo = (t.detach().double() for t in (w, b, xt, xo))
    k = w.shape[1] + 1
    gamma = k * U / (1 - k * U)
    return ((xo - xt) @ w.T).abs() + gamma * ((xt.abs() + xo.abs()) @ w.abs().T + 2 * b.abs())


def probe_session(
    path: Path, outputs: Sequence[str], tmp: Path, *, optimize: bool, threads: int | None = None
) -> Any:
    """An onnxruntime session of the model at ``path`` with ``outputs`` (intermediate tensor
    names) added to the graph outputs, so that ``session.run`` can fetch them."""
    proto = onnx.load(path)
    have = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
            have.add(name)
    probe = tmp / f"probe_{path.stem}.onnx"
    onnx.save(proto, probe)
    return onnx_session(probe, optimize=optimize, threads=threads)


def load_cifar10(npz: Path) -> DataBundle:
    """The shared CIFAR-10 subset (4,660 train / 932 test images), ImageNet-normalised as the
    pretrained CIFAR ResNets expect."""
    cfg = DataConfig(name="cifar10", path=str(npz), hessian_samples=128, normalization="imagenet")
    return load_data(cfg)
