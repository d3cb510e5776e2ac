"""hawq as a library, no pipeline: sensitivities -> bits -> Omega order -> block-wise QAT.

Run: .venv/bin/python examples/library_digits.py   (sklearn digits, a small CNN, ~1 min on 2 cores)
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import hawq


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):  # float training, a few seconds
        for i in torch.randperm(len(x_train)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[i]), y_train[i]).backward()
            opt.step()
    print(f"float accuracy: {hawq.evaluate(model, (x_test, y_test))[1]:.4f}")

    # 1. per-block top eigenvalue (Lanczos) and Hutchinson trace, one row per Conv/Linear
    batches = [(x_train[i : i + 128], y_train[i : i + 128]) for i in range(0, 512, 128)]
    config = hawq.HessianConfig(seed=0, trace_tol=0.1, trace_max_probes=60)
    table = hawq.analyze(model, nn.CrossEntropyLoss(), batches, config, progress=False)
    for row in table.to_pylist():
        print(f"{row['block']:>3} n={row['n_params']:>6} lambda={row['eigenvalue']:9.4f} "
              f"trace={row['trace']:9.3f} +- {row['trace_stderr']:.3f}")  # fmt: skip

    # 2. bits under a size target: ILP on sum_i Omega_i(b_i), first/last layers pinned to 8 bits
    alloc_cfg = hawq.AllocConfig(method="ilp", candidate_bits=(2, 4, 8), compression=8.0,
                                 act_bits=8, pins={"0": 8, "9": 8})  # fmt: skip
    allocation = hawq.allocate_model(model, table, alloc_cfg, example_input=x_train[:1])
    print(f"bits: {allocation.bits}  weight compression {allocation.compression:.2f}x")

    # 3. fine-tuning order by Omega_i = lambda_i ||Q(W_i) - W_i||^2, then block-wise QAT
    order = hawq.finetune_order(model, table, allocation.bits, hawq.OrderConfig(blocks_per_stage=2))
    qat_cfg = hawq.QATConfig(epochs=1, lr=0.01, batch_size=64, seed=0)
    records = hawq.run_qat(model, order.stages, (x_train, y_train), (x_test, y_test), qat_cfg,
                           bit_config=allocation.bit_config)  # fmt: skip
    for r in records:
        print(f"stage {r.stage} epoch {r.epoch}: eval accuracy {r.eval_acc:.4f}")


if __name__ == "__main__":
    main()
