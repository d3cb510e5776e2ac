"""Wall-time projections of the ResNet-50 Hessian analysis and pipeline from measured costs.

Every measured cost is first expressed per sample in *gradient units* (its time divided by
one forward+backward gradient on the same batch), so that the projection on another device
needs one number for that device: its gradient throughput in images/s (measured there, or
assumed). The cost model, on ``D`` devices with ``S`` Hessian samples (``s = S / D`` each)
and room for ``c = min(s, (M - fixed) / per_sample)`` cached samples per device:

* eigenvalues: ``sum_b L_b * (c * hvp_b + (s - c) * rebuild_b)``, with ``L_b`` Lanczos HVPs;
* traces, ``P`` joint probes computed ``K`` per graph build (``hessian.trace_probe_chunk``;
  ``P`` rounded up to whole chunks, ``n = ceil(P / K)`` chunks):
  ``P * s * joint + n * (s - c) * (rebuild_joint - joint)``, i.e. every probe one joint HVP
  backward per sample, every uncached sample's graph rebuilt once per chunk (``K = 1``:
  ``P * (c * joint + (s - c) * rebuild_joint)``, a rebuild per probe);
* graph builds: ``c * build``; an all-reduce per Lanczos HVP and per chunk of probes when
  ``D > 1`` (latency + bytes / bw);
* the pipeline: 1 float epoch, ``stages`` QAT epochs, ``eval_passes`` over the validation
  set, plus the analysis; an input pipeline slower than training caps the training rate.

Data-parallel efficiency ``e(D)`` (measured with ``benchmarks/ddp_scaling.py``) divides the
training and evaluation stages' ideal ``1 / D``; ``None`` means ideal scaling. The analysis
is not divided by it: its data-parallel cost is the all-reduce per HVP modelled above.

Deflated traces (``trace_method: deflated``) need fewer probes for the same precision: the
ratio of joint HVPs (plain / deflated) to the same stderr is not measured on ResNet-50 but on
the pretrained ResNet-20 (``DEFLATED_HVP_RATIO``); the projection divides the plain probe
counts by it. Projecting a probe off the bases (``2 k n`` flops per block) is not counted.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Costs:
    """Measured per-batch seconds (one device) and what the analysis needs."""

    batch: int
    grad: float  # one forward+backward gradient
    hvp: dict[str, float]  # cached HVP per block
    rebuild: dict[str, float]  # uncached HVP per block (graph rebuilt; measured subset)
    build: float  # building one batch's graph w.r.t. every block
    joint: float  # one joint HVP over every block (a Hutchinson probe)
    rebuild_joint: float  # the same with the graph rebuilt
    lanczos: dict[str, int]  # Lanczos HVPs per block (measured subset)
    block_params: dict[str, int]
    per_sample_bytes: float
    fixed_bytes: float
    float_step: float  # one float training step (forward + backward + SGD)
    qat_step: float
    eval_float: float  # one no-grad forward
    eval_qat: float

    def units(self, seconds: float) -> float:
        """Seconds per batch -> gradients per sample (the same ratio per batch or sample)."""
        return seconds / self.grad

    def lanczos_hvps(self, block: str) -> float:
        if block in self.lanczos:
            return float(self.lanczos[block])
        return sum(self.lanczos.values()) / len(self.lanczos)

    def rebuild_of(self, block: str) -> float:
        if block in self.rebuild:
            return self.rebuild[block]
        extra = [self.rebuild[b] - self.hvp[b] for b in self.rebuild]
        return self.hvp[block] + sum(extra) / len(extra)


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where the projection runs: ``devices`` of ``grad_images_per_s`` each."""

    name: str
    devices: int
    grad_images_per_s: float
    graph_memory_bytes: float  # per device, for cached graphs
    allreduce_bytes_per_s: float = 50e9
    allreduce_latency_s: float = 50e-6
    efficiency: float | None = None  # measured data-parallel training efficiency (None: ideal)
    loader_images_per_s: float | None = None  # per device (None: not the bottleneck)


GB = 1e9

DEFLATED_HVP_RATIO = {"trace phase": 5.4, "median block": 5.3}
"""Plain / deflated joint HVPs to a 5% stderr, measured in docs/benchmarks/hessian_bench.md (e)
(pretrained CIFAR ResNet-20, 8 batches of 128, 100 shared probes; the trace phase = its slowest
block, 10,784 -> 1,997; the median block's ratio 5.3x)."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    samples: int = 4096
    trace_probes: int = 200
    probe_chunk: int = 1  # probes per graph build (hessian.trace_probe_chunk)
    train_images: int = 1_281_167
    eval_images: int = 50_000
    qat_stages: int = 5
    eval_float_passes: int = 2
    eval_qat_passes: int = 7


def analysis_seconds(c: Costs, t: Target, w: Workload) -> dict[str, float]:
    """Projected seconds of eigenvalues + traces on ``t`` (per part and total)."""
    s = w.samples / t.devices
    fit = (t.graph_memory_bytes - c.fixed_bytes) / c.per_sample_bytes
    cached = max(0.0, min(s, math.floor(fit / c.batch) * c.batch))
    unc = s - cached
    eig_units = sum(
        c.lanczos_hvps(b) * (cached * c.units(c.hvp[b]) + unc * c.units(c.rebuild_of(b)))
        for b in c.hvp
    )
    chunks = math.ceil(w.trace_probes / w.probe_chunk)
    probes = chunks * w.probe_chunk if w.probe_chunk > 1 else w.trace_probes
    trace_units = probes * s * c.units(c.joint) + chunks * unc * c.units(c.rebuild_joint - c.joint)
    build_units = cached * c.units(c.build)
    out = {
        "cached_fraction": cached / s,
        "eigen": eig_units / t.grad_images_per_s,
        "trace": trace_units / t.grad_images_per_s,
        "build": build_units / t.grad_images_per_s,
        "comm": 0.0,
    }
    if t.devices > 1:
        hvps = sum(c.lanczos_hvps(b) for b in c.hvp)
        eig_bytes = sum(c.lanczos_hvps(b) * c.block_params[b] * 4 for b in c.hvp)
        joint_bytes = probes * sum(c.block_params.values()) * 4
        n = hvps + chunks
        ring = 2 * (t.devices - 1) / t.devices  # ring all-reduce moves 2(D-1)/D of the data
        out["comm"] = n * t.allreduce_latency_s + ring * (eig_bytes + joint_bytes) / (
            t.allreduce_bytes_per_s
        )
    out["total"] = out["eigen"] + out["trace"] + out["build"] + out["comm"]
    return out


def pipeline_seconds(c: Costs, t: Target, w: Workload, analysis: float) -> dict[str, float]:
    """Projected seconds of the pipeline stages (1 epoch per training stage) on ``t``: every
    pass over images runs at the slower of its step and the input pipeline (per device)."""
    eff = 1.0 if t.efficiency is None else t.efficiency

    def epoch(step: float, images: int) -> float:
        rate = t.grad_images_per_s / c.units(step)  # images/s of this step
        if t.loader_images_per_s is not None:
            rate = min(rate, t.loader_images_per_s)
        return images / t.devices / rate / eff

    evals = w.eval_float_passes * epoch(c.eval_float, w.eval_images) + w.eval_qat_passes * epoch(
        c.eval_qat, w.eval_images
    )
    out = {
        "baseline (1 float epoch)": epoch(c.float_step, w.train_images),
        "hessian (eigenvalues + traces)": analysis,
        f"finetune ({w.qat_stages} QAT epochs)": w.qat_stages * epoch(c.qat_step, w.train_images),
        f"evaluation ({w.eval_float_passes + w.eval_qat_passes} passes)": evals,
    }
    out["total"] = sum(out.values())
    return out


def hms(seconds: float) -> str:
    """``1 h 02 min``, ``12.3 min`` or ``45 s``."""
    if seconds >= 3600:
        h, m = divmod(round(seconds / 60), 60)
        return f"{h} h {m:02d} min"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def efficiency_at(scaling: dict | None, devices: int) -> float | None:
    """The measured efficiency of the largest world size <= ``devices`` (None: ideal)."""
    if not scaling or devices == 1:
        return None
    sizes = [n for n in scaling["efficiency"] if n <= devices]
    return scaling["efficiency"][max(sizes)] if sizes else None


def targets_for(args, on_gpu: bool, costs: Costs) -> list[Target]:
    """This machine (measured) and 8 of them, or the GPU (measured on one when ``on_gpu``)."""
    here = args.batch / costs.grad
    gpu = {
        "grad_images_per_s": here if on_gpu else args.gpu_grad_images_per_s,
        "graph_memory_bytes": args.gpu_graph_memory_gb * GB,
    }
    host = {
        "grad_images_per_s": here,
        "graph_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2,
    }
    out = (
        []
        if on_gpu
        else [
            Target(name="this CPU, 1 node (measured)", devices=1, **host),
            Target(
                name="8 such CPU nodes (projected)", devices=8, allreduce_bytes_per_s=10e9, **host
            ),
        ]
    )
    tag = "measured" if on_gpu else "PROJECTED"
    return out + [
        Target(name=f"1 H200-class GPU ({tag})", devices=1, **gpu),
        Target(name="8 GPUs in 1 node (projected)", devices=8, allreduce_bytes_per_s=100e9, **gpu),
        Target(name="8 nodes x 1 GPU (projected)", devices=8, allreduce_bytes_per_s=12e9, **gpu),
    ]


def trace_variants(work: Workload, median_probes: int, chunk: int) -> dict[str, Workload]:
    """The analysis workloads compared in (g): estimator x probes per graph build, at the
    probe cap (``work.trace_probes``) and at 5% on the median block."""
    r = DEFLATED_HVP_RATIO
    at_cap = math.ceil(work.trace_probes / r["trace phase"])
    median = math.ceil(median_probes / r["median block"])
    rep = dataclasses.replace
    return {
        f"plain, {work.trace_probes} probes, 1 per build (before chunking)": rep(
            work, probe_chunk=1
        ),
        f"plain, {work.trace_probes} probes, {chunk} per build": rep(work, probe_chunk=chunk),
        f"**deflated, {at_cap} probes (= plain {work.trace_probes}'s precision), {chunk} per "
        "build**": rep(work, trace_probes=at_cap, probe_chunk=chunk),
        f"5% on the median block: plain, {median_probes} probes, 1 per build": rep(
            work, trace_probes=median_probes, probe_chunk=1
        ),
        f"5% on the median block: deflated, {median} probes, {chunk} per build": rep(
            work, trace_probes=median, probe_chunk=chunk
        ),
    }


def projection_section(args, on_gpu: bool, costs: Costs, probes: dict, emit, hooks) -> None:
    """Section (g) of ``imagenet_scale.py``: the analysis and the pipeline per target.

    ``emit(text)`` / ``emit.table(header, rows)`` write the report; ``hooks`` are the results
    of its data-loading and DDP-scaling sections (``None``: not measured).
    """
    loading, scaling = hooks
    loader = max(loading["images_per_s"].values()) if loading else None
    chunk = args.probe_chunk
    work = Workload(samples=args.samples, trace_probes=probes["cap"], qat_stages=args.qat_stages,
                    probe_chunk=chunk)  # fmt: skip
    to_5 = dataclasses.replace(work, trace_probes=probes["median"])
    variants = trace_variants(work, probes["median"], chunk)
    best = next(k for k in variants if k.startswith("**"))
    emit(
        f"\n## (g) projected wall time: the analysis ({args.samples:,} samples, "
        f"{len(costs.hvp)} blocks: eigenvalues + traces) and the pipeline (1 epoch per stage "
        f"on {work.train_images:,} images)\n"
    )
    emit(f"Shipped trace settings: plain Hutchinson, at most {work.trace_probes} probes, "
         f"{chunk} per graph build (hessian.trace_probe_chunk).\n")  # fmt: skip
    rows, parts, one_gpu, variant_rows = [], [], None, []
    for t in targets_for(args, on_gpu, costs):
        t = dataclasses.replace(
            t, efficiency=efficiency_at(scaling, t.devices), loader_images_per_s=loader
        )
        a = analysis_seconds(costs, t, work)
        pipe = pipeline_seconds(costs, t, work, a["total"])
        parts = [k for k in pipe if not k.startswith("hessian")]
        rows.append(
            [t.name, f"{t.grad_images_per_s:.1f}", f"{a['cached_fraction']:.0%}",
             hms(a["eigen"]), hms(a["trace"]), hms(a["build"] + a["comm"]),
             f"**{hms(a['total'])}**", hms(analysis_seconds(costs, t, to_5)["total"])]
            + [hms(pipe[k]) for k in parts]
        )  # fmt: skip
        totals = {k: analysis_seconds(costs, t, w)["total"] for k, w in variants.items()}
        if "H200" in t.name:
            one_gpu = totals[best]
        variant_rows.append([t.name] + [hms(v) for v in totals.values()])
    emit.table(
        ["where", "gradient images/s", "graphs cached", "eigenvalues",
         f"traces ({work.trace_probes} probes)", "builds + all-reduce",
         f"analysis ({work.trace_probes} probes)",
         f"analysis, traces to 5% on the median block ({to_5.trace_probes} probes)",
         *parts[:-1], f"full pipeline ({work.trace_probes} probes)"],
        rows,
    )  # fmt: skip
    ratio = DEFLATED_HVP_RATIO
    emit(
        "\nThe analysis (eigenvalues + traces) by trace estimator and probes per graph build. "
        f"Deflated probe counts: the plain ones / {ratio['trace phase']} (trace phase) or / "
        f"{ratio['median block']} (median block), the joint-HVP ratios to the same stderr "
        "measured on the pretrained ResNet-20 (docs/benchmarks/hessian_bench.md (e): 8 batches "
        "of 128, 100 shared probes; not measured on ResNet-50). Chunks: probe counts rounded "
        "up to whole chunks.\n"
    )
    emit.table(["where", *variants], variant_rows)
    if one_gpu is not None:
        met = "met" if one_gpu <= 15 * 60 else "NOT met"
        emit(f"\n**Goal: the analysis in <= 15 min on one H200-class GPU: {hms(one_gpu)} "
             f"({'measured' if on_gpu else 'projected'}; {best.strip('*')}: "
             f"hessian.trace_method: deflated, trace_max_probes: "
             f"{variants[best].trace_probes}), {met}.**")  # fmt: skip
    gpu_note = (
        ""
        if on_gpu
        else (
            "GPU rows are PROJECTED, not measured (no GPU in this run): each cost above, in "
            "gradients of this run, times one assumed figure, --gpu-grad-images-per-s="
            f"{args.gpu_grad_images_per_s:g} (ResNet-50 float32/TF32 training on an H200-class "
            f"GPU), with {args.gpu_graph_memory_gb:g} GB per GPU for cached graphs; --device cuda "
            "measures them. "
        )
    )
    emit(
        f"\nEvaluation: 2 float + 7 QAT passes over {work.eval_images:,} images. {gpu_note}"
        "Lanczos and probe counts come from this run's single batch and a random-init network, "
        "not from 4,096 samples of a trained one. All-reduce: ring, 50 us latency per HVP, "
        "10 / 100 / 12 GB/s (CPU network / NVLink / InfiniBand)."
    )
