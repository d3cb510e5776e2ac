"""The three studies of ``evaluate_hawq.py``, each adding rows or runs to an experiment's results
and saving after every one (a rerun skips those done):

- **PTQ**: every allocation quantized at once, activation ranges from training images.
- **QAT**: HAWQ, anti, random and (``qat_uniform``) uniform-b allocations, each trained with
  every seed by the same recipe: block stages in descending Omega with distillation and
  random-crop + flip augmentation, then ``final_epochs`` with every block trainable.
- **Order**: the HAWQ bits fine-tuned in descending / reverse / random Omega order.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import numpy as np
import torch
from eval_context import Setup, allocations, bits_str, correctness, log, save
from eval_setup import uniform
from torch import nn

import hawq
from hawq.allocate import Allocation
from hawq.quant import BitConfig, calibrate_
from pipeline.data import DataBundle

CALIBRATION_IMAGES = 512


# ----------------------------------------------------------------------------- PTQ
def ptq_model(model: nn.Module, bit_config: BitConfig, data: DataBundle) -> nn.Module:
    """A quantized copy with activation ranges from the first training images."""
    m = hawq.quantize_(copy.deepcopy(model), bit_config)
    n = min(CALIBRATION_IMAGES, len(data.train_y))
    calibrate_(m, [data.train_x[i : i + 128] for i in range(0, n, 128)])
    return m


def study_ptq(s: Setup, res: dict) -> None:
    """Every allocation quantized at once (no training): accuracy per test image. The ILP
    family comes first; rows are saved one by one and a rerun skips those already done."""
    sens0 = s.acfg.sensitivity
    todo = []
    for solver in ("ilp", "v1"):
        for sens in (sens0, *({"eigenvalue", "trace"} - {sens0})):
            n_rand = s.exp.ptq_random if sens == sens0 else 0  # random ranks ignore S
            allocs = allocations(s, solver, sens, n_rand, s.exp.ptq_compression)
            todo += [(n, k, solver, sens, a) for n, k, a in allocs]
    for b in (4, 2):
        todo.insert(2, (f"uniform-{b}", "uniform", "-", "-", uniform(s.problems[sens0], s.acfg, b)))
    rows = res.setdefault("ptq", {"rows": []})["rows"]
    names = {t[0] for t in todo} | {"uniform-4-all-a4"}
    rows[:] = [r for r in rows if r["name"] in names]  # e.g. fewer random allocations now
    for i, (name, kind, solver, sens, alloc) in enumerate(todo):
        if any(r["name"] == name and r["bits"] == alloc.bits for r in rows):
            continue  # done with these bits (a changed allocation rule recomputes the row)
        rows[:] = [r for r in rows if r["name"] != name]
        c = correctness(ptq_model(s.model, alloc.bit_config, s.data), s.data, s.bs)
        rows.append(s.record(name, kind, solver, sens, alloc, c))
        save(res)
        log(
            f"  PTQ {i + 1}/{len(todo)} {name}: {rows[-1]['weight_compression']:.2f}x "
            f"acc {100 * rows[-1]['acc']:.2f}%"
        )
    if all(r["name"] != "uniform-4-all-a4" for r in rows):
        w4a4 = BitConfig(weight_bits=4, act_bits=4)  # everything at W4/A4, input/last too
        c = correctness(ptq_model(s.model, w4a4, s.data), s.data, s.bs)
        rows.append(
            {
                "name": "uniform-4-all-a4",
                "kind": "uniform",
                "solver": "-",
                "sensitivity": "-",
                "acc": float(np.mean(c)),
                "correct": bits_str(c),
                **s.sizes(w4a4),
            }
        )
        save(res)


# ----------------------------------------------------------------------------- QAT
def augmented(data: DataBundle, batch_size: int, augment: bool, n_images: int | None = None):
    """Training batches of the first ``n_images`` training images (None: all), drawn from the
    QAT loop's generator: shuffle, pad-4 random crop, flip."""
    x_all, y_all = data.train_x[:n_images], data.train_y[:n_images]

    def batches(gen: torch.Generator):
        n = len(y_all)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            j = order[i : i + batch_size]
            x = x_all[j]
            if augment:
                h, w = x.shape[-2:]
                pad = nn.functional.pad(x, (4, 4, 4, 4))
                dy = torch.randint(0, 9, (len(j),), generator=gen)
                dx = torch.randint(0, 9, (len(j),), generator=gen)
                flip = torch.rand(len(j), generator=gen) < 0.5
                x = torch.stack(
                    [pad[k, :, dy[k] : dy[k] + h, dx[k] : dx[k] + w] for k in range(len(j))]
                )
                x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
            yield x, y_all[j]

    return batches


def qat_run(s: Setup, alloc: Allocation, seed: int, mode: str) -> dict:
    """Block-wise QAT (``mode`` order) then ``final_epochs`` with every block trainable."""
    torch.manual_seed(seed)
    m = copy.deepcopy(s.model).requires_grad_(True)
    ocfg = replace(
        s.cfg.finetune.order_to_hawq(s.cfg.allocation, seed=s.cfg.run.seed), mode=mode, seed=seed
    )
    order = hawq.finetune_order(m, s.table, alloc.bits, ocfg)
    qcfg = replace(
        s.cfg.finetune.to_hawq(seed=s.cfg.run.seed, eval_batch_size=s.cfg.data.batch_size),
        seed=seed,
        loss="distill",
    )
    train = augmented(s.data, qcfg.batch_size, s.exp.augment, s.exp.qat_train_size)
    test = (s.data.eval_x, s.data.eval_y)
    hist = hawq.run_qat(
        m, order.stages, train, test, qcfg, bit_config=alloc.bit_config, teacher=s.teacher
    )
    stage_acc = [h.eval_acc for h in hist if h.epoch == qcfg.epochs - 1]
    if s.exp.final_epochs > 0:
        everything = [n for st in order.stages for n in st]
        fcfg = replace(
            qcfg,
            epochs=s.exp.final_epochs,
            freeze_quantized=False,
            seed=hawq.derive_seed(seed, "final"),
        )
        m.requires_grad_(True)
        hawq.run_qat(
            m, [everything], train, None, fcfg, bit_config=alloc.bit_config, teacher=s.teacher
        )
    c = correctness(m, s.data, s.bs)
    return {
        "seed": seed,
        "bits": alloc.bits,
        "order": mode,
        "stage_acc": stage_acc,
        "acc": float(np.mean(c)),
        "correct": bits_str(c),
    }


def qat_allocations(s: Setup) -> list[tuple[str, str, Allocation]]:
    """The QAT study's allocations of the ``qat_arms`` families: HAWQ, anti and random of
    ``qat_solver`` at the QAT size, then ``uniform-b`` for each ``qat_uniform`` width (free
    blocks at b bits, pins kept)."""
    solver, sens, arms = s.exp.qat_solver, s.acfg.sensitivity, s.exp.qat_arms
    n_random = s.exp.qat_random if "random" in arms else 0  # no solves for arms not trained
    out = allocations(s, solver, sens, n_random, s.exp.qat_compression)
    for b in s.exp.qat_uniform if "uniform" in arms else ():
        out.append((f"uniform-{b}", "uniform", uniform(s.problems[sens], s.acfg, b)))
    return [a for a in out if a[1] in arms]


def plan_qat(s: Setup, res: dict) -> list[tuple[str, str, Allocation, int]]:
    """Drop the saved runs of allocations, bits or seeds no longer configured; return the
    (name, kind, allocation, seed) runs still to do, in order."""
    allocs = qat_allocations(s)
    q = res.setdefault(
        "qat", {"solver": s.exp.qat_solver, "sensitivity": s.acfg.sensitivity, "runs": []}
    )
    runs = q["runs"]
    want = {name: alloc.bits for name, _, alloc in allocs}
    runs[:] = [r for r in runs if want.get(r["name"]) == r["bits"] and r["seed"] in s.exp.qat_seeds]
    done = {(r["name"], r["seed"]) for r in runs}
    return [
        (name, kind, alloc, seed)
        for name, kind, alloc in allocs
        for seed in s.exp.qat_seeds
        if (name, seed) not in done
    ]


def study_qat(s: Setup, res: dict) -> None:
    """Every QAT allocation with every seed. A run is deterministic in (bits, seed): an
    allocation with the bits of one already trained reuses its result."""
    todo = plan_qat(s, res)
    runs = res["qat"]["runs"]
    for name, kind, alloc, seed in todo:
        t = time.perf_counter()
        twin = next((r for r in runs if r["bits"] == alloc.bits and r["seed"] == seed), None)
        r = dict(twin) if twin is not None else qat_run(s, alloc, seed, "descending")
        r |= {
            "name": name,
            "kind": kind,
            "bits": alloc.bits,
            "weight_compression": alloc.compression,
            "omega": alloc.total_omega,
        }
        runs.append(r)
        how = f"the bits of {twin['name']}" if twin is not None else "trained"
        log(f"  QAT {name} seed {seed}: {100 * r['acc']:.2f}% ({how}, "
            f"{time.perf_counter() - t:.0f}s)")  # fmt: skip
        save(res)


# ----------------------------------------------------------------------------- order
def study_order(s: Setup, res: dict) -> None:
    """The HAWQ bits fine-tuned in each order with every seed (descending reuses the QAT runs)."""
    solver, sens = s.exp.qat_solver, s.acfg.sensitivity
    name, _, alloc = allocations(s, solver, sens, 0, s.exp.qat_compression)[0]
    res.setdefault("order", {"allocation": name, "runs": []})
    runs = res["order"]["runs"]
    runs[:] = [
        r
        for r in runs
        if r.get("bits") == alloc.bits
        and r["order"] in s.exp.orders
        and r["seed"] in s.exp.qat_seeds
    ]  # this allocation's runs with the configured orders and seeds only
    done = {(r["order"], r["seed"]) for r in runs}
    qat_runs = res.get("qat", {}).get("runs", [])
    prior = {r["seed"]: r for r in qat_runs if r["name"] == name and r["bits"] == alloc.bits}
    for mode in s.exp.orders:
        for seed in s.exp.qat_seeds:
            if (mode, seed) in done:
                continue
            r = prior.get(seed) if mode == "descending" else None
            r = dict(r) if r is not None else qat_run(s, alloc, seed, mode)
            runs.append(r)
            log(f"  order {mode} seed {seed}: stages {r['stage_acc']} final {r['acc']:.4f}")
            save(res)
