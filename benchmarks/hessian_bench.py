"""Per-block Hessian eigenvalues of a pretrained CIFAR ResNet-20: hawq against PyHessian 0.1.

Usage (from the repository root)::

    .venv/bin/python benchmarks/hessian_bench.py --data ../shared/data/cifar10 --out bench.md

Prints, from one run on real CIFAR-10 training images (``cifar10_subset.npz``):

(a) per block, the time of one block HVP (``hawq.hessian.operator.HessianOperator``, cached graph)
    relative to one forward+backward gradient of the whole model on the same batch:
    steady state, and amortised with the block's graph build spread over its Lanczos HVPs;
(b) time to every block's top eigenvalue at ``--tol`` with one batch: hawq power iteration,
    hawq Lanczos and PyHessian (single-batch mode, restricted to the block by turning
    ``requires_grad`` off elsewhere: PyHessian collects exactly the parameters requiring
    grad), eigenvalues side by side with their error against a converged reference
    (hawq Lanczos at tol 1e-8);
(c) the same with ``--batches`` batches (PyHessian's dataloader mode);
(d) HVPs per block used by each method;
(e) traces: HVPs until each block's Hutchinson stderr is <= 5%, plain vs deflated
    (``hawq.hessian.trace_deflated``), from the per-probe variances of both on the same
    ``--trace-probes`` probes, with ``--trace-batches`` batches (section code in
    ``hessian_trace.py``; ``--only-trace`` runs just this section);
(g) ``--cores N`` runs only this: (c)'s work with each tool's own parallelism on N cores,
    PyHessian at 1 and N threads, hawq Lanczos in 1 process and on N Ray actors (data
    shards), side by side (section code in ``hessian_cores.py``).
(h) Hutchinson probes in chunks: time per probe with each uncached batch's graph rebuilt per
    probe (K=1) vs once per chunk of ``--chunk`` probes, ``--chunk-batches`` batches of which
    ``--chunk-cached`` keep their graph (section code in ``hessian_chunk.py``; ``--only-chunk``
    runs just this section).

The CPU timings are wall-clock on whatever else runs on the machine; compare the ratios
from one run. ``--skip-pyhessian``, ``--skip-multi``, ``--blocks N`` give quick runs.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hawq.blocks import Block, partition_blocks
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, block_eigen_row
from hawq.models import cifar_resnet, load_cifar_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from hessian_chunk import batched_backward, chunk_report, chunk_timing  # noqa: E402
from hessian_cores import cores_section  # noqa: E402
from hessian_tables import eigen_table, hvp_table, md_table, rel, summary  # noqa: E402
from hessian_trace import trace_hvps, trace_report  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_batches(
    data: Path, n_batches: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    arrays = np.load(data / "cifar10_subset.npz")
    n = n_batches * batch_size
    if n > len(arrays["xtr"]):
        raise SystemExit(f"need {n} training images, {data} has {len(arrays['xtr'])}")
    x = torch.from_numpy(arrays["xtr"][:n]).float().div_(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(arrays["ytr"][:n]).long()
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def load_model(data: Path) -> torch.nn.Module:
    path = next(iter(sorted(data.glob("resnet20-*.th"))), None)
    if path is None:
        raise SystemExit(f"no resnet20-*.th checkpoint in {data}")
    return load_cifar_checkpoint(cifar_resnet(20), path).eval()


# ----------------------------------------------------------------------------- hawq
class HawqRunner:
    """Block eigen rows from one operator; its total time includes opening and graph builds."""

    def __init__(self, model, batches, blocks: list[Block], config: HessianConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.op = HessianOperator(
            model, F.cross_entropy, batches, blocks, memory_budget_bytes=config.memory_budget_bytes
        )
        self.rows: dict[str, dict] = {}
        self.seconds = time.perf_counter() - t0
        self.graph_mb = 0.0

    def run(self, block: Block) -> None:
        t0 = time.perf_counter()
        self.rows[block.name] = block_eigen_row(self.op, block, self.config)
        self.seconds += time.perf_counter() - t0
        self.graph_mb = max(self.graph_mb, self.op.graph_bytes / 2**20)

    def close(self) -> None:
        self.op.close()


# ------------------------------------------------------------------------ PyHessian
class PyHessianRunner:
    """PyHessian 0.1 top eigenvalue of one block (parameters outside it frozen)."""

    def __init__(self, model, batches, tol: float, seed: int) -> None:
        self.model, self.batches, self.tol, self.seed = model, batches, tol, seed
        self.module = importlib.import_module("pyhessian.hessian")  # the package shadows it
        self.rows: dict[str, dict] = {}
        self.seconds = 0.0

    def run(self, block: Block) -> None:
        ph, model = self.module, self.model
        count = {"n": 0}
        hvp = ph.hessian_vector_product

        def counting_hvp(*args, **kwargs):
            count["n"] += 1
            return hvp(*args, **kwargs)

        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        t0 = time.perf_counter()
        ph.hessian_vector_product = counting_hvp
        try:
            keep = set(block.param_names)
            for n, p in model.named_parameters():
                p.requires_grad_(n in keep)
            torch.manual_seed(self.seed)
            if len(self.batches) == 1:
                h = ph.hessian(model, F.cross_entropy, data=self.batches[0], cuda=False)
            else:
                h = ph.hessian(model, F.cross_entropy, dataloader=self.batches, cuda=False)
                inner = h.dataloader_hv_product

                def counted(v):
                    count["n"] += 1
                    return inner(v)

                h.dataloader_hv_product = counted
            eigs, _ = h.eigenvalues(maxIter=100, tol=self.tol, top_n=1)
            del h
            model.zero_grad(set_to_none=True)  # PyHessian leaves create_graph grads behind
        finally:
            ph.hessian_vector_product = hvp
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.rows[block.name] = {
            "eigenvalue": float(eigs[0]),
            "hvps": count["n"],
            "seconds": seconds,
        }

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------ (a)
def median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hvp_vs_grad(model, batch, blocks: list[Block], lanczos_hvps: dict, reps: int):
    """Per block: median HVP and gradient times (interleaved), and the one graph build."""
    x, y = batch

    def grad() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    grad()
    total_k = max(1, sum(lanczos_hvps.get(b.name, 1) for b in blocks))
    out = []
    with HessianOperator(model, F.cross_entropy, [batch], blocks) as op:
        vs = {
            b.name: torch.randn(b.n_params, generator=torch.Generator().manual_seed(0))
            for b in blocks
        }
        t0 = time.perf_counter()
        op.hvp(blocks[0].name, vs[blocks[0].name])  # builds the graph every block shares
        first = time.perf_counter() - t0
        build = None
        for b in blocks:
            t_grad, t_hvp = [], []
            for _ in range(reps):  # interleaved, so that load changes hit both sides alike
                t_grad.append(median_time(grad, 1))
                t_hvp.append(median_time(lambda name=b.name: op.hvp(name, vs[name]), 1))
            g, h = statistics.median(t_grad), statistics.median(t_hvp)
            if build is None:
                build = max(first - h, 0.0)
            out.append(
                {"block": b.name, "grad_ms": 1e3 * g, "hvp_ms": 1e3 * h, "steady": h / g,
                 "amortised": (build / total_k + h) / g}
            )  # fmt: skip
    model.zero_grad(set_to_none=True)
    return out, build, total_k


def eigen_setting(model, batches, blocks, args) -> dict:
    """Reference first; then power, Lanczos and PyHessian interleaved block by block, so that
    load changes on the shared machine hit every method alike."""
    base = dict(tol=args.tol, max_iter=100, trace=False, seed=args.seed)
    ref = HawqRunner(model, batches, blocks, HessianConfig(**{**base, "tol": 1e-8}))
    for b in blocks:
        ref.run(b)
    ref.close()
    out = {
        "ref": ref,
        "power": HawqRunner(model, batches, blocks, HessianConfig(method="power", **base)),
        "lanczos": HawqRunner(model, batches, blocks, HessianConfig(**base)),
        "pyhessian": None,
    }
    if not args.skip_pyhessian:
        out["pyhessian"] = PyHessianRunner(model, batches, args.tol, args.seed)
    runners = [r for k, r in out.items() if k != "ref" and r is not None]
    for b in blocks:
        for r in runners:
            r.run(b)
    for r in runners:
        r.close()
    return {k: None if r is None else vars_of(r) for k, r in out.items()}


def vars_of(runner) -> dict:
    return {
        "rows": runner.rows,
        "seconds": runner.seconds,
        "graph_mb": getattr(runner, "graph_mb", 0.0),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", type=Path, required=True, help="folder with the npz and resnet20-*.th"
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="batches for (c)")
    ap.add_argument("--blocks", type=int, default=0, help="use N evenly spaced blocks (0: all)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions in (a)")
    ap.add_argument("--skip-pyhessian", action="store_true")
    ap.add_argument("--skip-multi", action="store_true", help="skip (c)")
    ap.add_argument("--trace-batches", type=int, default=8, help="batches for (e)")
    ap.add_argument("--trace-probes", type=int, default=100, help="shared probes measured in (e)")
    ap.add_argument("--skip-trace", action="store_true", help="skip (e)")
    ap.add_argument("--only-trace", action="store_true", help="run (e) only")
    ap.add_argument("--chunk", type=int, default=8, help="probes per graph build in (h)")
    ap.add_argument("--chunk-probes", type=int, default=16, help="probes timed per mode in (h)")
    ap.add_argument("--chunk-batches", type=int, default=8, help="batches for (f)")
    ap.add_argument("--chunk-cached", type=int, default=0, help="cached graphs in (h)")
    ap.add_argument("--skip-chunk", action="store_true", help="skip (h)")
    ap.add_argument("--only-chunk", action="store_true", help="run (h) only")
    ap.add_argument("--cores", type=int, default=0, help="run only (g) on N cores (0: off)")
    ap.add_argument("--out", type=Path, help="also write the tables as markdown here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.data)
    n_batches = max(args.batches, args.trace_batches, args.chunk_batches, 1)
    batches = load_batches(args.data, n_batches, args.batch_size)
    blocks = partition_blocks(model)
    if args.blocks:
        idx = sorted({round(i) for i in np.linspace(0, len(blocks) - 1, args.blocks)})
        blocks = [blocks[i] for i in idx]
    report = [
        f"# hawq Hessian benchmark: CIFAR ResNet-20 (pretrained), {len(blocks)} blocks",
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, "
        f"tol {args.tol}, seed {args.seed}, real CIFAR-10 training images",
    ]

    def emit(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    emit("\n".join(report))
    if args.cores:
        few = batches[: args.batches]
        runners = {
            "hawq": lambda config: HawqRunner(model, few, blocks, config),
            "pyhessian": lambda: PyHessianRunner(model, few, args.tol, args.seed),
        }
        cores_section(model, few, blocks, args, runners, emit, md_table, rel)
        finish(report, args.out)
        return
    if not args.skip_chunk:
        timing = chunk_timing(model, batches[: args.chunk_batches], blocks, chunk=args.chunk,
                              probes=args.chunk_probes, cached=args.chunk_cached,
                              seed=args.seed, threads=args.threads)  # fmt: skip
        backward = batched_backward(model, batches[0], blocks, chunk=args.chunk,
                                    threads=args.threads)  # fmt: skip
        emit(f"\n## (h) Hutchinson probes per graph build, K=1 vs K={args.chunk}\n")
        emit(chunk_report(timing, backward, args.chunk, args.batch_size, md_table))
    if args.only_chunk:
        finish(report, args.out)
        return
    if not args.skip_trace:
        out = trace_hvps(model, batches[: args.trace_batches], blocks, tol=args.tol,
                         seed=args.seed, probes=args.trace_probes)  # fmt: skip
        emit(f"\n## (e) Hutchinson traces to 5% stderr, plain vs deflated, {args.trace_batches} x "
             f"{args.batch_size} samples\n")  # fmt: skip
        emit(trace_report(blocks, out, md_table))
    if args.only_trace:
        finish(report, args.out)
        return
    single = eigen_setting(model, batches[:1], blocks, args)
    emit("\n## (b) top eigenvalue per block, 1 batch\n")
    table, errs = eigen_table(blocks, single["ref"], single["power"], single["lanczos"],
                              single["pyhessian"])  # fmt: skip
    emit(table + "\n\n" + summary("(b) 1 batch", single["ref"], single["power"],
                                  single["lanczos"], single["pyhessian"], errs))  # fmt: skip

    multi = None
    if not args.skip_multi:
        multi = eigen_setting(model, batches, blocks, args)
        emit(f"\n## (c) top eigenvalue per block, {len(batches)} batches\n")
        table, errs = eigen_table(blocks, multi["ref"], multi["power"], multi["lanczos"],
                                  multi["pyhessian"])  # fmt: skip
        emit(table + "\n\n" + summary(f"(c) {len(batches)} batches", multi["ref"], multi["power"],
                                      multi["lanczos"], multi["pyhessian"], errs))  # fmt: skip

    emit("\n## (d) HVPs per block\n")
    runs = {"1 batch": single}
    if multi is not None:
        runs[f"{len(batches)} batches"] = multi
    emit(hvp_table(blocks, runs))

    k = {name: r["hvps"] for name, r in single["lanczos"]["rows"].items()}
    rows, build, total_k = hvp_vs_grad(model, batches[0], blocks, k, args.reps)
    emit("\n## (a) block HVP time / gradient time, 1 batch (target <= 1.5)\n")
    emit(f"One first-order graph serves every block: built once in {1e3 * build:.0f} ms, "
         f"amortised over the {total_k} Lanczos HVPs of (b).\n")  # fmt: skip
    emit(md_table(
        ["block", "grad ms", "HVP ms", "HVP / grad", "amortised (HVP + build/HVPs) / grad"],
        [[r["block"], f"{r['grad_ms']:.1f}", f"{r['hvp_ms']:.1f}", f"{r['steady']:.2f}",
          f"{r['amortised']:.2f}"] for r in rows],
    ))  # fmt: skip
    worst = max(rows, key=lambda r: r["amortised"])
    emit(f"\nworst amortised ratio {worst['amortised']:.2f} ({worst['block']}); "
         f"worst steady ratio {max(r['steady'] for r in rows):.2f}")  # fmt: skip
    finish(report, args.out)


def finish(report: list[str], out: Path | None) -> None:
    if out:
        out.write_text("\n".join(report) + "\n")
        print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
