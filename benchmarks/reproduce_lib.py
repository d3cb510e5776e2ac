"""Shared by ``reproduce_cifar10.py`` (experiments) and ``reproduce_report.py`` (the doc).

Config, result types, statistics, allocation ablations, formatting."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hawq.allocate import Allocation, AllocConfig, Problem, allocate
from hawq.qat import EpochRecord, QATConfig

PAPER_ROWS = (
    # method, W bits, A bits, W-Comp, A-Comp, size (MB), top-1 (%)  (HAWQ v1, Table 1)
    ("Baseline (FP32), paper", "32", "32", "1.00x", "1.00x", "1.04", "92.37"),
    ("DNAS, paper", "MP", "4", "16.60x", "8.00x", "0.066", "92.00"),
    ("HAWQ, paper", "MP", "4", "13.11x", "8.00x", "0.083", "92.22"),
)
VARIANT_TEXT = {
    "hawq": "HAWQ (Hessian allocation)",
    "uniform4": "uniform 4-bit",
    "uniform2": "uniform 2-bit",
    "reversed": "HAWQ reversed",
    "random": "random allocation",
}
ORDER_TEXT = {"omega": "Omega descending (HAWQ)", "reverse": "reverse Omega", "random": "random"}


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One model/dataset: a pipeline config, its overrides, and which ablations to run."""

    name: str
    title: str
    config: str
    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...] = ("hawq", "uniform4", "uniform2", "reversed", "random")
    random_seeds: tuple[int, ...] = (0, 1, 2)
    orders: tuple[str, ...] = ("omega", "reverse", "random")

    def __post_init__(self) -> None:
        for v in self.variants:
            if v not in VARIANT_TEXT:
                raise ValueError(f"{self.name}: unknown variant {v!r}; valid: {list(VARIANT_TEXT)}")
        if "hawq" not in self.variants:
            raise ValueError(f"{self.name}: variants must include 'hawq'")
        for o in self.orders:
            if o not in ORDER_TEXT:
                raise ValueError(f"{self.name}: unknown order {o!r}; valid: {list(ORDER_TEXT)}")
        for key in ("overrides", "variants", "random_seeds", "orders"):
            object.__setattr__(self, key, tuple(getattr(self, key)))


@dataclass(frozen=True, kw_only=True)
class Smoke:
    """What ``--smoke`` changes: extra overrides, fewer variants/orders, the first experiment."""

    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...] = ("hawq", "uniform2")
    orders: tuple[str, ...] = ("omega", "reverse")


@dataclass(frozen=True, kw_only=True)
class ReproConfig:
    """The reproduction: experiments, output locations, thread count."""

    experiments: tuple[Experiment, ...]
    threads: int = 2
    doc: str = "docs/results.md"
    img_dir: str = "docs/img"
    note: str = ""  # a paragraph for the doc (e.g. which machine the config is sized for)
    smoke: Smoke = field(default_factory=Smoke)


def _strict(cls: type, raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(raw).__name__}")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")
    return dict(raw)


def load_repro_config(path: str | Path) -> ReproConfig:
    """Read the reproduction YAML strictly (unknown keys fail, naming the key)."""
    raw = _strict(ReproConfig, yaml.safe_load(Path(path).read_text()), str(path))
    exps = raw.get("experiments")
    if not isinstance(exps, list) or not exps:
        raise ValueError(f"{path}: experiments must be a non-empty list")
    raw["experiments"] = tuple(
        Experiment(**_strict(Experiment, e, f"experiments[{i}]")) for i, e in enumerate(exps)
    )
    s = _strict(Smoke, raw.get("smoke") or {}, "smoke")
    raw["smoke"] = Smoke(**{k: tuple(v) for k, v in s.items()})
    return ReproConfig(**raw)


def smoke_config(cfg: ReproConfig, out_dir: Path) -> ReproConfig:
    """The first experiment only, with the smoke overrides, writing under ``out_dir``."""
    e = cfg.experiments[0]
    exp = replace(
        e,
        overrides=(*e.overrides, *cfg.smoke.overrides),
        variants=cfg.smoke.variants,
        orders=cfg.smoke.orders,
        random_seeds=e.random_seeds[:1],
    )
    return replace(
        cfg, experiments=(exp,), doc=str(out_dir / "results.md"), img_dir=str(out_dir / "img")
    )


# ----------------------------------------------------------------------------- results
@dataclass
class Variant:
    """One quantized model: its allocation, order, sizes and accuracies."""

    name: str
    label: str
    alloc: Allocation
    order: str
    summary: dict[str, float]
    ptq_acc: float | None = None
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def acc(self) -> float:
        return self.history[-1].eval_acc if self.history else float("nan")


@dataclass
class ExperimentResult:
    """Everything the report needs about one experiment."""

    exp: Experiment
    overrides: tuple[str, ...]
    n_train: int
    n_eval: int
    n_hessian: int
    fp_acc: float
    fp_summary: dict[str, float]
    baseline_history: list[EpochRecord]
    sens: list[dict]
    variants: list[Variant]
    orders: list[Variant]
    parts: dict[str, float]
    qat: QATConfig
    target: float
    act_bits: int
    pinned: set[str]


# ----------------------------------------------------------------------------- stats
def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n <= 0:
        raise ValueError("n must be > 0")
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if correct == 0 else max(0.0, min(p, mid - half))
    hi = 1.0 if correct == n else min(1.0, max(p, mid + half))
    return lo, hi


class Clock:
    """Wall time per named part, and progress lines with an ETA."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}

    def part(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- allocation
def free_blocks(problem: Problem) -> list[int]:
    """Indices of the blocks whose bits the solver chooses (not pinned)."""
    units = zip(problem.units, problem.unit_bits, strict=True)
    return sorted(i for u, b in units if len(b) > 1 for i in u)


def reversed_sensitivity(problem: Problem) -> np.ndarray:
    """S with the free blocks' values reversed in rank: the least sensitive gets the largest."""
    s = problem.sensitivity.copy()
    free = np.array(free_blocks(problem))
    by_rank = free[np.argsort(-s[free], kind="stable")]
    s[by_rank] = np.sort(problem.sensitivity[free])
    return s


def random_sensitivity(problem: Problem, rng: np.random.Generator) -> np.ndarray:
    """S with the free blocks' values randomly permuted."""
    s = problem.sensitivity.copy()
    free = np.array(free_blocks(problem))
    s[free] = problem.sensitivity[free][rng.permutation(len(free))]
    return s


def ablation_allocation(problem: Problem, config: AllocConfig, fake_s: np.ndarray) -> Allocation:
    """The ILP allocation at ``config``'s limit when block i's curvature is ``fake_s[i]`` instead
    of S_i: Omega'_i(b) = Omega_i(b) fake_s_i / S_i (each block keeps its own ||Q_b(W)-W||^2).
    The ILP (not the monotone v1 rule) keeps the size at the budget for any order; the returned
    ``total_omega`` is the true (Hessian) Omega of the chosen bits."""
    s = np.maximum(problem.sensitivity, np.finfo(np.float64).tiny)
    fake = replace(problem, omega=problem.omega * (fake_s / s)[:, None], sensitivity=fake_s)
    return _true_omega(problem, allocate(fake, replace(config, method="ilp")), config)


def uniform_allocation(problem: Problem, config: AllocConfig, bits: int) -> Allocation:
    """Every free block at ``bits`` (pinned blocks keep their pins); no size limit."""
    ub = tuple(u if len(u) == 1 else (bits,) for u in problem.unit_bits)
    cfg = replace(config, compression=None, size_limit_mb=None, bops_limit=None)
    return _true_omega(problem, allocate(replace(problem, unit_bits=ub), cfg), config)


def _true_omega(problem: Problem, alloc: Allocation, config: AllocConfig) -> Allocation:
    cols = [problem.bits.index(alloc.bits[b]) for b in problem.blocks]
    total = float(problem.omega[np.arange(len(cols)), cols].sum())
    return replace(alloc, total_omega=total)


# ----------------------------------------------------------------------------- report
def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table_md(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def epochs_to_reach(accs: Sequence[float], target: float) -> int | None:
    """1-based index of the first epoch with accuracy >= target (None if never)."""
    for i, a in enumerate(accs):
        if a >= target:
            return i + 1
    return None


def fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
