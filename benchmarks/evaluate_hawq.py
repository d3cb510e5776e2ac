"""Does the Hessian matter? A paired evaluation of HAWQ against same-size ablations.

Per experiment of the config (ResNet-20 / ResNet-56 pretrained on the CIFAR-10 subset, a small
CNN on Fashion-MNIST):

1. **PTQ** (no training noise): HAWQ with the v1 rule and with the ILP, each with eigenvalue and
   trace sensitivity; "anti" (the same solver on reversed sensitivity ranks); ``ptq_random``
   random-rank allocations per solver; uniform 4- and 2-bit. Spearman of total Omega vs
   accuracy over the same-size allocations; paired (McNemar, bootstrap) comparisons.
2. **QAT** (``qat_seeds`` seeds, deterministic): HAWQ, anti and ``qat_random`` random
   allocations of the ``qat_solver`` family; block stages in descending Omega with distillation
   and random-crop + flip augmentation, then ``final_epochs`` with every block trainable.
3. **Order**: the HAWQ bits fine-tuned in descending / reverse / random Omega order.

Results go to ``<results_dir>/<experiment>.json`` (one file per experiment, rewritten after
each study); ``results_doc.py`` writes ``docs/results.md`` and the plots from them.

    python benchmarks/evaluate_hawq.py --config configs/evaluate/cpu.yaml           # 2 cores
    python benchmarks/evaluate_hawq.py --config configs/evaluate/cpu.yaml --only resnet20_cifar10 \
        --studies ptq                                                             # PTQ only
    python benchmarks/evaluate_hawq.py --config configs/evaluate/gpu.yaml --device cuda
    python benchmarks/evaluate_hawq.py --config configs/evaluate/cpu.yaml --doc-only  # rewrite doc
    python benchmarks/evaluate_hawq.py --smoke --out /tmp/eval                     # ~1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_setup import (  # noqa: E402
    ROOT,
    EvalConfig,
    Experiment,
    cached_analysis,
    load_eval_config,
    load_model_and_data,
    load_run_config,
    permuted_sensitivity,
    same_settings,
    smoke_config,
    solve_with,
    uniform,
)
from results_doc import write_doc  # noqa: E402

import hawq  # noqa: E402
from hawq.allocate import Allocation, problem_from_model  # noqa: E402
from hawq.quant import BitConfig, calibrate_  # noqa: E402
from hawq.size import size_summary  # noqa: E402
from pipeline.data import DataBundle  # noqa: E402

STUDIES = ("ptq", "qat", "order")
CALIBRATION_IMAGES = 512
log_t0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - log_t0:7.1f}s] {msg}", flush=True)


@torch.no_grad()
def correctness(model: nn.Module, data: DataBundle, batch_size: int) -> np.ndarray:
    """Per test image: 1 if ``model`` (eval mode) classifies it correctly, else 0."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(data.eval_y), batch_size):
        pred = model(data.eval_x[i : i + batch_size]).argmax(1)
        out.append((pred == data.eval_y[i : i + batch_size]).cpu().numpy())
    model.train(was)
    return np.concatenate(out).astype(np.int8)


def bits_str(c: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in c)


def ptq_model(model: nn.Module, bit_config: BitConfig, data: DataBundle) -> nn.Module:
    """A quantized copy with activation ranges from the first training images."""
    m = hawq.quantize_(copy.deepcopy(model), bit_config)
    n = min(CALIBRATION_IMAGES, len(data.train_y))
    calibrate_(m, [data.train_x[i : i + 128] for i in range(0, n, 128)])
    return m


class Setup:
    """Everything the studies share: config, model, data, sensitivity table, problems."""

    def __init__(self, exp: Experiment, device: torch.device, results_dir: Path, data_root):
        self.exp = exp
        self.cfg = load_run_config(exp, data_root)
        self.model, self.data = load_model_and_data(self.cfg, device)
        self.bs = self.cfg.data.batch_size
        if self.cfg.baseline.train_epochs > 0:
            self._train_float()
        self.model.eval()
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.table = cached_analysis(self.model, self.data, self.cfg, results_dir / "cache", log)
        self.acfg = self.cfg.allocation.to_hawq()
        example = self.data.eval_x[:1]
        self.problems = {
            s: problem_from_model(
                self.model, self.table, replace(self.acfg, sensitivity=s), example_input=example
            )
            for s in ("eigenvalue", "trace")
        }
        self.float_correct = correctness(self.model, self.data, self.bs)

    def _train_float(self) -> None:
        """Train from scratch with the library's loop (all layers float, one stage)."""
        b = self.cfg.baseline
        first = next(n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d))
        log(f"  training the float baseline ({b.train_epochs} epochs)")
        qcfg = hawq.QATConfig(
            epochs=b.train_epochs,
            lr=b.lr,
            momentum=b.momentum,
            weight_decay=b.weight_decay,
            batch_size=b.batch_size,
            schedule=b.schedule,
            freeze_quantized=False,
            seed=self.cfg.run.seed,
        )
        float_bits = BitConfig(weight_bits=32, act_bits=32)
        train = (self.data.train_x, self.data.train_y)
        hawq.run_qat(self.model, [[first]], train, None, qcfg, bit_config=float_bits)

    def record(self, name: str, kind: str, solver: str, sens: str, alloc: Allocation, c):
        """One allocation's row: bits, sizes, true Omega under both sensitivities, accuracy."""
        bits = np.array([alloc.bits[b] for b in self.problems["trace"].blocks])
        summ = size_summary(self.model, alloc.bit_config)
        return {
            "name": name,
            "kind": kind,
            "solver": solver,
            "sensitivity": sens,
            "bits": alloc.bits,
            "size_mb": summ["size_mb"],
            "weight_compression": summ["weight_compression"],
            "act_compression": summ["act_compression"],
            "omega_eigenvalue": self.problems["eigenvalue"].total_omega(bits),
            "omega_trace": self.problems["trace"].total_omega(bits),
            "acc": float(np.mean(c)),
            "correct": bits_str(c),
        }


def allocations(
    s: Setup, solver: str, sens: str, n_random: int, compression: float | None = None
) -> list[tuple[str, str, Allocation]]:
    """HAWQ, anti and ``n_random`` random allocations of one solver and sensitivity (at the
    config's compression, or ``compression``)."""
    problem = s.problems[sens]
    acfg = replace(s.acfg, method=solver, sensitivity=sens, size_tolerance=s.exp.size_tolerance)
    if compression is not None:
        acfg = replace(acfg, compression=compression, size_limit_mb=None)
    out = [
        (f"hawq-{solver}-{sens}", "hawq", solve_with(problem, acfg, None)),
        (
            f"anti-{solver}-{sens}",
            "anti",
            solve_with(problem, acfg, permuted_sensitivity(problem, "reversed")),
        ),
    ]
    for k in range(n_random):
        rng = np.random.default_rng([s.cfg.run.seed, 7919, k])
        fake = permuted_sensitivity(problem, "random", rng)
        out.append((f"random-{solver}-{k}", "random", solve_with(problem, acfg, fake)))
    return out


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
        save(s, res)
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
                **_sizes(s, w4a4),
            }
        )
        save(s, res)


def _sizes(s: Setup, bit_config: BitConfig) -> dict:
    summ = size_summary(s.model, bit_config)
    keys = ("size_mb", "weight_compression", "act_compression")
    return {k: summ[k] for k in keys}


def augmented(data: DataBundle, batch_size: int, augment: bool):
    """Training batches drawn from the QAT loop's generator: shuffle, pad-4 random crop, flip."""
    x_all, y_all = data.train_x, data.train_y

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
    train = augmented(s.data, qcfg.batch_size, s.exp.augment)
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


def study_qat(s: Setup, res: dict) -> None:
    """HAWQ, anti and random allocations of one solver, each with every seed. A run is
    deterministic in (bits, seed): an allocation with the bits of one already trained reuses
    its result; runs of allocations or seeds no longer configured are dropped."""
    solver, sens = s.exp.qat_solver, s.acfg.sensitivity
    allocs = allocations(s, solver, sens, s.exp.qat_random, s.exp.qat_compression)
    res.setdefault("qat", {"solver": solver, "sensitivity": sens, "runs": []})
    runs = res["qat"]["runs"]
    want = {name: alloc.bits for name, _, alloc in allocs}
    runs[:] = [r for r in runs if want.get(r["name"]) == r["bits"] and r["seed"] in s.exp.qat_seeds]
    for name, kind, alloc in allocs:
        done = {r["seed"] for r in runs if r["name"] == name}
        for seed in s.exp.qat_seeds:
            if seed in done:
                continue
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
            save(s, res)


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
            save(s, res)


def save(s: Setup, res: dict) -> None:
    path = Path(res["_path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in res.items() if k != "_path"}  # where it lies is not a result
    hawq.quant.bitconfig.atomic_write(path, json.dumps(stored, indent=1).encode())


def run_experiment(exp: Experiment, cfg: EvalConfig, studies, device, data_root) -> None:
    """Run the chosen studies of ``exp``, updating its JSON results after each."""
    results_dir = Path(cfg.results_dir)
    path = results_dir / f"{exp.name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if res and not same_settings(res.get("experiment", {}), exp):
        log(f"  {path}: settings changed, starting afresh")
        res = {}
    log(f"== {exp.name}: {exp.title}")
    t0 = time.perf_counter()
    s = Setup(exp, device, results_dir, data_root)
    res |= {
        "_path": str(path),
        "experiment": asdict(exp),
        "overrides": list(exp.overrides),
        "n_eval": len(s.data.eval_y),
        "n_train": len(s.data.train_y),
        "n_hessian": s.data.hessian_samples,
        "float_correct": bits_str(s.float_correct),
        "float_acc": float(np.mean(s.float_correct)),
        "float_size_mb": size_summary(s.model, BitConfig(weight_bits=32, act_bits=32))["size_mb"],
        "sensitivity": [
            {k: v for k, v in r.items() if k != "eigenvalues"} for r in s.table.to_pylist()
        ],
        "alloc": {
            "compression": s.acfg.compression,
            "act_bits": s.acfg.act_bits,
            "input_act_bits": s.acfg.input_act_bits,
            "last_act_bits": s.acfg.last_act_bits,
            "sensitivity": s.acfg.sensitivity,
            "mse_clip": s.acfg.mse_clip,
            "clip_bits": s.acfg.clip_bits,
            "percentile": s.acfg.percentile,
        },
        "qat_config": s.cfg.finetune.to_hawq(
            seed=s.cfg.run.seed, eval_batch_size=s.cfg.data.batch_size
        ).to_dict(),
    }
    res.setdefault("seconds", {})["setup"] = time.perf_counter() - t0
    log(f"  float {100 * res['float_acc']:.2f}% on {res['n_eval']} images")
    for study in (st for st in studies if st in exp.studies):
        t = time.perf_counter()
        if study == "ptq":
            study_ptq(s, res)
        elif study == "qat" and exp.qat_seeds:
            study_qat(s, res)
        elif study == "order" and exp.qat_seeds and exp.orders:
            study_order(s, res)
        res["seconds"][study] = res["seconds"].get(study, 0.0) + time.perf_counter() - t
        save(s, res)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "evaluate" / "cpu.yaml"))
    ap.add_argument("--smoke", action="store_true", help="tiny run of the first experiment")
    ap.add_argument("--out", default=None, help="directory for doc, plots and results")
    ap.add_argument("--only", nargs="*", default=None, help="experiment names to run")
    ap.add_argument("--studies", nargs="*", default=list(STUDIES), choices=STUDIES)
    ap.add_argument("--doc-only", action="store_true", help="rewrite the doc from the results")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--data-root", default=None, help="replaces the configs' ../shared/data/")
    args = ap.parse_args(argv)
    cfg = load_eval_config(args.config)
    if args.smoke:
        cfg = smoke_config(cfg, Path(args.out or "/tmp/hawq_eval_smoke"))
    elif args.out:
        out = Path(args.out)
        cfg = replace(
            cfg,
            doc=str(out / "results.md"),
            img_dir=str(out / "img"),
            results_dir=str(out / "results"),
        )
    cfg = replace(
        cfg,
        **{
            k: str(ROOT / getattr(cfg, k))
            for k in ("doc", "img_dir", "results_dir")
            if not Path(getattr(cfg, k)).is_absolute()
        },
    )
    if args.only:
        unknown = set(args.only) - {e.name for e in cfg.experiments}
        if unknown:
            ap.error(f"unknown experiments {sorted(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=False)
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--doc-only"]
    cmd = "python benchmarks/evaluate_hawq.py " + " ".join(shown)  # the command that reruns it
    if not args.doc_only:
        for exp in cfg.experiments:
            if args.only is None or exp.name in args.only:
                run_experiment(exp, cfg, args.studies, device, args.data_root)
                write_doc(cfg, cmd, smoke=args.smoke, device=device)
    doc = write_doc(cfg, cmd, smoke=args.smoke, device=device)
    log(f"wrote {doc}")


if __name__ == "__main__":
    main()
