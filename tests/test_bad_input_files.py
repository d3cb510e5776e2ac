"""Bad input files fail first, with one line naming the file (and the tensor or key), exit 2.

- a config file that is not text (binary bytes) -> ``hawq run`` exits 2 naming the file;
- a checkpoint with NaN/Inf weights -> refused when loaded, naming the file and the tensor;
- ``hawq-slurm submit`` validates the config like ``hawq run`` (unknown keys, bad values,
  missing checkpoint/data paths) before anything is submitted, with and without ``--dry-run``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_run import REPO, hawq_cmd, subprocess_env, write_config

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.models import build_model, model_factory
from slurm import cli as slurm_cli

BINARY = bytes(range(256)) * 4  # not UTF-8 (0x80.. are continuation bytes without a lead)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and " WARNING " not in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_binary_config_is_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "model.bin"
    config.write_bytes(BINARY)
    with pytest.raises(ConfigError, match=r"model\.bin: not a text file"):
        load_config(config)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        hawq_cmd("-q", "run", str(config), "--run-dir", str(run_dir)),
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert line.startswith(f"hawq: error: {config}: not a text file")
    assert not run_dir.exists()


def _mlp_state() -> dict[str, torch.Tensor]:
    cfg = ModelConfig(name="mlp", in_channels=1, image_size=8, kwargs={"hidden": [32, 16]})
    return {k: v.clone() for k, v in model_factory(cfg)().state_dict().items()}


@pytest.mark.parametrize(
    ("suffix", "tensor", "value"),
    [(".pt", "fc2.weight", float("nan")), (".safetensors", "fc3.bias", float("-inf"))],
)
def test_nonfinite_checkpoint_is_refused_naming_file_and_tensor(tmp_path, suffix, tensor, value):
    state = _mlp_state()
    state[tensor][0] = value
    ckpt = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(state, ckpt)
    else:
        save_file(state, str(ckpt))
    cfg = ModelConfig(
        name="mlp", in_channels=1, image_size=8, kwargs={"hidden": [32, 16]}, checkpoint=str(ckpt)
    )
    with pytest.raises(ConfigError, match=rf"model\.checkpoint: '{ckpt}': tensor '{tensor}'"):
        build_model(cfg)
    state[tensor][0] = 0.0  # the same file with finite weights loads
    torch.save(state, ckpt) if suffix == ".pt" else save_file(state, str(ckpt))
    assert torch.equal(build_model(cfg).state_dict()[tensor], state[tensor])

    # the whole CLI: exit 2 before any work, one line naming the file and the tensor
    state[tensor][0] = value
    torch.save(state, ckpt) if suffix == ".pt" else save_file(state, str(ckpt))
    config = write_config(tmp_path / "tiny.yaml", {"model": {"checkpoint": str(ckpt)}})
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        hawq_cmd("-q", "run", str(config), "--run-dir", str(run_dir)),
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    assert str(ckpt) in line and repr(tensor) in line and "NaN or Inf" in line
    assert not run_dir.exists()


BAD_SUBMISSIONS = [
    (("--set", "hessian.methd=power"), "hessian.methd: unknown key"),
    (("--set", "allocation.candidate_bits=[1,4]"), "candidate_bits[0]: 1 is outside 2..8"),
    (("--set", "model.checkpoint=/nonexistent/r20.th"), "model.checkpoint: file"),
    (("--set", "data.name=cifar10", "--set", "data.path=/nonexistent/c10.npz",
      "--set", "model.in_channels=3", "--set", "model.image_size=32"), "data.path"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "message"), BAD_SUBMISSIONS, ids=lambda x: str(x)[:30])
@pytest.mark.parametrize("mode", ["--dry-run", "local"])
def test_slurm_submit_validates_the_config_first(tmp_path, capsys, sets, message, mode) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    folder = tmp_path / "jobs"
    argv = ["submit", str(config), "--run-dir", str(tmp_path / "run"), *sets]
    argv += ["--folder", str(folder / "%j")]
    argv += ["--dry-run"] if mode == "--dry-run" else ["--cluster", "local"]
    assert slurm_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no sbatch script printed, no "submitted job"
    assert err.startswith("hawq-slurm: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not folder.exists() and not (tmp_path / "run").exists()  # nothing was submitted


def test_slurm_submit_of_binary_config_is_one_line_error(tmp_path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(BINARY)
    argv = ["submit", str(config), "--run-dir", str(tmp_path / "run"), "--dry-run"]
    assert slurm_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"hawq-slurm: error: {config}: not a text file")
