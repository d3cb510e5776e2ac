"""Weight codes packed at their real bit widths, and the byte count of an exported model.

``pack_codes`` writes each ``b``-bit code as its low ``b`` two's-complement bits, fields
back to back, least significant bit first (``numpy.packbits(bitorder="little")``): ``n`` codes
take ``ceil(n b / 8)`` bytes. ``packed_size_bytes`` adds what else a deployment keeps
(float32 scales, 4 + 4 bytes per activation scale and zero point, float32 for every other
floating-point tensor), counted from the exported tensors, so it can be compared with the
size ``hawq.size.model_size_bytes`` computes from the bit config.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hawq.quant.primitives import FLOAT_BITS, check_bits

__all__ = ["pack_codes", "packed_size_bytes", "unpack_codes"]


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """Integer codes in ``-(2^(b-1)-1)..2^(b-1)-1`` as a ``ceil(numel * b / 8)``-byte stream."""
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        raise ValueError("bits=32 is float: there are no codes to pack")
    qmax = 2 ** (bits - 1) - 1
    c = codes.detach().cpu().reshape(-1).to(torch.int16).numpy()
    if c.size and int(np.abs(c).max()) > qmax:
        raise ValueError(f"codes exceed the {bits}-bit range -{qmax}..{qmax}")
    fields = (c & (2**bits - 1)).astype(np.uint8)
    stream = (fields[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` signed codes (int8)."""
    bits = check_bits("bits", bits)
    stream = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
    fields = (stream.reshape(count, bits).astype(np.int16) << np.arange(bits)).sum(axis=1)
    signed = np.where(fields >= 2 ** (bits - 1), fields - 2**bits, fields)
    return torch.from_numpy(signed.astype(np.int8))


def packed_size_bytes(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of an exported model with its codes packed: ``weights`` (packed codes),
    ``scales`` (float32 weight scales), ``act_qparams`` (8 per quantized input), ``float``
    (other float tensors as float32) and their ``total``."""
    out = {"weights": 0, "scales": 0, "act_qparams": 0, "float": 0}
    for key, t in tensors.items():
        if key.endswith(".weight_int"):
            bits = int(tensors[key.removesuffix("_int") + "_bits"])
            out["weights"] += len(pack_codes(t, bits))
        elif key.endswith(".weight_scale"):
            out["scales"] += 4 * t.numel()
        elif key.endswith(".act_scale"):
            out["act_qparams"] += 8
        elif t.is_floating_point() and not key.endswith(".act_zero_point"):
            out["float"] += 4 * t.numel()
    out["total"] = sum(out.values())
    return out
