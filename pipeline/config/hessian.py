"""The Hessian stage's sections: what it computes (``hessian``) and where it runs (``backend``).

``hessian.to_hawq()`` -> ``hawq.hessian.table.HessianConfig``; ``backend.to_ray()`` ->
``pipeline.backends.ray.config.RayBackendConfig``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.config.strict import Section, check_positive, check_seed, fail

if TYPE_CHECKING:  # hawq (torch) and the Ray backend config load only when a section converts
    from hawq import HessianConfig
    from pipeline.backends.ray.config import RayBackendConfig

_ADDRESS = re.compile(r"^[A-Za-z0-9_.-]+:(\d+)$")


@dataclass(frozen=True, kw_only=True)
class HessianSection(Section):
    """Per-block curvature: top eigenvalue(s) (Lanczos / power) and Hutchinson trace.

    The fields up to ``memory_budget_mb`` mirror ``hawq.hessian.table.HessianConfig``;
    ``grouping`` / ``patterns`` go to ``hawq.blocks.partition_blocks`` and ``dtype`` to the job.
    """

    method: Literal["lanczos", "power"] = "lanczos"
    """Eigen solver of the top eigenvalue(s) per block."""
    tol: float = 1e-3
    """Relative tolerance of the eigen solver (residual / |eigenvalue|)."""
    max_iter: int = 100
    """Most Hessian-vector products per eigenvalue."""
    top_k: int = 1
    """Eigenvalues per block (the largest in magnitude is the 'eigenvalue' column)."""
    trace: bool = True
    """Estimate each block's Hessian trace with Hutchinson probes."""
    trace_method: Literal["hutchinson", "deflated"] = "hutchinson"
    """Trace estimator: plain Hutchinson, or deflated (Lanczos basis removed first; fewer HVPs)."""
    trace_tol: float = 0.05
    """Stop a block's trace when its standard error <= trace_tol * |trace|."""
    trace_max_probes: int = 200
    """Most Hutchinson probes."""
    trace_min_probes: int = 10
    """Fewest Hutchinson probes before the stopping rule applies (>= 2)."""
    trace_probe_chunk: int = 8
    """Probes per first-order graph build (traces do not depend on it; <= chunk-1 extra probes)."""
    seed: int = 0
    """Seed of the eigen start vectors and the Rademacher probes."""
    memory_budget_mb: float | None = 4096.0
    """Cap on cached first-order graphs; null = cache every batch, 0 = rebuild for each HVP.
    Must hold one batch's graph (checked before any work; ResNet-50 at 224: ~82 MB/sample)."""
    grouping: Literal["layer", "residual", "inverted_residual", "fire"] = "layer"
    """Blocks: each Conv/Linear layer, or each residual / inverted-residual / fire module."""
    patterns: tuple[tuple[str, ...], ...] = ()
    """[regex, block_name] pairs tried before the grouping (modules matching go to block_name)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Precision of the Hessian computation."""

    def check(self) -> None:
        for key in (
            "tol",
            "max_iter",
            "top_k",
            "trace_tol",
            "trace_max_probes",
            "trace_probe_chunk",
        ):
            check_positive(key, getattr(self, key))
        check_seed("seed", self.seed)
        check_positive("memory_budget_mb", self.memory_budget_mb, allow_zero=True)
        if self.trace_min_probes < 2:
            fail("trace_min_probes", f"{self.trace_min_probes} must be >= 2 (a variance needs two)")
        if self.trace_min_probes > self.trace_max_probes:
            fail(
                "trace_min_probes",
                f"{self.trace_min_probes} exceeds hessian.trace_max_probes={self.trace_max_probes}",
            )
        if self.trace_method == "deflated" and self.method != "lanczos":
            fail(
                "trace_method",
                "'deflated' deflates the Lanczos bases: needs hessian.method: lanczos",
            )
        for i, pair in enumerate(self.patterns):
            if len(pair) != 2:
                fail(f"patterns[{i}]", f"{list(pair)} must be [regex, block_name]")
            try:
                re.compile(pair[0])
            except re.error as exc:
                fail(f"patterns[{i}][0]", f"{pair[0]!r} is not a valid regex: {exc}")

    def to_hawq(self) -> HessianConfig:
        """The hawq ``HessianConfig`` of these settings (without the pipeline-side ones)."""
        from hawq import HessianConfig

        d = self.to_dict()
        for key in ("grouping", "patterns", "dtype"):  # pipeline-side settings
            del d[key]
        return HessianConfig(**d)


@dataclass(frozen=True, kw_only=True)
class BackendSection(Section):
    """Where the Hessian stage runs: in-process or on Ray actors (data shards x block groups)."""

    kind: Literal["local", "ray"] = "local"
    """local: in this process; ray: on a grid of Ray actors."""
    address: str | None = None
    """Ray head 'host:port' to join; null starts a private local Ray."""
    data_shards: int | None = None
    """Ray: actors that split the Hessian batches (their HVPs are all-reduced); null: the
    fewest whose per-actor caches hold every batch's graph, as many as the cluster fits."""
    block_groups: int = 1
    """Ray: groups of actors that take different blocks."""
    cpus_per_actor: float = 1.0
    """Ray: CPUs reserved per actor."""
    gpus_per_actor: float = 0.0
    """Ray: GPUs per actor; > 0 runs the HVPs on CUDA. Below 1 (e.g. 0.25: four actors share a
    GPU, for small models) the actors all-reduce with gloo; whole GPUs use nccl."""
    memory_budget_mb: float | None = None
    """Ray: per-actor cap on cached first-order graphs; null = hessian.memory_budget_mb."""

    def check(self) -> None:
        for key in ("data_shards", "block_groups", "cpus_per_actor", "memory_budget_mb"):
            check_positive(key, getattr(self, key))
        check_positive("gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        if self.gpus_per_actor and self.kind != "ray":
            fail("gpus_per_actor", "only applies to backend.kind: ray (local runs on run.device)")
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            fail("gpus_per_actor", f"{self.gpus_per_actor} above 1 must be a whole number")
        if self.address is not None:
            if self.kind != "ray":
                fail("address", "only applies to backend.kind: ray")
            m = _ADDRESS.match(self.address)
            if not m or not 0 < int(m.group(1)) < 65536:
                fail("address", f"{self.address!r} must be 'host:port' (e.g. 10.0.0.1:6379)")

    def to_ray(self) -> RayBackendConfig:
        """The Ray backend's config; a private local Ray gets enough CPUs for the actor grid."""
        from pipeline.backends.ray.config import RayBackendConfig, available_cpus

        need = math.ceil((self.data_shards or 1) * self.block_groups * self.cpus_per_actor)
        return RayBackendConfig(
            address=self.address,
            data_shards=self.data_shards,
            block_groups=self.block_groups,
            cpus_per_actor=self.cpus_per_actor,
            gpus_per_actor=self.gpus_per_actor,
            memory_budget_mb=self.memory_budget_mb,
            num_cpus=None if self.address else max(need, available_cpus()),
        )
