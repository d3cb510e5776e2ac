"""The ``hawq`` CLI on a finished tiny run: run (all skipped), status, report tables + PNGs,
export (integer codes x scales reproduce the fine-tuned model's quantized weights)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_run import REPO, copy_of_finished_run, finished_run, hawq_cmd, subprocess_env

from hawq.quant import quantize_weight
from pipeline.cli import main
from pipeline.report import fmt, fmt_pm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path: Path, tmp_path_factory) -> Path:
    return copy_of_finished_run(tmp_path_factory, tmp_path / "run")


def test_run_again_skips_everything(run_dir: Path, tmp_path_factory, capsys) -> None:
    cfg = finished_run(tmp_path_factory).parent / "tiny.yaml"
    capsys.readouterr()
    assert main(["-q", "run", str(cfg), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()[3:10]]
    assert [ln[:2] for ln in lines] == [
        [s, "skip"]
        for s in ("baseline", "hessian", "allocate", "order", "finetune", "evaluate", "export")
    ]
    assert f"Next: hawq report {run_dir}" in out


def test_status_of_finished_run(run_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["-q", "status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "all stages done" in out
    assert "2/2 epochs" in out and "3/3 blocks" in out and "6/6 epochs" in out
    assert out.count(" done ") == 7


def test_report_tables_and_plots(run_dir: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    out_dir = tmp_path / "plots"
    assert main(["-q", "report", str(run_dir), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for title in ("Per-block sensitivity (S = trace / n)", "Allocation", "accuracy per phase"):
        assert title in out
    sens = pq.read_table(run_dir / "stages/hessian/sensitivity.parquet").to_pylist()
    bits = {
        r["block"]: r["bits"]
        for r in pq.read_table(run_dir / "stages/allocate/bits.parquet").to_pylist()
    }
    for row in sens:  # one line per block with its eigenvalue and bits
        line = next(ln for ln in out.splitlines() if ln.startswith(row["block"] + " "))
        assert float(line.split()[2]) == pytest.approx(row["eigenvalue"], rel=5e-4)
        assert f" {bits[row['block']]} " in line
    final = pq.read_table(run_dir / "stages/evaluate/metrics.parquet").to_pylist()[-1]
    assert final["phase"] == "final" and f"{final['eval_acc']:#.4g}" in out
    for name in ("sensitivity.png", "bits.png", "pareto.png", "accuracy.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert (out_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]


def test_export_integer_weights(run_dir: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "exported"
    capsys.readouterr()
    assert main(["-q", "export", str(run_dir), "--out", str(dest)]) == 0
    assert "Exported layers" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == [
        "bit_config.yaml",
        "layers.parquet",
        "model_int.safetensors",
    ]
    bit_config = yaml.safe_load((dest / "bit_config.yaml").read_text())
    alloc = pq.read_table(run_dir / "stages/allocate/bits.parquet").to_pylist()
    with safe_open(str(run_dir / "stages/finetune/model.safetensors"), "pt") as f:
        tuned = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(dest / "model_int.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "hawq.export/1"
        for row in alloc:
            (layer,) = row["modules"]
            b = row["bits"]
            assert bit_config["layers"][layer]["weight"] == b
            codes = f.get_tensor(f"{layer}.weight_int")
            scale = f.get_tensor(f"{layer}.weight_scale")
            assert int(f.get_tensor(f"{layer}.weight_bits")) == b
            qmax = 2 ** (b - 1) - 1
            assert codes.abs().max() <= qmax and codes.dtype == torch.int8
            # ground truth: the symmetric per-channel quantizer applied to the tuned weights
            expect = quantize_weight(tuned[f"{layer}.weight"], b, per_channel=True)
            assert torch.allclose(codes.float() * scale[:, None], expect, rtol=0, atol=1e-6)
            assert torch.equal(f.get_tensor(f"{layer}.bias"), tuned[f"{layer}.bias"])


# --------------------------------------------------------------------------- conventions


@pytest.mark.parametrize(
    ("argv", "level", "quiet"),
    [
        (["status", "D"], None, False),
        (["-v", "status", "D"], "DEBUG", False),
        (["status", "D", "-v"], "DEBUG", False),
        (["status", "D", "--log-level", "warning"], "WARNING", False),
        (["--log-level", "error", "status", "D", "-v"], "DEBUG", False),  # the later one wins
        (["-v", "status", "D", "-q"], "DEBUG", True),  # an option before is not reset
        (["-q", "report", "D", "--out", "P"], None, True),
    ],
)
def test_output_options_before_or_after_the_command(argv, level, quiet) -> None:
    from pipeline.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.log_level, args.quiet, args.run_dir) == (level, quiet, "D")


def test_run_options_after_the_config(run_dir: Path, tmp_path_factory, capsys) -> None:
    cfg = finished_run(tmp_path_factory).parent / "tiny.yaml"
    argv = ["run", str(cfg), "--run-dir", str(run_dir), "--set", "baseline.lr=0.1", "-q"]
    capsys.readouterr()
    assert main(argv) == 0  # the same value again: every stage skips
    assert capsys.readouterr().out.count(" skip ") == 7


def test_log_level_reaches_the_log(run_dir: Path) -> None:
    def stderr(*args: str) -> str:
        proc = subprocess.run(hawq_cmd(*args), capture_output=True, text=True, env=subprocess_env())
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "INFO hawq: status finished" in stderr("status", str(run_dir))
    assert stderr("status", str(run_dir), "-q") == ""
    assert stderr("--log-level", "ERROR", "status", str(run_dir)) == ""


@pytest.mark.parametrize("module", ["pipeline.cli", "slurm.cli"])
def test_version_is_the_packages(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    prog = "hawq" if module == "pipeline.cli" else "hawq-slurm"
    assert proc.returncode == 0 and proc.stdout.startswith(f"{prog} {version} (torch ")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.99, "0.9900"),
        (7.01, "7.010"),
        (1.0, "1.000"),
        (0.001661, "0.001661"),
        (7.122e-05, "7.122e-05"),
        (123.456, "123.5"),
        (999.96, "1000"),
        (123456.7, "123457"),
        (-0.5, "-0.5000"),
        (float("nan"), "-"),
        (None, "-"),
        (12, "12"),
    ],
)
def test_cell_numbers_have_four_significant_digits(value, text) -> None:
    assert fmt(value) == text


@pytest.mark.parametrize(
    ("value", "stderr", "text"),
    [
        (2.19, 0.2, "2.19 ± 0.20"),  # was "2.19 ± 0.2"
        (0.9166, 0.12, "0.92 ± 0.12"),
        (1234.5, 56.0, "1234 ± 56"),
        (12345.0, 1234.0, "12300 ± 1200"),
        (1.23e-7, 1.1e-8, "(1.23 ± 0.11)e-07"),
        (3.2e6, 4.1e4, "(3.200 ± 0.041)e+06"),
        (5.0, None, "5.000"),
    ],
)
def test_value_and_error_share_their_decimals(value, stderr, text) -> None:
    assert fmt_pm(value, stderr) == text


def test_report_trace_column_is_consistent(run_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["report", str(run_dir), "--out", str(run_dir / "plots"), "-q"]) == 0
    out = capsys.readouterr().out
    for row in pq.read_table(run_dir / "stages/hessian/sensitivity.parquet").to_pylist():
        line = next(ln for ln in out.splitlines() if ln.startswith(row["block"] + " "))
        value, pm, err = line.split()[3:6]
        assert pm == "±" and len(value.split(".")[-1]) == len(err.split(".")[-1])
        assert len(err.replace("0.", "").lstrip("0").replace(".", "")) == 2  # 2 significant
        half_unit = 0.5 * 10 ** -len(err.split(".")[-1]) if "." in err else 0.5
        assert abs(float(value) - row["trace"]) <= half_unit + 1e-12
        assert abs(float(err) - row["trace_stderr"]) <= half_unit + 1e-12
