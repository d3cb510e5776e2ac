"""Bring your own model, data and loss: the ``examples/own_model`` package through ``hawq run``.

The example (``blobs``: regress a blob's position, MSE loss, datasets drawn per item) runs end
to end on the local backend and its Hessian on two Ray data shards; the Ray rows equal the
local ones (float64). A broken import path fails at start-up with the fix; the streaming
DataLoader path yields exactly the batches of the in-memory tensor path.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tiny_run import REPO, hawq_cmd, subprocess_env
from torch.utils.data import TensorDataset

from hawq.metrics import batches
from pipeline.config import DataConfig
from pipeline.config.strict import ConfigError
from pipeline.data_factory import FactoryData, load_factory_data

EXAMPLE = REPO / "examples" / "own_model"
CONFIG = EXAMPLE / "config.yaml"
FAST = ("--set", "baseline.train_epochs=3", "--set", "hessian.dtype=float64")
sys.path.insert(0, str(EXAMPLE))  # the example package, for the independent checks here


def example_env() -> dict[str, str]:
    env = subprocess_env(RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(EXAMPLE), env.get("PYTHONPATH", "")])
    return env


def hawq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        hawq_cmd(*args), env=env or example_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("blobs") / "run"
    proc = hawq("-q", "run", str(CONFIG), "--run-dir", str(run_dir), *FAST)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def test_own_model_runs_end_to_end(local_run: Path) -> None:
    from blobs.data import make_datasets
    from blobs.model import make_model

    metrics = pq.read_table(local_run / "stages/evaluate/metrics.parquet").to_pylist()
    assert [r["phase"] for r in metrics][:2] == ["float", "ptq"] and metrics[-1]["phase"] == "final"
    assert all(math.isnan(r["eval_acc"]) for r in metrics)  # regression: no accuracy
    # The baseline's loss, recomputed independently: the saved weights on the example's own
    # eval set with a plain MSE (not hawq's evaluate, not the pipeline's data path).
    model = make_model(width=8)
    model.load_state_dict(load_file(local_run / "stages/baseline/model.safetensors"))
    model.eval()
    ds = make_datasets()["eval"]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        mse = float(torch.mean((model(x) - y) ** 2))
    assert metrics[0]["eval_loss"] == pytest.approx(mse, rel=1e-5)
    assert mse < 0.5 * float(y.var(0).mean())  # it learned the task (predicting 0: ~1/3)
    assert metrics[-1]["eval_loss"] < 2 * mse  # quantized at 5x, still close to float
    sens = pq.read_table(local_run / "stages/hessian/sensitivity.parquet").to_pylist()
    assert [r["block"] for r in sens] == ["conv1", "conv2", "head"]
    assert all(r["eigenvalue"] > 0 and r["trace"] > 0 for r in sens)


def test_own_model_hessian_on_ray_equals_local(local_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ray"
    ray = ("--set", "backend.kind=ray", "--set", "backend.data_shards=2")
    proc = hawq("-q", "run", str(CONFIG), "--run-dir", str(run_dir), *FAST, *ray,
                "--until", "hessian")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {
        name: pq.read_table(d / "stages/hessian/sensitivity.parquet").to_pylist()
        for name, d in (("local", local_run), ("ray", run_dir))
    }
    for a, b in zip(rows["local"], rows["ray"], strict=True):
        assert a["block"] == b["block"]
        for key in ("eigenvalue", "trace", "trace_stderr"):
            assert b[key] == pytest.approx(a[key], rel=1e-8), (a["block"], key)


def test_broken_factory_fails_at_start_up_with_the_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = hawq("run", str(CONFIG), "--run-dir", str(run_dir), "--set",
                "data.factory=nopkg.data:make")  # fmt: skip
    assert proc.returncode == 2
    assert (
        "data.factory: cannot import 'nopkg.data:make' (No module named 'nopkg'). "
        "Fix: pip install your package or add its directory to PYTHONPATH"
    ) in proc.stderr
    assert not run_dir.exists()
    env = subprocess_env()  # the example's directory is not on the path
    proc = hawq("run", str(CONFIG), "--run-dir", str(run_dir), env=env)
    assert proc.returncode == 2 and not run_dir.exists()
    assert "model.name: cannot import 'blobs.model:make_model' (No module named 'blobs')" in (
        proc.stderr
    )


def test_real_targets_need_a_loss(tmp_path: Path) -> None:
    proc = hawq("run", str(CONFIG), "--run-dir", str(tmp_path / "r"), "--set", "loss=null")
    assert proc.returncode == 2
    assert "loss: the targets are real values (torch.float32)" in proc.stderr
    assert "Fix: set loss: 'package.module:function'" in proc.stderr


def test_factory_must_return_datasets() -> None:
    with pytest.raises(ConfigError, match=r"data\.factory: blobs\.model:make_model returned "):
        load_factory_data(DataConfig(factory="blobs.model:make_model"))
    with pytest.raises(ConfigError, match=r"data\.hessian_samples: 512 exceeds the 128 items"):
        load_factory_data(DataConfig(factory="blobs.data:make_datasets"))
    with pytest.raises(ConfigError, match=r"data\.kwargs: blobs\.data:make_datasets rejected"):
        load_factory_data(DataConfig(factory="blobs.data:make_datasets", kwargs={"nope": 1}))


def test_streamed_batches_equal_the_tensor_path() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 1, 4, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
    data = FactoryData(
        name="t", train=TensorDataset(x, y), eval=TensorDataset(x, y), hessian=[],
        num_workers=0, location="t", fingerprint="t",
    )  # fmt: skip
    for seed in (0, 1):
        streamed = list(data.train_data(16)(torch.Generator().manual_seed(seed)))
        cut = list(batches((x, y), 16, torch.Generator().manual_seed(seed), True, False))
        assert len(streamed) == len(cut) == 4
        for (xa, ya), (xb, yb) in zip(streamed, cut, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    evald = list(data.eval_data(20)(torch.Generator()))
    assert torch.equal(torch.cat([b for b, _ in evald]), x)


def test_own_model_report_shows_the_loss(local_run: Path) -> None:
    from pipeline.report import plot_data, report
    from pipeline.store import RunStore

    text = report(local_run)
    assert (local_run / "report/report.html").exists() and "loss" in text
    d = plot_data(RunStore(local_run))["accuracy"]
    metrics = pq.read_table(local_run / "stages/evaluate/metrics.parquet").to_pylist()
    assert d.metric == "loss" and d.values == [r["eval_loss"] for r in metrics]
    assert d.ylim[0] <= min(d.values) and max(d.values) <= d.ylim[1]


def test_library_route_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "library.py")], env=example_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    float_loss = float(lines[0].split(":")[1])
    assert lines[1].startswith("bits {") and "'conv1': 8" in lines[1]
    quantized_loss = float(lines[1].rsplit(" ", 1)[1])
    assert quantized_loss < 2 * float_loss < 0.3
