"""Section (f) of ``hessian_bench.py``: Hutchinson probes in chunks, time per probe vs chunk K.

One ``HessianOperator`` over the batches with a memory budget that caches the first
``cached`` batches' first-order graphs (0: none). The same ``probes`` Rademacher probes are
computed one joint HVP at a time (``K = 1``: every uncached graph rebuilt for every probe) and
``K`` at a time (``hawq.hessian.trace.probe_samples`` -> ``HessianOperator.hvp_joint_many``:
each uncached graph built once per chunk), interleaved chunk by chunk so that a change of load
hits both; the samples must agree bitwise. Reported per mode: HVPs (``hvp_count``), graph
builds (calls of the operator's ``_gradients``, counted by wrapping it) and CPU seconds per
probe (process time with 1 thread, else wall time).

Also measured, on one batch's cached graph: the ``K`` vectors' backward as ``K`` separate
``autograd.grad`` calls with ``retain_graph`` (what the operator does) vs one call with
``is_grads_batched=True`` (vmap over the backward), the alternative the operator could use.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hawq.blocks import Block
from hawq.hessian.operator import HessianOperator
from hawq.hessian.trace import probe_samples
from hawq.precision import exact_float32


def _clock(threads: int) -> Callable[[], float]:
    return time.process_time if threads == 1 else time.perf_counter


def chunk_timing(
    model: torch.nn.Module,
    batches: list,
    blocks: list[Block],
    *,
    chunk: int,
    probes: int,
    cached: int,
    seed: int,
    threads: int,
) -> dict:
    """Per mode (``1`` and ``chunk``): seconds per probe, HVPs and graph builds."""
    if probes % chunk:
        raise SystemExit(f"--chunk-probes {probes} must be a multiple of --chunk {chunk}")
    clock = _clock(threads)
    with HessianOperator(model, F.cross_entropy, batches, blocks) as op:
        graph = op.measure_graph_bytes()
    budget = int(graph * (cached + 0.5))
    out = {"graph_mb": graph / 2**20, "cached": cached, "batches": len(batches)}
    with HessianOperator(model, F.cross_entropy, batches, blocks, memory_budget_bytes=budget) as op:
        dims = {b.name: op.dim(b.name) for b in blocks}
        probe_samples(op, dims, seed, [probes])  # warm-up; builds the cache (not timed)
        assert op.cached_batches == cached, (op.cached_batches, cached)
        builds = [0]
        gradients = op._gradients

        def counted(*args, **kwargs):
            builds[0] += 1
            return gradients(*args, **kwargs)

        op._gradients = counted
        modes = {1: {"seconds": 0.0, "hvps": 0, "builds": 0, "samples": []},
                 chunk: {"seconds": 0.0, "hvps": 0, "builds": 0, "samples": []}}  # fmt: skip
        for start in range(0, probes, chunk):
            ps = list(range(start, start + chunk))
            for k, calls in ((1, [[p] for p in ps]), (chunk, [ps])):
                m = modes[k]
                hvps, b0, t0 = op.hvp_count, builds[0], clock()
                for call in calls:
                    m["samples"] += probe_samples(op, dims, seed, call)
                m["seconds"] += clock() - t0
                m["hvps"] += op.hvp_count - hvps
                m["builds"] += builds[0] - b0
    if modes[1]["samples"] != modes[chunk]["samples"]:
        raise SystemExit("chunked probes gave other samples than single probes")
    for m in modes.values():
        m["per_probe"] = m.pop("seconds") / probes
        del m["samples"]
    out["modes"] = modes
    return out


def batched_backward(model, batch, blocks: list[Block], *, chunk: int, threads: int) -> dict:
    """Seconds of ``chunk`` vectors' backward through one cached graph: a loop of
    ``retain_graph`` calls vs one ``is_grads_batched`` call (median of 3 interleaved)."""
    clock = _clock(threads)
    with HessianOperator(model, F.cross_entropy, [batch], blocks) as op:
        names = [n for b in blocks for n in op._block_params[b.name]]
        grads = op._gradients(0, names)
        leaves = [op._leaves[n] for n in names]
        outs = [grads[n] for n in names]
        gen = torch.Generator().manual_seed(0)
        vs = [[torch.randn(o.shape, generator=gen) for o in outs] for _ in range(chunk)]
        stacked = [torch.stack([v[i] for v in vs]) for i in range(len(outs))]

        def grad(grad_outputs, batched: bool):
            op._lean.wanted = {id(t) for t in leaves}
            with torch.enable_grad(), exact_float32(op.device):
                return torch.autograd.grad(outs, leaves, grad_outputs=grad_outputs,
                                           retain_graph=True, is_grads_batched=batched)  # fmt: skip

        times: dict[str, list[float]] = {"loop": [], "batched": []}
        loop = batched = None
        for _ in range(3):
            t0 = clock()
            loop = [grad(v, False) for v in vs]
            times["loop"].append(clock() - t0)
            t0 = clock()
            batched = grad(stacked, True)
            times["batched"].append(clock() - t0)
        diff = max(
            float((batched[i][k] - loop[k][i]).abs().max() / loop[k][i].abs().max())
            for i in range(len(outs))
            for k in range(chunk)
        )
    return {k: sorted(v)[1] for k, v in times.items()} | {"max_rel_diff": diff}


def chunk_report(timing: dict, backward: dict, chunk: int, batch_size: int, md_table) -> str:
    """Markdown of :func:`chunk_timing` and :func:`batched_backward`."""
    modes = timing["modes"]
    base = modes[1]["per_probe"]
    rows = [
        [str(k), str(m["hvps"]), str(m["builds"]), f"{m['per_probe']:.2f}",
         f"{base / m['per_probe']:.2f}x"]
        for k, m in modes.items()
    ]  # fmt: skip
    n = timing["batches"]
    lines = [
        f"{n} batches of {batch_size}; {timing['cached']} of {n} graphs cached "
        f"({timing['graph_mb']:.0f} MB each); the same probes in both modes, interleaved "
        "chunk by chunk, samples equal bitwise.\n",
        md_table(
            [
                "K (probes per graph build)",
                "HVPs",
                "graph builds",
                "s per probe",
                "speed-up vs K=1",
            ],
            rows,
        ),  # fmt: skip
        f"\n(f) time per probe, K=1 {base:.2f} s vs K={chunk} {modes[chunk]['per_probe']:.2f} s: "
        f"{base / modes[chunk]['per_probe']:.2f}x faster with {modes[chunk]['builds']} instead "
        f"of {modes[1]['builds']} graph builds.",
        f"\nBackward of {chunk} vectors through one cached graph (1 batch): loop of "
        f"retain_graph calls {backward['loop']:.2f} s, one is_grads_batched call "
        f"{backward['batched']:.2f} s ({backward['batched'] / backward['loop']:.2f}x the loop; "
        f"results differ by up to {backward['max_rel_diff']:.1e} relative): the operator "
        "loops.",
    ]
    return "\n".join(lines)
