"""Bad input fails before any work with exit code 2, one line naming the problem and the fix,
no traceback, and no new (or changed) files anywhere under the test's directory."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from jpeg_folder import corrupt_jpeg, make_imagefolder
from tiny_run import REPO, copy_of_finished_run, hawq_cmd, subprocess_env, write_config

from pipeline.backends.ray.config import available_cpus
from pipeline.cli import main

Setup = Callable[[Path, object], list[str]]


def _cfg(tmp: Path, changes: dict) -> str:
    return str(write_config(tmp / "bad.yaml", changes))


def _run(tmp: Path, changes: dict) -> list[str]:
    return ["run", _cfg(tmp, changes), "--run-dir", str(tmp / "run")]


def _raw_yaml(tmp: Path, text: str) -> list[str]:
    good = Path(_cfg(tmp, {})).read_text()
    (tmp / "bad.yaml").write_text(good + text)
    return ["run", str(tmp / "bad.yaml"), "--run-dir", str(tmp / "run")]


def _corrupt_checkpoint(tmp: Path, _f) -> list[str]:
    (tmp / "bad.pt").write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    return _run(tmp, {"model": {"checkpoint": str(tmp / "bad.pt")}})


def _truncated_parquet(tmp: Path, factory) -> list[str]:
    run = copy_of_finished_run(factory, tmp / "old")
    path = run / "stages/allocate/bits.parquet"
    path.write_bytes(path.read_bytes()[:-20])
    return ["resume", str(run)]


def _other_model(tmp: Path, factory) -> list[str]:
    run = copy_of_finished_run(factory, tmp / "old")
    changes = {"model": {"kwargs": {"hidden": [16]}}}
    return ["run", _cfg(tmp, changes), "--run-dir", str(run)]


def _other_data(tmp: Path, factory) -> list[str]:
    run = copy_of_finished_run(factory, tmp / "old")
    return ["run", _cfg(tmp, {"data": {"seed": 1}}), "--run-dir", str(run)]


def _under_file(tmp: Path, _f) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["run", _cfg(tmp, {}), "--run-dir", str(tmp / "afile" / "run")]


def _corrupt_jpeg(tmp: Path, _f) -> list[str]:
    root = make_imagefolder(tmp / "images", 12, 6)
    corrupt_jpeg(root / "train" / "class1" / "img00004.jpg")
    data = {"name": "imagefolder", "path": str(root), "image_size": 8, "resize": 8,
            "train_size": None, "eval_size": None, "hessian_samples": 12}  # fmt: skip
    return _run(tmp, {"model": {"in_channels": 3, "num_classes": 3}, "data": data})


def _pack_into_taken_dir(tmp: Path, _f) -> list[str]:
    root = make_imagefolder(tmp / "images", 3, 3)
    (tmp / "taken").mkdir()
    (tmp / "taken" / "old.parquet").write_bytes(b"x")
    return ["pack-data", str(root), str(tmp / "taken")]


def _foreign_dir(tmp: Path, _f) -> list[str]:
    (tmp / "photos").mkdir()
    (tmp / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return ["run", _cfg(tmp, {}), "--run-dir", str(tmp / "photos")]


# id -> (setup, substrings of the message: the problem ... and the fix)
CASES: dict[str, tuple[Setup, list[str]]] = {
    "unknown key": (
        lambda t, f: _raw_yaml(t, "  bogus_key: 3\n"),
        ["backend.bogus_key: unknown key", "valid keys under backend: kind"],
    ),
    "wrong type": (
        lambda t, f: _run(t, {"baseline": {"train_epochs": "two"}}),
        ["baseline.train_epochs", "expected int, got str 'two'"],
    ),
    "missing data path": (
        lambda t, f: _run(
            t,
            {
                "data": {"name": "cifar10", "path": str(t / "nope.npz"), "eval_size": None},
                "model": {"in_channels": 3, "image_size": 32},
            },
        ),
        ["data.path", "nope.npz' does not exist", "fix data.path"],
    ),
    "bits outside 2..8": (
        lambda t, f: _run(t, {"allocation": {"candidate_bits": [2, 9]}}),
        ["allocation.candidate_bits[1]: 9 is outside 2..8"],
    ),
    "infeasible size target": (
        lambda t, f: _run(t, {"allocation": {"candidate_bits": [4, 8], "compression": 40.0}}),
        ["compression 40.0x is infeasible", "lower compression to <= 8"],
    ),
    "hessian memory budget below one batch's graph": (
        lambda t, f: _run(t, {"hessian": {"memory_budget_mb": 0.05}}),
        [
            "hessian.memory_budget_mb: 0.05 cannot hold one Hessian batch's first-order graph",
            "for a batch of 64",
            "Fix: lower data.hessian_batch_size to <= ",
            "or raise hessian.memory_budget_mb to >= ",
        ],
    ),
    "ray per-actor memory budget below one batch's graph": (
        lambda t, f: _run(t, {"backend": {"kind": "ray", "memory_budget_mb": 0.001}}),
        ["backend.memory_budget_mb: 0.001 cannot hold", "raise backend.memory_budget_mb to >= "],
    ),
    "unknown model": (
        lambda t, f: _run(t, {"model": {"name": "resnet999"}}),
        ["model.name: 'resnet999' is not a model", "use one of cifar_resnet20"],
    ),
    "corrupt checkpoint": (
        _corrupt_checkpoint,
        ["model.checkpoint", "bad.pt' could not be read", "must be a state dict"],
    ),
    "truncated parquet in run dir": (
        _truncated_parquet,
        ["stages/allocate/bits.parquet: Parquet file is truncated or corrupt", "--repair"],
    ),
    "run dir of another model": (
        _other_model,
        ["was made for another model or dataset: model.kwargs", "pass a new --run-dir"],
    ),
    "run dir of another dataset": (
        _other_data,
        ["was made for another model or dataset: data digits-", "pass a new --run-dir"],
    ),
    "unwritable run dir": (
        lambda t, f: ["run", _cfg(t, {}), "--run-dir", "/proc/hawq-test-run/x"],
        ["run dir /proc/hawq-test-run/x is not writable", "writable location"],
    ),
    "run dir under a file": (
        _under_file,
        ["cannot be created", "afile is not a directory", "writable location"],
    ),
    "run dir holds other files": (
        _foreign_dir,
        ["is not empty and holds no hawq run", "new or empty directory"],
    ),
    "corrupt JPEG in an ImageFolder": (
        _corrupt_jpeg,
        ["data.path:", "img00004.jpg' could not be read or decoded", "data.bad_images: skip"],
    ),
    "pack-data into a non-empty folder": (
        _pack_into_taken_dir,
        ["OUT_DIR", "taken' exists and is not empty", "pass a new folder"],
    ),
    "resume of a non-run": (
        lambda t, f: ["resume", str(t)],
        ["is not a hawq run dir (no config.yaml)", "pass the directory `hawq run` created"],
    ),
    "status of a missing dir": (
        lambda t, f: ["status", str(t / "missing")],
        ["missing does not exist", "check the path"],
    ),
    "unknown --until stage": (
        lambda t, f: [*_run(t, {}), "--until", "polish"],
        ["--until 'polish' is not a stage", "use one of baseline, hessian"],
    ),
    "world size larger than the cluster's CPUs": (
        lambda t, f: _run(t, {"distributed": {"world_size": available_cpus() + 1}}),
        [
            f"distributed.world_size: {available_cpus() + 1} workers x 1 CPU",
            f"the cluster has {available_cpus()}",
            "Fix: lower distributed.world_size",
        ],
    ),
    "malformed --set": (
        lambda t, f: [*_run(t, {}), "--set", "allocation.compression"],
        ["override 'allocation.compression'", "must look like 'section.key=value'"],
    ),
}

if not torch.cuda.is_available():  # with a GPU these configs are valid
    CASES["fp16 with run.device auto and no GPU"] = (
        lambda t, f: _run(t, {"run": {"device": "auto"}, "precision": {"amp": "fp16"}}),
        ["precision.amp: 'fp16' needs CUDA but run.device 'auto' found none here", "bf16"],
    )
    CASES["GPU Hessian actors without GPUs"] = (
        lambda t, f: _run(t, {"backend": {"kind": "ray", "gpus_per_actor": 0.5}}),
        ["backend.gpus_per_actor: 1 x 1 Hessian actors x 0.5 GPU need 0.5 GPUs", "has 0"],
    )


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(
    case: str, tmp_path: Path, tmp_path_factory, monkeypatch, capsys
) -> None:
    setup, expected = CASES[case]
    monkeypatch.chdir(tmp_path)  # anything written relative to the cwd would show up below
    argv = setup(tmp_path, tmp_path_factory)
    before = _tree(tmp_path)
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("hawq: error: ") and "\n" not in err, err
    assert len(err) < 600 and "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert captured.out == ""
    assert _tree(tmp_path) == before  # no new, deleted or rewritten files
    assert not Path("/proc/hawq-test-run").exists()


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    argv = _run(tmp_path, {"allocation": {"candidate_bits": [2, 9]}})
    before = _tree(tmp_path)
    proc = subprocess.run(
        hawq_cmd(*argv), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hawq: error: ")
    assert "Traceback" not in proc.stderr and "9 is outside 2..8" in proc.stderr
    assert _tree(tmp_path) == before
    usage = subprocess.run(
        hawq_cmd("run"), cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )
    assert usage.returncode == 2 and "the following arguments are required: config" in usage.stderr
