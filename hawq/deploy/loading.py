"""From a fake-quant model to its exported tensors and back: ``integer_state_dict``,
``load_quantized``, ``freeze_quantized``.

The exported tensors (``model_int.safetensors`` of the pipeline's export stage) hold, per
quantized layer ``fqn``: ``fqn.weight_int`` (int8 codes), ``fqn.weight_scale``,
``fqn.weight_bits``, ``fqn.act_scale``, ``fqn.act_zero_point``, ``fqn.act_bits``
(``hawq.quant.modules.export_integer``), and every other floating-point tensor of the state
dict (biases, BatchNorm, float weights). ``load_quantized`` puts them into a float model of the
same architecture, replacing each quantized Conv2d/Linear by a
:class:`~hawq.deploy.frozen.FrozenConv2d`/``FrozenLinear``: the result computes exactly what
the fake-quant model computed in eval mode.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping

import torch
from torch import nn

from hawq.deploy.frozen import FrozenConv2d, FrozenLinear
from hawq.quant.bitconfig import BitConfig
from hawq.quant.modules import QUANT_TYPES, bit_config_of, export_integer, quantized_modules
from hawq.quant.primitives import FLOAT_BITS

log = logging.getLogger(__name__)

__all__ = ["freeze_quantized", "integer_state_dict", "load_quantized", "read_exported"]

_QUANT_KEYS = (
    "weight_int",
    "weight_scale",
    "weight_bits",
    "act_scale",
    "act_zero_point",
    "act_bits",
)


@torch.no_grad()
def integer_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``export_integer(model)`` plus every other floating-point tensor (float32) of the state
    dict; the quantized layers' float weights and activation-range buffers are left out."""
    out = export_integer(model)
    skip = {f"{n}.weight" for n in quantized_modules(model) if f"{n}.weight_int" in out}
    for name, t in model.state_dict().items():
        if name in skip or ".input_quant." in name or not t.is_floating_point():
            continue
        out[name] = t.detach().float()
    return out


def read_exported(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], BitConfig | None]:
    """Tensors of an exported safetensors file and the bit config in its metadata (if any)."""
    from safetensors import safe_open  # only when reading files: the library imports without it

    with safe_open(os.fspath(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata() or {}
    bc = BitConfig.from_dict(json.loads(meta["bit_config"])) if "bit_config" in meta else None
    return tensors, bc


def _layer_keys(tensors: Mapping[str, torch.Tensor], fqn: str) -> dict[str, torch.Tensor]:
    return {k: tensors[f"{fqn}.{k}"] for k in _QUANT_KEYS if f"{fqn}.{k}" in tensors}


def _check_bits(fqn: str, own: dict[str, torch.Tensor], bit_config: BitConfig | None) -> None:
    if bit_config is None:
        return
    want = bit_config.resolve(fqn)
    got_w = int(own["weight_bits"]) if "weight_int" in own else FLOAT_BITS
    got_a = int(own["act_bits"]) if "act_scale" in own else None
    if got_w != want.weight or (got_a is not None and got_a != want.act):
        raise ValueError(
            f"layer {fqn}: the tensors hold w{got_w}/a{got_a} but the bit config says "
            f"w{want.weight}/a{want.act}. Fix: pass the bit_config.yaml exported with the tensors."
        )


def load_quantized(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor] | str | os.PathLike,
    bit_config: BitConfig | None = None,
) -> nn.Module:
    """Rebuild the fake-quant model from exported tensors, in place; return it in eval mode.

    ``model``: the float architecture (any weights; plain or already fake-quant layers).
    ``tensors``: the exported mapping or its safetensors path. ``bit_config``: checked against
    the bits stored with every layer (default: the bit config in the file's metadata).
    Every Conv2d/Linear with exported codes or activation qparams becomes a frozen layer;
    every float tensor of the result must be in ``tensors`` and nothing may be left over.
    Raises ``ValueError`` naming the layer or the keys otherwise.
    """
    if not isinstance(tensors, Mapping):
        tensors, meta_config = read_exported(tensors)
        bit_config = bit_config if bit_config is not None else meta_config
    layers = [
        (n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, *QUANT_TYPES)
    ]
    for fqn, m in layers:
        own = _layer_keys(tensors, fqn)
        if not own and not isinstance(m, QUANT_TYPES):
            continue
        _check_bits(fqn, own, bit_config)
        cls = FrozenConv2d if isinstance(m, nn.Conv2d) else FrozenLinear
        try:
            frozen = cls(m, own)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"layer {fqn}: {exc}") from None
        if fqn == "":
            raise ValueError("load_quantized needs a container: the model is a Conv2d/Linear")
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent), child, frozen.to(m.weight.device))
    state = model.state_dict()
    unexpected = sorted(set(tensors) - set(state))
    missing = sorted(k for k, t in state.items() if k not in tensors and t.is_floating_point())
    if unexpected or missing:
        raise ValueError(
            f"exported tensors do not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Fix: pass the architecture the tensors were exported from."
        )
    with torch.no_grad():
        for k, t in tensors.items():
            if state[k].shape != t.shape:
                raise ValueError(
                    f"{k}: shape {tuple(t.shape)}, the model has {tuple(state[k].shape)}"
                )
            state[k].copy_(t)
    return model.eval()


def freeze_quantized(model: nn.Module) -> nn.Module:
    """A frozen copy of a fake-quant model (eval mode): same outputs, integer weights."""
    return load_quantized(copy.deepcopy(model), integer_state_dict(model), bit_config_of(model))
