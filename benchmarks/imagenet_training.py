"""Section (e) of ``imagenet_scale.py``: one training step, QAT (W4A8, conv1/fc W8A8) vs float,
and the evaluation forwards, timed interleaved (median of ``--train-reps``)."""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from imagenet_report import Report
from imagenet_setup import Clock

from hawq.quant import BitConfig, LayerBits, quantize_


def training_steps(model, batch, args: argparse.Namespace, clock: Clock) -> dict[str, float]:
    """Median float / QAT training step and no-grad forward times (interleaved)."""
    x, y = batch
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp)
    fp = copy.deepcopy(model).train()
    qm = copy.deepcopy(model).train()
    bits = BitConfig(
        weight_bits=4, act_bits=8, layers={"conv1": LayerBits(8, 8), "fc": LayerBits(8, 8)}
    )
    quantize_(qm, bits)
    nets = {"float": fp, "qat": qm}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}

    def step(k: str) -> None:
        with amp:
            loss = F.cross_entropy(nets[k](x), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    def forward(k: str) -> None:
        nets[k].eval()
        with torch.no_grad(), amp:
            nets[k](x)
        nets[k].train()

    out: dict[str, list[float]] = {}
    for k in nets:  # warm-up (and the observers' first ranges)
        step(k)
    for r in range(args.train_reps):
        for k in ("float", "qat") if r % 2 == 0 else ("qat", "float"):
            out.setdefault(f"{k}_step", []).append(clock(lambda k=k: step(k)))
            out.setdefault(f"eval_{k}", []).append(clock(lambda k=k: forward(k)))
    return {k: statistics.median(v) for k, v in out.items()}


def training_section(args, model, batch, clock: Clock, emit: Report) -> dict[str, float]:
    """(e)."""
    steps = training_steps(model, batch, args, clock)
    emit(
        f"\n## (e) training and evaluation steps, batch {args.batch} (median of "
        f"{args.train_reps}, interleaved)\n"
    )
    emit.table(
        ["step", "ms", "images/s", "/ float"],
        [
            [
                k,
                f"{v * 1e3:.0f}",
                f"{args.batch / v:.1f}",
                f"{v / steps[k.replace('qat', 'float')]:.2f}",
            ]
            for k, v in steps.items()
        ],
    )
    return steps
