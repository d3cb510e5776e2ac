"""Peak memory of one batch's first-order graph for torchvision ResNet-50 (224x224).

Each measurement runs in a fresh process (``python benchmarks/imagenet_memory.py --child
BATCH MODE``) so that its peak RSS is its own: the model and the batch are set up, the peak
RSS is reset (``/proc/self/clear_refs``), then

* ``cached``: one HVP of the last block through an operator that keeps the graph (``budget
  None``): ``peak - base`` is what one cached graph costs (plus the tiny HVP), ``kept - base``
  what stays resident while it is cached;
* ``rebuild``: one HVP of the first block (``conv1``: the longest backward) with budget 0, the
  path of a batch whose graph is not cached: ``peak - base`` is its transient cost.

Both are compared with ``hawq.hessian.memory.estimate_graph_memory`` (a 1- and 2-sample fit)
and with the operator's own count of the saved tensors. On CUDA the same runs in-process
with ``torch.cuda.max_memory_allocated``. :func:`memory_section` writes section (d) of
``imagenet_scale.py`` from these measurements and their linear fits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hawq.blocks import partition_blocks
from hawq.hessian.memory import MB, estimate_graph_memory
from hawq.hessian.operator import HessianOperator

if TYPE_CHECKING:
    from imagenet_report import Report


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the current resident (or allocated) bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak_and_now(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    return _status("VmHWM"), _status("VmRSS")


def measure(batch: int, mode: str, device: torch.device, threads: int) -> dict:
    """One measurement (see the module doc); returns MB figures."""
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    blocks = partition_blocks(model)
    budget = 2**62 if mode == "cached" else 0
    name = blocks[-1].name if mode == "cached" else blocks[0].name
    base = _reset_peak(device)
    with HessianOperator(
        model, F.cross_entropy, [(x, y)], blocks, memory_budget_bytes=budget
    ) as op:
        op.hvp(name, torch.randn(op.dim(name), device=device))
        peak, now = _peak_and_now(device)
        counted = op.graph_bytes
    estimate = estimate_graph_memory(model, F.cross_entropy, (x, y), blocks)
    return {
        "batch": batch,
        "mode": mode,
        "peak_mb": (peak - base) / MB,
        "kept_mb": (now - base) / MB,
        "counted_mb": counted / MB,
        "estimate_mb": estimate.batch_bytes(batch) / MB,
        "per_sample_mb": estimate.per_sample_bytes / MB,
        "fixed_mb": estimate.fixed_bytes / MB,
    }


def measure_all(batches: list[int], device: torch.device, threads: int) -> list[dict]:
    """Every (batch, mode); CPU runs each in a fresh process, CUDA in this one."""
    out = []
    for batch in batches:
        for mode in ("cached", "rebuild"):
            if device.type == "cuda":
                out.append(measure(batch, mode, device, threads))
                torch.cuda.empty_cache()
                continue
            cmd = [sys.executable, __file__, "--child", str(batch), mode, "--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                out.append({"batch": batch, "mode": mode, "error": tail})
                continue
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def linear_fit(rows: list[dict], key: str) -> tuple[float, float]:
    """Least-squares ``key = a * batch + b`` over the measured rows."""
    xs = [r["batch"] for r in rows if key in r]
    ys = [r[key] for r in rows if key in r]
    if len(xs) < 2:
        return (ys[0] / xs[0], 0.0) if xs else (float("nan"), float("nan"))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    a /= sum((x - mx) ** 2 for x in xs)
    return a, my - a * mx


def memory_section(args, device: torch.device, emit: Report) -> tuple[float, float]:
    """(d): the measured rows and fits; returns the cached fit (bytes per sample, fixed)."""
    rows = measure_all([int(s) for s in args.memory_batches.split(",")], device, args.threads)
    ok = [r for r in rows if "error" not in r]
    unit = "peak RSS" if device.type == "cpu" else "peak CUDA memory"
    emit(f"\n## (d) memory of one batch's graph: {unit} above the set-up, a fresh process each\n")
    emit.table(
        [
            "batch",
            "graph",
            "peak MB",
            "resident while cached MB",
            "saved tensors MB (operator's count)",
            "estimate MB (1+2-sample fit)",
        ],
        [
            [r["batch"], r["mode"], "failed: " + r["error"], "", "", ""]
            if "error" in r
            else [
                r["batch"],
                r["mode"],
                f"{r['peak_mb']:.0f}",
                f"{r['kept_mb']:.0f}" if r["mode"] == "cached" else "-",
                f"{r['counted_mb']:.0f}" if r["mode"] == "cached" else "-",
                f"{r['estimate_mb']:.0f}",
            ]
            for r in rows
        ],
    )
    cols = {"peak MB per cached graph": ("cached", "peak_mb"),
            "resident MB per cached graph": ("cached", "kept_mb"),
            "peak MB per rebuild": ("rebuild", "peak_mb")}  # fmt: skip
    fits = {c: linear_fit([r for r in ok if r["mode"] == m], k) for c, (m, k) in cols.items()}
    emit("\nPer batch size (batch sizes not run here are PROJECTED from the linear fit):\n")
    cells = []
    for size in (32, 64, 128):
        row = [size]
        for c, (m, k) in cols.items():
            got = [r[k] for r in ok if r["batch"] == size and r["mode"] == m]
            a, b = fits[c]
            row.append(f"{got[0]:.0f} (measured)" if got else f"~{a * size + b:.0f} (projected)")
        cells.append(row)
    emit.table(["batch", *cols], cells)
    for c, (a, b) in fits.items():
        emit(f"- fit, {c}: {a:.1f} MB per sample + {b:.0f} MB")
    if ok:
        emit(
            f"- `estimate_graph_memory` (1+2 samples): {ok[0]['per_sample_mb']:.1f} MB per sample "
            f"+ {ok[0]['fixed_mb']:.0f} MB of gradients (the operator's accounting, which the "
            "budget check uses; the projection (g) uses the resident fit)"
        )
    a, b = fits["resident MB per cached graph"]
    return a * 2**20, b * 2**20


def main() -> None:
    p = argparse.ArgumentParser(description="one memory measurement (run by imagenet_scale.py)")
    p.add_argument("--child", nargs=2, metavar=("BATCH", "MODE"), required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    batch, mode = int(args.child[0]), args.child[1]
    print(json.dumps(measure(batch, mode, torch.device("cpu"), args.threads)))


if __name__ == "__main__":
    main()
