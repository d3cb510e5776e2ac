"""Does the Hessian matter? A paired evaluation of HAWQ against same-size ablations.

Per experiment of the config (ResNet-20 / ResNet-56 pretrained on the CIFAR-10 subset, a small
CNN on Fashion-MNIST):

1. **PTQ** (no training noise): HAWQ with the v1 rule and with the ILP, each with eigenvalue and
   trace sensitivity; "anti" (the same solver on reversed sensitivity ranks); ``ptq_random``
   random-rank allocations per solver; uniform 4- and 2-bit. Spearman of total Omega vs
   accuracy over the same-size allocations; paired (McNemar, bootstrap) comparisons.
2. **QAT** (``qat_seeds`` seeds, deterministic): HAWQ, anti and ``qat_random`` random
   allocations of the ``qat_solver`` family, and uniform-b for each ``qat_uniform`` width;
   block stages in descending Omega with distillation and random-crop + flip augmentation,
   then ``final_epochs`` with every block trainable.
3. **Order**: the HAWQ bits fine-tuned in descending / reverse / random Omega order.

Results go to ``<results_dir>/<experiment>.json`` (one file per experiment, rewritten after
each study); ``results_doc.py`` writes ``docs/results.md`` and the plots from them. This module is
the driver and CLI; ``eval_setup.py`` (config, loading, allocation families), ``eval_context.py``
(what the studies share) and ``eval_studies.py`` (the studies) hold the rest.

    python benchmarks/evaluate_hawq.py --config configs/evaluate/cpu.yaml           # 2 cores
    python benchmarks/evaluate_hawq.py --config configs/evaluate/cpu.yaml --only resnet20_cifar10 \
        --studies ptq                                                             # PTQ only
    python benchmarks/evaluate_hawq.py --config configs/evaluate/gpu.yaml --device cuda
    python benchmarks/evaluate_hawq.py --config configs/evaluate/cpu.yaml --doc-only  # rewrite doc
    python benchmarks/evaluate_hawq.py --smoke --out /tmp/eval                     # ~1 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_context import Setup, bits_str, log, save  # noqa: E402
from eval_setup import (  # noqa: E402
    ROOT,
    EvalConfig,
    Experiment,
    check_experiment,
    load_eval_config,
    load_run_config,
    same_settings,
    smoke_config,
)
from eval_studies import study_order, study_ptq, study_qat  # noqa: E402
from results_doc import write_doc  # noqa: E402

from hawq.quant import BitConfig  # noqa: E402
from hawq.size import size_summary  # noqa: E402

STUDIES = ("ptq", "qat", "order")


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
        "n_qat_train": len(s.data.train_y[: exp.qat_train_size]),
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
        save(res)


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
    selected = [e for e in cfg.experiments if args.only is None or e.name in args.only]
    trains = not args.doc_only and {"qat", "order"} & set(args.studies)
    for exp in selected if trains else ():
        try:  # before any work: uniform widths without Omega, a QAT set larger than the data
            check_experiment(exp, load_run_config(exp, args.data_root))
        except ValueError as exc:
            ap.error(f"{args.config}: {exc}")
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
        for exp in selected:
            run_experiment(exp, cfg, args.studies, device, args.data_root)
            write_doc(cfg, cmd, smoke=args.smoke, device=device)
    doc = write_doc(cfg, cmd, smoke=args.smoke, device=device)
    log(f"wrote {doc}")


if __name__ == "__main__":
    main()
