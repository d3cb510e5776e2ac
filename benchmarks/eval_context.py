"""What the studies of ``evaluate_hawq.py`` share: the loaded experiment (``Setup``: model, data,
sensitivity table, allocation problems, float teacher), per-image correctness, the allocation
families of one solver at one size, and the atomic save of an experiment's JSON results."""

from __future__ import annotations

import copy
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from eval_setup import (
    Experiment,
    cached_analysis,
    load_model_and_data,
    load_run_config,
    permuted_sensitivity,
    settings_key,
    solve_with,
    weights_digest,
)
from torch import nn

import hawq
from hawq.allocate import Allocation, problem_from_model
from hawq.quant import BitConfig
from hawq.quant.bitconfig import atomic_write
from hawq.size import size_summary
from pipeline.data import DataBundle

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


class Setup:
    """Everything the studies share: config, model, data, sensitivity table, problems."""

    def __init__(self, exp: Experiment, device: torch.device, results_dir: Path, data_root):
        self.exp = exp
        self.cfg = load_run_config(exp, data_root)
        # a model trained from scratch starts from the same weights whichever experiments ran
        # before it in this process (pretrained ones load a checkpoint over them)
        torch.manual_seed(self.cfg.run.seed)
        self.model, self.data = load_model_and_data(self.cfg, device)
        self.bs = self.cfg.data.batch_size
        if self.cfg.baseline.train_epochs > 0:
            self._float_baseline(results_dir / "cache")
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

    def _float_baseline(self, cache_dir: Path) -> None:
        """The trained float model, from ``cache_dir`` when these settings trained it before
        (a resumed evaluation does not retrain it), else trained and saved atomically."""
        key = settings_key(
            {
                "model": self.cfg.model.to_dict(),
                "data": self.cfg.data.to_dict(),
                "baseline": self.cfg.baseline.to_dict(),
                "seed": self.cfg.run.seed,
                "init": weights_digest(self.model),
            }
        )
        path = cache_dir / f"float-{key}.pt"
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.model.load_state_dict(state)
            except Exception as exc:
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                raise RuntimeError(
                    f"cached float model {path} cannot be loaded ({why}); delete it to retrain"
                ) from exc
            log(f"  float baseline: cached {path}")
            return
        self._train_float()
        sink = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, sink)
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, sink.getvalue())

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

    def sizes(self, bit_config: BitConfig) -> dict:
        """Size (MB), weight and activation compression of the model under ``bit_config``."""
        summ = size_summary(self.model, bit_config)
        return {k: summ[k] for k in ("size_mb", "weight_compression", "act_compression")}

    def record(self, name: str, kind: str, solver: str, sens: str, alloc: Allocation, c):
        """One allocation's row: bits, sizes, true Omega under both sensitivities, accuracy."""
        bits = np.array([alloc.bits[b] for b in self.problems["trace"].blocks])
        return {
            "name": name,
            "kind": kind,
            "solver": solver,
            "sensitivity": sens,
            "bits": alloc.bits,
            **self.sizes(alloc.bit_config),
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


def save(res: dict) -> None:
    """Write ``res`` (less its ``_path``) to ``res["_path"]`` atomically."""
    path = Path(res["_path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in res.items() if k != "_path"}  # where it lies is not a result
    hawq.quant.bitconfig.atomic_write(path, json.dumps(stored, indent=1).encode())
