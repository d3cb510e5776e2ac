"""Shared by the pipeline tests: a tiny real config (digits + MLP) and run-dir comparisons."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"seconds", "started", "finished", "pid", "host", "node"}  # + placement
SKIP = {"lock", "hawq.log"}  # not outputs: the run lock and the run's log (timestamps)

# 3 blocks (fc1..fc3); 2 baseline epochs; 3 QAT stages x 2 epochs; float64 Hessian.
TINY: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 0, "device": "cpu", "torch_threads": 1},
    "model": {
        "name": "mlp",
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 8,
        "kwargs": {"hidden": [32, 16]},
    },
    "data": {
        "name": "digits",
        "eval_size": 300,
        "train_size": 600,
        "hessian_samples": 128,
        "hessian_batch_size": 64,
        "batch_size": 256,
        "seed": 0,
    },
    "baseline": {"train_epochs": 2, "lr": 0.1, "batch_size": 64},
    "hessian": {
        "method": "lanczos",
        "max_iter": 10,
        "trace": True,
        "trace_tol": 0.2,
        "trace_max_probes": 4,
        "trace_min_probes": 2,
        "dtype": "float64",
    },
    "allocation": {
        "method": "ilp",
        "sensitivity": "trace",
        "candidate_bits": [2, 4, 8],
        "compression": 5.0,
        "pareto_points": 4,
    },
    "finetune": {"epochs_per_stage": 2, "blocks_per_stage": 1, "lr": 0.01, "batch_size": 64},
    "backend": {"kind": "local"},
}


def write_config(path: Path, changes: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write TINY (with ``{section: {key: value}}`` changes) as YAML to ``path``."""
    cfg = copy.deepcopy(TINY)
    for section, values in (changes or {}).items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def hawq_cmd(*args: str) -> list[str]:
    """The ``hawq`` CLI as a subprocess command (same interpreter, repo on the path)."""
    return [sys.executable, "-m", "pipeline.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"OMP_NUM_THREADS": "1", **extra})
    return env


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (relative), for 'no new files' checks."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if p.name.endswith(".tmp"))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _drop_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if k not in TIMING_COLUMNS}
    if isinstance(obj, list):
        return [_drop_timing(v) for v in obj]
    return obj


def _meta(value: str) -> Any:
    try:
        return _drop_timing(json.loads(value))
    except ValueError:
        return value


def _run_files(root: Path) -> set[str]:
    """A run dir's files, without ``SKIP`` and the Slurm launcher's ``slurm/`` folder."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in SKIP and p.relative_to(root).parts[0] != "slurm"
    }


def assert_same_outputs(a: Path, b: Path) -> int:
    """Every Parquet/safetensors/JSON/YAML file of run dir ``a`` equals ``b``'s, timing aside.

    Returns the number of files compared.
    """
    files_a, files_b = _run_files(a), _run_files(b)
    assert files_a == files_b, f"different files: {sorted(files_a ^ files_b)}"
    for rel in sorted(files_a):
        fa, fb = a / rel, b / rel
        if rel.endswith(".parquet"):
            ta, tb = pq.read_table(fa), pq.read_table(fb)
            assert ta.schema.equals(tb.schema, check_metadata=True), rel
            cols = [c for c in ta.column_names if c not in TIMING_COLUMNS]
            ra, rb = ta.select(cols).to_pylist(), tb.select(cols).to_pylist()
            assert _same(ra, rb), f"{rel} differs:\n{ra}\n{rb}"
        elif rel.endswith(".safetensors"):
            with safe_open(str(fa), "pt") as x, safe_open(str(fb), "pt") as y:
                assert sorted(x.keys()) == sorted(y.keys()), rel
                for k in x.keys():  # noqa: SIM118
                    assert torch.equal(x.get_tensor(k), y.get_tensor(k)), f"{rel}: {k}"
                ma = {k: _meta(v) for k, v in (x.metadata() or {}).items()}
                mb = {k: _meta(v) for k, v in (y.metadata() or {}).items()}
                assert _same(ma, mb), f"{rel} metadata differs"
        elif rel == "config.yaml":
            ca, cb = yaml.safe_load(fa.read_text()), yaml.safe_load(fb.read_text())
            ca["run"].pop("run_dir"), cb["run"].pop("run_dir")
            assert ca == cb
        elif rel.endswith(".json"):
            assert json.loads(fa.read_text()) == json.loads(fb.read_text()), rel
        else:
            assert fa.read_bytes() == fb.read_bytes(), rel
    return len(files_a)


_FINISHED: dict[str, Path] = {}


def finished_run(tmp_path_factory) -> Path:
    """A finished run of TINY (made once per session, in-process); do not modify it."""
    if "run" not in _FINISHED:
        from pipeline.cli import main

        base = tmp_path_factory.mktemp("tiny-finished")
        cfg = write_config(base / "tiny.yaml")
        assert main(["-q", "run", str(cfg), "--run-dir", str(base / "run")]) == 0
        _FINISHED["run"] = base / "run"
    return _FINISHED["run"]


def copy_of_finished_run(tmp_path_factory, dest: Path) -> Path:
    """A private copy of :func:`finished_run` at ``dest``."""
    shutil.copytree(finished_run(tmp_path_factory), dest)
    return dest
