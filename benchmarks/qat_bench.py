"""QAT training throughput relative to float training of the same model (target: <= 1.3x).

CIFAR ResNet-20, one SGD step = forward + backward + update on a 32x32 batch. Float and
fake-quant (W4A4, first/last layer W8A8) steps are interleaved repetition by repetition, so
machine noise hits both; prints images/s of each and the median time ratio from one run, by
wall clock and by process CPU time (the CPU-time ratio is the steadier one on a shared machine).

``--amp`` takes one or more autocast modes (``none bf16`` measures float32 and bf16 side by
side in the same repetitions, so their speeds compare too); ``--channels-last`` puts models
and inputs in NHWC memory. Steps run as the training loop runs them (``hawq.precision``:
autocast forward, float32 loss, a GradScaler for fp16, quantizers in float32).

    python benchmarks/qat_bench.py [--batch 128] [--reps 7] [--steps 5] [--threads 2]
        [--amp none bf16] [--channels-last] [--device auto]
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
from hawq.precision import AMP_MODES, Precision, full_precision
from hawq.quant import BitConfig, LayerBits, quantize_


def _batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data:
        d = np.load(args.data)
        x = torch.from_numpy(d["xtr"][: args.batch]).float() / 255.0
        y = torch.from_numpy(d["ytr"][: args.batch]).long()
        return x, y
    g = torch.Generator().manual_seed(0)
    return torch.rand(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,))


class Trainer:
    """One model, its optimizer and precision: ``steps(n)`` runs and times ``n`` SGD steps."""

    def __init__(self, model: torch.nn.Module, precision: Precision, x, y, dev) -> None:
        self.model = precision.model(model.to(dev))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.precision, self.dev = precision, dev
        self.scaler = precision.grad_scaler(dev)
        self.x, self.y = precision.inputs(x, dev), y.to(dev)

    def steps(self, n: int) -> tuple[float, float]:
        sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            with self.precision.autocast(self.dev):
                out = self.model(self.x)
            loss = torch.nn.functional.cross_entropy(full_precision(out), self.y)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.opt.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", nargs="+", choices=AMP_MODES, default=["none"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data", default=None, help="cifar10_subset.npz (default: synthetic)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )  # fmt: skip
    torch.manual_seed(0)
    x, y = _batch(args)
    fp = cifar_resnet(20).train()
    qm = copy.deepcopy(fp)
    bits = BitConfig(
        weight_bits=4, act_bits=4, layers={"conv1": LayerBits(8, 8), "linear": LayerBits(8, 8)}
    )
    quantize_(qm, bits)
    runs: dict[tuple[str, str], Trainer] = {}
    for amp in args.amp:
        precision = Precision(amp=amp, channels_last=args.channels_last)
        try:
            precision.check_device(dev)
        except ValueError as exc:
            p.error(f"--amp {amp}: {exc}")
        for kind, model in (("float", fp), ("qat", qm)):
            runs[(amp, kind)] = Trainer(copy.deepcopy(model), precision, x, y, dev)
    for t in runs.values():  # warm-up
        t.steps(2)
    wall: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(args.reps):
        for k in keys if r % 2 == 0 else keys[::-1]:
            w, c = runs[k].steps(args.steps)
            wall[k].append(w)
            cpu[k].append(c)
    n_img = args.batch * args.steps
    print(
        f"ResNet-20 batch {args.batch}, {dev.type}, {args.threads} threads, {args.reps} reps x "
        f"{args.steps} steps, data={'real' if args.data else 'synthetic'}, "
        f"channels_last={args.channels_last}, torch {torch.__version__}"
    )
    first = args.amp[0]
    for amp in args.amp:
        for name, t in (("wall", wall), ("cpu", cpu)):
            f, q = statistics.median(t[(amp, "float")]), statistics.median(t[(amp, "qat")])
            ratios = [a / b for a, b in zip(t[(amp, "qat")], t[(amp, "float")], strict=True)]
            line = (
                f"amp {amp:>4} {name:>4} clock: float {n_img / f:7.1f} images/s, qat "
                f"{n_img / q:7.1f} images/s, QAT/float time {q / f:.3f}x (per-rep ratios "
                f"{min(ratios):.2f}..{max(ratios):.2f})"
            )
            if amp != first:
                f0, q0 = (statistics.median(t[(first, k)]) for k in ("float", "qat"))
                line += f"; time vs amp {first}: float {f / f0:.3f}x, qat {q / q0:.3f}x"
            print(line)
    print("target: QAT/float <= 1.3x")


if __name__ == "__main__":
    main()
