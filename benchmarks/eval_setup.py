"""Set-up of ``evaluate_hawq.py``: its YAML config, data/model loading, the cached Hessian
analysis, and the allocation families compared at one size (HAWQ, anti, random, uniform).

Allocation families (one solver each: the ILP, or the HAWQ v1 monotone rule): with the true
block sensitivities S_i the solver gives **HAWQ**; with the free blocks' S values reversed in
rank it gives **anti** (the least sensitive block is treated as the most sensitive); with
them randomly permuted it gives **random**. A fake S' enters the solver as
Omega'_i(b) = Omega_i(b) S'_i / S_i (each block keeps its own ||Q_b(W_i) - W_i||^2), and the
reported total Omega is always the true one. **uniform-b** puts every free block at b bits.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn

import hawq
from hawq.allocate import Allocation, AllocConfig, InfeasibleAllocation, Problem, allocate
from hawq.quant.bitconfig import atomic_write
from hawq.validation import INT_BITS
from pipeline.config import load_config
from pipeline.data import DataBundle, load_data
from pipeline.models import build_model, loss_fn_for

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = "../shared/data/"
QAT_ARMS = ("hawq", "anti", "random", "uniform")  # the allocation families QAT can train


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One model/dataset: a pipeline config + overrides, and the sizes of the three studies."""

    name: str
    title: str
    config: str
    overrides: tuple[str, ...] = ()
    ptq_random: int = 10  # random same-size allocations per solver (PTQ)
    ptq_compression: float | None = None  # PTQ target W-Comp (None: allocation.compression)
    qat_compression: float | None = None  # QAT/order target W-Comp (None: allocation.compression)
    studies: tuple[str, ...] = ("ptq", "qat", "order")  # the studies this experiment runs
    qat_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    qat_random: int = 3  # random allocations fine-tuned with every seed
    qat_solver: str = "ilp"  # the solver family of the QAT and order studies
    # uniform-b allocations (every free block at b bits) QAT-trained with the same recipe
    qat_uniform: tuple[int, ...] = ()
    # the allocation families the QAT study trains (e.g. [hawq, uniform] for a budget study)
    qat_arms: tuple[str, ...] = QAT_ARMS
    final_epochs: int = 1  # epochs with every block trainable after the block stages
    # QAT and the order study train on the first qat_train_size training images (None: all of
    # data.train_size; the float model and PTQ calibration are unaffected)
    qat_train_size: int | None = None
    orders: tuple[str, ...] = ("descending", "reverse", "random")
    augment: bool = True  # random crop (pad 4) + horizontal flip during QAT
    # every solver's weight bits in [(1 - t) B, B] for the target's budget B (same size)
    size_tolerance: float | None = 0.02
    reduced: str = ""  # what this run leaves out relative to the issue (shown in the doc)

    def __post_init__(self) -> None:
        if not isinstance(self.qat_uniform, list | tuple):
            raise ValueError(f"{self.name}: qat_uniform must be a list of bit widths, e.g. [4]")
        for key in ("overrides", "qat_seeds", "orders", "studies", "qat_uniform", "qat_arms"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        for b in self.qat_uniform:
            if isinstance(b, bool) or not isinstance(b, int) or b not in INT_BITS:
                raise ValueError(
                    f"{self.name}: qat_uniform must list weight bit widths in 2..8 (e.g. [4]), "
                    f"got {b!r}"
                )
        if len(set(self.qat_uniform)) != len(self.qat_uniform):
            raise ValueError(f"{self.name}: qat_uniform {list(self.qat_uniform)} repeats a width")
        bad_arms = set(self.qat_arms) - set(QAT_ARMS)
        if not self.qat_arms or bad_arms:
            raise ValueError(
                f"{self.name}: qat_arms must be a non-empty subset of {list(QAT_ARMS)}, "
                f"got {list(self.qat_arms)}"
            )
        if self.qat_solver not in ("ilp", "v1"):
            raise ValueError(f"{self.name}: qat_solver must be 'ilp' or 'v1'")
        t = self.size_tolerance
        if t is not None and not (isinstance(t, float | int) and 0 < t < 1):
            raise ValueError(f"{self.name}: size_tolerance must be in (0, 1) or null, got {t!r}")
        n = self.qat_train_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"{self.name}: qat_train_size must be a positive number of images or null, "
                f"got {n!r}"
            )
        if self.ptq_random < 0 or self.qat_random < 0 or self.final_epochs < 0:
            raise ValueError(f"{self.name}: ptq_random, qat_random, final_epochs must be >= 0")
        if not self.studies or set(self.studies) - {"ptq", "qat", "order"}:
            raise ValueError(f"{self.name}: studies must be a non-empty subset of ptq, qat, order")
        bad = set(self.orders) - {"descending", "reverse", "random"}
        if bad:
            raise ValueError(f"{self.name}: unknown orders {sorted(bad)}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The evaluation: experiments, where results/doc/plots go, threads, the smoke changes."""

    experiments: tuple[Experiment, ...]
    threads: int = 2
    doc: str = "docs/results.md"
    img_dir: str = "docs/img"
    results_dir: str = "runs/evaluate"  # per-experiment JSON results + the Hessian cache
    note: str = ""
    smoke: Mapping[str, Any] = field(default_factory=dict)  # Experiment fields for --smoke


def _strict(cls: type, raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(raw).__name__}")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")
    return dict(raw)


def load_eval_config(path: str | Path) -> EvalConfig:
    """Read the evaluation YAML strictly (unknown keys fail, naming the key and file)."""
    raw = _strict(EvalConfig, yaml.safe_load(Path(path).read_text()), str(path))
    exps = raw.get("experiments")
    if not isinstance(exps, list) or not exps:
        raise ValueError(f"{path}: experiments must be a non-empty list")
    raw["experiments"] = tuple(
        Experiment(**_strict(Experiment, e, f"{path}: experiments[{i}]"))
        for i, e in enumerate(exps)
    )
    smoke = _strict(Experiment, raw.get("smoke") or {}, f"{path}: smoke")
    cfg = EvalConfig(**{**raw, "smoke": smoke})
    smoke_config(cfg, Path("/nonexistent"))  # validate the smoke fields now
    return cfg


# Fields whose change keeps saved results valid: rows and runs are keyed by allocation name,
# bits, seed and order, and the studies drop those no longer configured.
RESUMABLE_FIELDS = frozenset(
    {
        "title",
        "reduced",
        "ptq_random",
        "qat_random",
        "qat_seeds",
        "qat_uniform",
        "qat_arms",
        "orders",
        "studies",
    }
)


def same_settings(saved: Mapping[str, Any], exp: Experiment) -> bool:
    """Whether results saved with the Experiment fields ``saved`` belong to ``exp``: equal
    up to ``RESUMABLE_FIELDS`` (a field added since, at its default value, is equal too)."""
    now = json.loads(json.dumps(asdict(exp)))
    defaults = {f.name: f.default for f in fields(Experiment) if f.name not in saved}
    defaults = json.loads(json.dumps(defaults))  # only fields with plain defaults are new
    return set(saved) <= set(now) and all(
        saved.get(k, defaults.get(k)) == v for k, v in now.items() if k not in RESUMABLE_FIELDS
    )


def smoke_config(cfg: EvalConfig, out_dir: Path) -> EvalConfig:
    """The first experiment with the smoke fields (overrides appended), writing to ``out_dir``,
    on one thread."""
    s = dict(cfg.smoke)
    e = cfg.experiments[0]
    s["overrides"] = (*e.overrides, *s.get("overrides", ()))
    exp = replace(e, **s)
    return replace(
        cfg,
        threads=1,  # it runs in the test suite, next to other tests
        experiments=(exp,),
        doc=str(out_dir / "results.md"),
        img_dir=str(out_dir / "img"),
        results_dir=str(out_dir / "results"),
    )


def check_experiment(exp: Experiment, run_cfg) -> None:
    """``exp.qat_uniform`` widths must be candidate bits of the allocation (Omega covers only
    those), and ``exp.qat_train_size`` at most ``data.train_size``; raises a ValueError naming
    the key before any work starts."""
    n, n_train = exp.qat_train_size, run_cfg.data.train_size
    if n is not None and n_train is not None and n > n_train:
        raise ValueError(
            f"{exp.name}: qat_train_size {n} exceeds data.train_size {n_train} of {exp.config}; "
            f"lower qat_train_size or raise data.train_size"
        )
    cand = tuple(run_cfg.allocation.candidate_bits)
    bad = [b for b in exp.qat_uniform if b not in cand]
    if bad:
        raise ValueError(
            f"{exp.name}: qat_uniform {bad} not among allocation.candidate_bits {list(cand)} of "
            f"{exp.config}; use widths from that list"
        )


# ----------------------------------------------------------------------------- loading
def data_root_overrides(cfg, data_root: str | None) -> list[str]:
    """Overrides mapping `../shared/data/...` (and Fashion-MNIST's default) to ``data_root``."""
    if data_root is None:
        return []
    out = []
    for key, path in (("model.checkpoint", cfg.model.checkpoint), ("data.path", cfg.data.path)):
        if path is not None and str(path).startswith(SHARED_DATA):
            out.append(f"{key}={os.path.join(data_root, str(path)[len(SHARED_DATA) :])}")
    if cfg.data.name == "fashion_mnist" and cfg.data.path is None:
        out.append(f"data.path={os.path.join(data_root, 'fashion-mnist')}")
    return out


def load_run_config(exp: Experiment, data_root: str | None = None):
    """The pipeline ``RunConfig`` of ``exp`` (paths relative to the repository root)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(exp.config, exp.overrides)
        extra = data_root_overrides(cfg, data_root)
        return load_config(exp.config, (*exp.overrides, *extra)) if extra else cfg
    finally:
        os.chdir(cwd)


def load_model_and_data(cfg, device: torch.device) -> tuple[torch.nn.Module, DataBundle]:
    """The pipeline's model (checkpoint loaded) and data, on ``device``."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        data = load_data(cfg.data)
        model = build_model(cfg.model)
    finally:
        os.chdir(cwd)
    if device.type != "cpu":
        data = replace(
            data,
            train_x=data.train_x.to(device),
            train_y=data.train_y.to(device),
            eval_x=data.eval_x.to(device),
            eval_y=data.eval_y.to(device),
            hessian=[(x.to(device), y.to(device)) for x, y in data.hessian],
        )
    return model.to(device), data


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (BatchNorm statistics included), in order."""
    tensors = [*model.parameters(), *model.buffers()]
    return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)).hexdigest()


def settings_key(parts: dict) -> str:
    """A short key of the settings ``parts`` (JSON, sorted keys) plus the hawq version."""
    text = json.dumps({**parts, "hawq": hawq.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_analysis(model, data: DataBundle, cfg, cache_dir: Path, log) -> pa.Table:
    """``hawq.analyze`` of the float model, cached under a key of the settings that decide it."""
    key = settings_key(
        {
            "model": cfg.model.to_dict(),
            "data": cfg.data.to_dict(),
            "hessian": cfg.hessian.to_dict(),
            "weights": weights_digest(model),
        }
    )
    path = cache_dir / f"sensitivity-{key}.parquet"
    if path.exists():
        log(f"  Hessian analysis: cached {path}")
        return pq.read_table(path)
    table = hawq.analyze(
        model,
        loss_fn_for(cfg),
        data.hessian,
        cfg.hessian.to_hawq(),
        grouping=cfg.hessian.grouping,
        progress=False,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue())
    return table


# ----------------------------------------------------------------------------- allocations
def free_blocks(problem: Problem) -> np.ndarray:
    """Indices of the blocks the solver chooses bits for (not pinned)."""
    pairs = zip(problem.units, problem.unit_bits, strict=True)
    return np.array(sorted(i for u, b in pairs if len(b) > 1 for i in u), dtype=np.int64)


def permuted_sensitivity(problem: Problem, how: str, rng: np.random.Generator | None = None):
    """S with the free blocks' values ``"reversed"`` in rank, or ``"random"``-ly permuted."""
    s = problem.sensitivity.copy()
    free = free_blocks(problem)
    vals = problem.sensitivity[free]
    if how == "reversed":
        by_rank = free[np.argsort(-vals, kind="stable")]  # most sensitive first
        s[by_rank] = np.sort(vals)  # ... gets the smallest value
    elif how == "random":
        if rng is None:
            raise ValueError("a random permutation needs rng")
        s[free] = vals[rng.permutation(len(free))]
    else:
        raise ValueError(f"how must be 'reversed' or 'random', got {how!r}")
    return s


def solve_with(problem: Problem, config: AllocConfig, fake_s: np.ndarray | None) -> Allocation:
    """``config.method`` on ``problem`` (fake sensitivities S' if given); true total Omega.

    If no assignment of the method lies within ``config.size_tolerance`` of the target (the
    v1 rule can only use sizes its monotone sequences reach), the method's allocation without
    the lower size bound is returned; the caller reports its size and drops it from the
    same-size comparisons.
    """
    try:
        return _solve_with(problem, config, fake_s)
    except InfeasibleAllocation as exc:
        if config.size_tolerance is None:
            raise
        logger.warning("%s Using the allocation without the lower size bound.", exc)
        return _solve_with(problem, replace(config, size_tolerance=None), fake_s)


def _solve_with(problem: Problem, config: AllocConfig, fake_s: np.ndarray | None) -> Allocation:
    if fake_s is None:
        return allocate(problem, config)
    s = np.maximum(problem.sensitivity, np.finfo(np.float64).tiny)
    fake = replace(problem, omega=problem.omega * (fake_s / s)[:, None], sensitivity=fake_s)
    out = allocate(fake, config)
    bits = np.array([out.bits[b] for b in problem.blocks])
    return replace(out, total_omega=problem.total_omega(bits))


def uniform(problem: Problem, config: AllocConfig, bits: int) -> Allocation:
    """Every free block at ``bits`` (pins kept), no size limit."""
    ub = tuple(u if len(u) == 1 else (bits,) for u in problem.unit_bits)
    cfg = replace(
        config, compression=None, size_limit_mb=None, bops_limit=None, size_tolerance=None
    )
    return allocate(replace(problem, unit_bits=ub), cfg)
