"""The ``allocation`` section: the bit allocation's method, limits, pins and clipping.

``allocation.to_hawq()`` -> ``hawq.allocate.AllocConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pipeline.config.strict import (
    ConfigError,
    Section,
    check_bits,
    check_number,
    check_positive,
    fail,
)

if TYPE_CHECKING:  # hawq (torch) loads only when the section converts
    from hawq import AllocConfig


@dataclass(frozen=True, kw_only=True)
class AllocationSection(Section):
    """Bit allocation: HAWQ v1 rule or ILP, under a size (MB or compression) / BOPs limit."""

    method: Literal["v1", "ilp"] = "ilp"
    """v1: HAWQ v1's rule (bits non-increasing in S); ilp: minimise total Omega under the limits."""
    sensitivity: Literal["eigenvalue", "trace"] = "trace"
    """S_i = eigenvalue / n_i or trace / n_i (n_i = the block's parameters)."""
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    """Weight bit widths to choose from (2..8)."""
    size_limit_mb: float | None = None
    """Largest weight size in MB (set this or compression)."""
    compression: float | None = None
    """Weight compression vs float32, e.g. 13.0 (set this or size_limit_mb)."""
    bops_limit: float | None = None
    """Largest bit operations per inference, in GBOPs."""
    act_bits: int = 8
    """Activation bits of every quantized layer."""
    pin: dict[str, int] = field(default_factory=dict)
    """Module name -> weight bits fixed before the allocation (e.g. first and last layer)."""
    tie: tuple[tuple[str, ...], ...] = ()
    """Groups of module names that get the same bits."""
    pareto_points: int = 0
    """Points of the size / Omega frontier to record (0 = skip, else >= 2)."""
    input_act_bits: int | None = 8
    """Activation bits of the network input (the first layer's input); null = act_bits."""
    last_act_bits: int | None = 8
    """Activation bits of the last layer's input; null = act_bits."""
    per_channel: bool = True
    """Weight scales per output channel (else per tensor)."""
    percentile: float | None = None
    """Clip |w| at this percentile before quantizing; null = the maximum."""
    mse_clip: bool = False
    """Clip each output channel at its MSE-optimal ratio of max|w| (instead of the maximum)."""
    clip_bits: int | None = None
    """Clip (percentile or MSE) only at weight bits <= this; null = at every width."""
    size_tolerance: float | None = None
    """Also a lower size bound: weight bits >= (1 - this) x the limit's (e.g. 0.02); null = none."""

    def check(self) -> None:
        if not self.candidate_bits:
            fail("candidate_bits", "needs at least one bit width, e.g. [2, 4, 8]")
        for i, b in enumerate(self.candidate_bits):
            if b not in range(2, 9):
                fail(f"candidate_bits[{i}]", f"{b} is outside 2..8")
        if len(set(self.candidate_bits)) != len(self.candidate_bits):
            fail("candidate_bits", f"{list(self.candidate_bits)} repeats a value")
        check_bits("act_bits", self.act_bits)
        for name, b in self.pin.items():
            check_bits(f"pin[{name!r}]", b)
        for i, group in enumerate(self.tie):
            if len(group) < 2:
                fail(f"tie[{i}]", f"{list(group)} must name at least two modules")
        for key in ("size_limit_mb", "compression", "bops_limit"):
            check_positive(key, getattr(self, key))
        if self.pareto_points < 0 or self.pareto_points == 1:
            fail("pareto_points", f"{self.pareto_points} must be 0 (skip) or >= 2")
        if self.size_limit_mb is not None and self.compression is not None:
            fail("compression", "set either allocation.size_limit_mb or allocation.compression")
        if self.compression is not None and self.compression < 1:
            fail("compression", f"{self.compression} must be >= 1 (e.g. 13 for 13x)")
        if self.size_limit_mb is None and self.compression is None and self.bops_limit is None:
            fail("size_limit_mb", "set one of size_limit_mb, compression or bops_limit")
        check_number("percentile", self.percentile, low=0, high=100, low_open=True)
        tol = self.size_tolerance
        check_number("size_tolerance", tol, low=0, high=1, low_open=True, high_open=True)
        if tol is not None and self.size_limit_mb is None and self.compression is None:
            fail("size_tolerance", "needs allocation.size_limit_mb or allocation.compression")
        for key in ("input_act_bits", "last_act_bits"):
            if getattr(self, key) is not None:
                check_bits(key, getattr(self, key))
        if self.clip_bits is not None and self.clip_bits not in range(2, 9):
            fail("clip_bits", f"{self.clip_bits} must be in 2..8 (or null: clip at every width)")
        if self.mse_clip and self.percentile is not None:
            fail("mse_clip", "set either allocation.percentile or allocation.mse_clip, not both")

    def to_hawq(self) -> AllocConfig:
        """The hawq ``AllocConfig`` (``pin`` -> ``pins``, ``tie`` -> ``ties``, GBOPs -> BOPs).

        A rule that only hawq checks (e.g. a pin outside ``candidate_bits``) raises a
        :class:`ConfigError` at ``allocation``.
        """
        from hawq import AllocConfig

        d = self.to_dict()
        d["pins"], d["ties"] = d.pop("pin"), tuple(tuple(g) for g in d.pop("tie"))
        d["candidate_bits"] = tuple(d["candidate_bits"])
        del d["pareto_points"]
        if d["bops_limit"] is not None:
            d["bops_limit"] *= 1e9  # GBOPs -> BOPs
        try:
            return AllocConfig(**d)
        except ValueError as exc:
            raise ConfigError("allocation", str(exc)) from None
