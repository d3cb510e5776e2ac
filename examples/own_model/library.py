"""The library route for the `blobs` package: the same steps as `hawq run`, by hand.

Run: PYTHONPATH=examples/own_model python examples/own_model/library.py   (~20 s on 2 cores)
"""

from __future__ import annotations

import torch
from blobs.data import make_datasets
from blobs.loss import mse
from blobs.model import make_model
from torch.utils.data import DataLoader

import hawq


def loader(dataset, batch_size: int, shuffle: bool):
    """hawq's loops take ``callable(generator) -> batches``: the order comes from the generator."""

    def batches(gen: torch.Generator):
        order = torch.randperm(len(dataset), generator=gen).tolist() if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, sampler=order)

    return batches


def main() -> None:
    torch.manual_seed(0)
    data = make_datasets()
    train, evald = loader(data["train"], 64, True), loader(data["eval"], 256, False)
    model = make_model()
    float_cfg = hawq.QATConfig(epochs=6, lr=0.05, batch_size=64, seed=0)
    hawq.qat.train_float(model, train, evald, float_cfg, loss_fn=mse)
    print(f"float eval loss: {hawq.evaluate(model, evald, loss_fn=mse)[0]:.4f}")

    hessian_batches = list(DataLoader(data["hessian"], batch_size=64))
    config = hawq.HessianConfig(
        seed=0, max_iter=20, trace_tol=0.2, trace_max_probes=8, trace_min_probes=4
    )
    table = hawq.analyze(model.eval(), mse, hessian_batches, config, progress=False)
    example = hessian_batches[0][0][:1]
    alloc_cfg = hawq.AllocConfig(compression=5.0, candidate_bits=(2, 4, 8), pins={"conv1": 8})
    allocation = hawq.allocate_model(model, table, alloc_cfg, example_input=example)
    order = hawq.finetune_order(model, table, allocation.bits, hawq.OrderConfig())
    qat_cfg = hawq.QATConfig(epochs=1, lr=0.01, batch_size=64, seed=0)
    hawq.run_qat(model, order.stages, train, evald, qat_cfg,
                 bit_config=allocation.bit_config, loss_fn=mse)  # fmt: skip
    loss, _ = hawq.evaluate(model, evald, loss_fn=mse)
    print(f"bits {allocation.bits}, weight compression {allocation.compression:.2f}x, "
          f"quantized eval loss {loss:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
