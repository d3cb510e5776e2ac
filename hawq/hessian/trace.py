"""Hutchinson estimates of every block's Hessian trace from shared Rademacher probes.

For a Rademacher vector ``v`` over all blocks (entries +-1, independent), ``E[v_b^T (H v)_b] =
Tr(H_bb)``: the cross terms ``v_b^T H_bc v_c`` have mean zero. One joint HVP per probe thus
gives a sample for every block at once. The estimate of block ``b`` after ``n`` probes is the
sample mean with standard error ``s / sqrt(n)`` (``s`` the sample standard deviation).

``probe_samples`` computes a chunk of probes' samples (one joint HVP each, every batch's
first-order graph built once for the chunk); ``hutchinson`` aggregates samples in probe order,
wherever and in whatever chunks they were computed. A chunk of ``K`` probes may compute up to
``K - 1`` probes that the stopping rule then ignores (HVPs spent, results unchanged).

Determinism: probe ``p`` is a pure function of ``(seed, p)`` (generator seeded with
``derive_seed(seed, "probe", p)``, drawn on the CPU in block order) and samples are consumed in
probe order, so probes computed in parallel elsewhere and fed in order give identical results.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hawq.hessian.operator import HessianOperator
from hawq.seeding import derive_seed
from hawq.validation import check_int, check_number

if TYPE_CHECKING:
    from hawq.hessian.trace_deflated import Deflation

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """Hutchinson estimate ``mean`` of a block trace, its standard error and probe count."""

    mean: float
    stderr: float
    probes: int
    converged: bool


def rademacher_probe(
    dims: Mapping[str, int],
    seed: int,
    probe: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, Tensor]:
    """Probe ``probe``: a +-1 vector per block, in ``dims`` order, seeded by ``derive_seed``."""
    check_int("probe", probe, low=0)
    gen = torch.Generator().manual_seed(derive_seed(seed, "probe", probe))
    out = {}
    for name, n in dims.items():
        if n < 1:
            raise ValueError(f"dims[{name!r}] must be >= 1, got {n}")
        bits = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8)
        out[name] = (2 * bits - 1).to(dtype=dtype, device=device)
    return out


def joint_probe_samples(
    op: HessianOperator, vs: Mapping[str, Tensor], deflation: Deflation | None = None
) -> dict[str, float]:
    """Every block's trace sample from probe ``vs`` and one joint HVP (float64 dot products).

    Plain: ``v_b^T (H v)_b``. Deflated (``hawq.hessian.trace_deflated``):
    ``exact_b + w_b^T (H w)_b`` with ``w = P v``, ``P`` projecting off the block's basis.
    """
    return joint_probe_samples_many(op, [vs], deflation)[0]


def joint_probe_samples_many(
    op: HessianOperator, vss: Sequence[Mapping[str, Tensor]], deflation: Deflation | None = None
) -> list[dict[str, float]]:
    """:func:`joint_probe_samples` of each probe of ``vss``, from one
    :meth:`~hawq.hessian.operator.HessianOperator.hvp_joint_many` (each batch's first-order
    graph built once for all of them)."""
    if deflation is not None:
        vss = [deflation.project(vs) for vs in vss]
    hvs = op.hvp_joint_many(vss)
    exact = deflation.exact if deflation is not None else {}
    return [
        {b: exact.get(b, 0.0) + float(vs[b].double() @ hv[b].double()) for b in vs}
        for vs, hv in zip(vss, hvs, strict=True)
    ]


def probe_samples(
    op: HessianOperator,
    dims: Mapping[str, int],
    seed: int,
    probes: Sequence[int],
    deflation: Deflation | None = None,
) -> list[dict[str, float]]:
    """Hutchinson probes ``probes``' samples ``{block: v_b^T (H v)_b}``, one dict per probe,
    from joint HVPs of ``op`` over the blocks of ``dims`` (name -> size, in block order) that
    share each batch's graph (:func:`joint_probe_samples_many`); see
    :func:`joint_probe_samples` for ``deflation``."""
    vss = [rademacher_probe(dims, seed, p, dtype=op.dtype, device=op.device) for p in probes]
    return joint_probe_samples_many(op, vss, deflation)


def probe_sample(
    op: HessianOperator,
    dims: Mapping[str, int],
    seed: int,
    probe: int,
    deflation: Deflation | None = None,
) -> dict[str, float]:
    """Probe ``probe``'s samples: :func:`probe_samples` of one probe."""
    return probe_samples(op, dims, seed, [probe], deflation)[0]


def probe_chunks(todo: Sequence[int], chunk: int) -> list[list[int]]:
    """``todo`` (probe indices, in order) cut into consecutive runs of ``chunk``."""
    check_int("chunk", chunk, low=1)
    return [list(todo[i : i + chunk]) for i in range(0, len(todo), chunk)]


class _Running:
    """Welford mean/variance in float64 (order-dependent but deterministic)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def stderr(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else math.inf


def hutchinson(
    sample_fn: Callable[[int], Mapping[str, float]],
    blocks: Sequence[str],
    *,
    tol: float = 0.05,
    max_probes: int = 200,
    min_probes: int = 10,
) -> dict[str, TraceResult]:
    """Run probes ``p = 0, 1, ...`` until every block's estimate has frozen.

    ``sample_fn(p)`` returns ``{block: v_b^T (H v)_b}`` for probe ``p``. A block freezes
    (``converged``) once it has ``>= min_probes`` samples and ``stderr <= tol * |mean|``; later
    samples of a frozen block are ignored, so its estimate depends only on its first samples.
    Stops when all blocks froze or after ``max_probes`` probes.
    """
    check_number("tol", tol, low=0, low_open=True)
    check_int("min_probes", min_probes, low=2)
    check_int("max_probes", max_probes, low=min_probes)
    if not blocks or len(set(blocks)) != len(blocks):
        raise ValueError("blocks must be a non-empty sequence of unique names")
    stats = {b: _Running() for b in blocks}
    frozen: dict[str, bool] = dict.fromkeys(blocks, False)
    for p in range(max_probes):
        if all(frozen.values()):
            break
        samples = sample_fn(p)
        for b in blocks:
            if frozen[b]:
                continue
            if b not in samples:
                raise ValueError(f"sample_fn({p}) returned no sample for block {b!r}")
            x = float(samples[b])
            if not math.isfinite(x):
                raise FloatingPointError(f"non-finite Hutchinson sample for block {b!r}, probe {p}")
            st = stats[b]
            st.add(x)
            if st.n >= min_probes and st.stderr <= tol * abs(st.mean):
                frozen[b] = True
                logger.debug("trace of %r froze after %d probes: %.6g", b, st.n, st.mean)
    return {
        b: TraceResult(mean=st.mean, stderr=st.stderr, probes=st.n, converged=frozen[b])
        for b, st in stats.items()
    }
