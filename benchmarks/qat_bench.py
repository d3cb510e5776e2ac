"""QAT training throughput relative to float training of the same model (target: <= 1.3x).

CIFAR ResNet-20, one SGD step = forward + backward + update on a 32x32 batch. Float and
fake-quant (W4A4, first/last layer W8A8) steps are interleaved repetition by repetition, so
machine noise hits both; prints images/s of each and the median time ratio from one run, by
wall clock and by process CPU time (the CPU-time ratio is the steadier one on a shared machine).

    python benchmarks/qat_bench.py [--batch 128] [--reps 7] [--steps 5] [--threads 2]
        [--data ../shared/data/cifar10/cifar10_subset.npz]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from hawq.models.resnet_cifar import cifar_resnet
from hawq.quant import BitConfig, LayerBits, quantize_


def _batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data:
        d = np.load(args.data)
        x = torch.from_numpy(d["xtr"][: args.batch]).float() / 255.0
        y = torch.from_numpy(d["ytr"][: args.batch]).long()
        return x, y
    g = torch.Generator().manual_seed(0)
    return torch.rand(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, x, y, n: int):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="cifar10_subset.npz (default: synthetic)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = _batch(args)
    fp = cifar_resnet(20).train()
    qm = copy.deepcopy(fp)
    bits = BitConfig(
        weight_bits=4, act_bits=4, layers={"conv1": LayerBits(8, 8), "linear": LayerBits(8, 8)}
    )
    quantize_(qm, bits)
    opts = {
        "float": (fp, torch.optim.SGD(fp.parameters(), lr=0.01, momentum=0.9)),
        "qat": (qm, torch.optim.SGD(qm.parameters(), lr=0.01, momentum=0.9)),
    }
    for m, o in opts.values():  # warm-up
        _steps(m, o, x, y, 2)
    wall: dict[str, list[float]] = {"float": [], "qat": []}
    cpu: dict[str, list[float]] = {"float": [], "qat": []}
    for r in range(args.reps):
        order = ("float", "qat") if r % 2 == 0 else ("qat", "float")
        for k in order:
            w, c = _steps(*opts[k], x, y, args.steps)
            wall[k].append(w)
            cpu[k].append(c)
    n_img = args.batch * args.steps
    print(
        f"ResNet-20 batch {args.batch}, {args.threads} threads, {args.reps} reps x "
        f"{args.steps} steps, data={'real' if args.data else 'synthetic'}"
    )
    for name, t in (("wall", wall), ("cpu", cpu)):
        f, q = statistics.median(t["float"]), statistics.median(t["qat"])
        ratios = [a / b for a, b in zip(t["qat"], t["float"], strict=True)]
        print(
            f"{name:>4} clock: float {n_img / f:7.1f} images/s, qat {n_img / q:7.1f} images/s, "
            f"QAT/float time {q / f:.3f}x (per-rep ratios {min(ratios):.2f}..{max(ratios):.2f})"
        )
    print("target: QAT/float <= 1.3x")


if __name__ == "__main__":
    main()
