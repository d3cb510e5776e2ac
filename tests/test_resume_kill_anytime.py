"""SIGKILL ``hawq run``/``hawq resume`` at arbitrary times, with the Ray backend and a float32
Hessian; the resumed run dir equals an uninterrupted one's (every Parquet, safetensors, JSON and
YAML file; wall-clock columns aside: see ``tiny_run.assert_same_outputs``).

Two chains, each SIGKILLing the whole process group (the CLI and the private Ray it started):

- at seeded random delays after start (wherever the process happens to be: imports, Ray start,
  baseline epochs, eigen blocks, Hutchinson probes, fine-tuning, ...), then ``hawq resume``;
- at pause points the built-in ones do not cover: during the Hutchinson phase (2 probes
  consumed), between the hessian stage's output and its manifest row, and during evaluate.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny_run import assert_same_outputs, hawq_cmd, subprocess_env, temp_files, write_config

from pipeline.cli import main
from pipeline.store import RunStore

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 240
RAY_FLOAT32 = {
    "hessian": {"dtype": "float32"},
    "backend": {"kind": "ray", "data_shards": 2, "cpus_per_actor": 0.5},
}


def _session(sid: int) -> list[str]:
    """Processes of session ``sid`` (the killed CLI's own and its Ray's)."""
    left = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text() if d.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
            left.append(f"{d.name} {stat[stat.index('(') + 1 : stat.rindex(')')]}")
    return left


class Cli:
    """One ``hawq`` process in its own session, killed with its whole process group."""

    def __init__(self, args: list[str], log: Path, **env: str) -> None:
        self.log = log
        with open(log, "w") as fh:
            self.proc = subprocess.Popen(
                hawq_cmd(*args), cwd=REPO, env=subprocess_env(**env), stdout=fh, stderr=fh,
                start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while (left := _session(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes of the killed run survived: {left}"

    def finished(self) -> bool:
        if self.proc.poll() is None:
            return False
        assert self.proc.returncode == 0, self.log.read_text()[-3000:]
        return True


def _next_args(config: Path, run_dir: Path) -> list[str]:
    """``hawq resume`` once the run dir holds a run, else ``hawq run`` again."""
    if RunStore(run_dir).exists():
        return ["-q", "resume", str(run_dir)]
    return ["-q", "run", str(config), "--run-dir", str(run_dir)]


def _kill_at(point: str, config: Path, run_dir: Path, tmp: Path) -> None:
    marker = tmp / "paused"
    marker.unlink(missing_ok=True)
    cli = Cli(_next_args(config, run_dir), tmp / f"{point}.log",
              HAWQ_TEST_PAUSE_AT=point, HAWQ_TEST_PAUSE_FILE=str(marker))  # fmt: skip
    deadline = time.monotonic() + WAIT_S
    try:
        while not (marker.exists() and marker.read_text()):
            assert not cli.finished(), f"hawq finished without reaching {point}"
            assert time.monotonic() < deadline, f"hawq did not reach {point} in {WAIT_S}s"
            time.sleep(0.05)
        assert marker.read_text() == point
    finally:
        cli.kill()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    """The config and its uninterrupted run (in-process; it starts and stops its own Ray)."""
    base = tmp_path_factory.mktemp("anytime")
    config = write_config(base / "tiny_ray.yaml", RAY_FLOAT32)
    assert main(["-q", "run", str(config), "--run-dir", str(base / "clean")]) == 0
    return config, base / "clean"


@pytest.mark.slow
def test_kills_at_random_times_then_resume_match_uninterrupted(clean, tmp_path: Path) -> None:
    config, clean_dir = clean
    run_dir = tmp_path / "killed"
    rng = random.Random(20260131)
    delays = [rng.uniform(2.0, 16.0) for _ in range(3)]
    outcomes = []
    for i, delay in enumerate(delays):
        cli = Cli(_next_args(config, run_dir), tmp_path / f"random{i}.log")
        try:
            cli.proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            outcomes.append("killed")
        else:
            outcomes.append("finished")
        finally:
            cli.kill()
        if outcomes[-1] == "finished":
            assert cli.finished()
            break
    assert outcomes[0] == "killed", (delays, outcomes)  # at least one kill really happened
    assert main(_next_args(config, run_dir)) == 0
    assert temp_files(run_dir) == []
    assert assert_same_outputs(clean_dir, run_dir) >= 20


@pytest.mark.slow
def test_kills_in_trace_between_output_and_manifest_and_in_evaluate(clean, tmp_path) -> None:
    config, clean_dir = clean
    run_dir = tmp_path / "killed"
    # during the Hutchinson phase: every eigen row on disk, 2 probes consumed
    _kill_at("hessian:probe:2", config, run_dir, tmp_path)
    rows = sorted(p.name for p in (run_dir / "stages/hessian/blocks").glob("*.parquet"))
    assert rows == ["0000.parquet", "0001.parquet", "0002.parquet"]
    assert not (run_dir / "stages/hessian/sensitivity.parquet").exists()
    # sensitivity.parquet written, the manifest row still says running
    _kill_at("hessian:written", config, run_dir, tmp_path)
    assert (run_dir / "stages/hessian/sensitivity.parquet").exists()
    assert RunStore(run_dir).read_manifest()["hessian"].status == "running"
    # mid-evaluate: float and PTQ accuracy computed, nothing written yet
    _kill_at("evaluate:ptq", config, run_dir, tmp_path)
    manifest = RunStore(run_dir).read_manifest()
    assert manifest["hessian"].status == manifest["finetune"].status == "done"
    assert manifest["evaluate"].status == "running"
    assert not (run_dir / "stages/evaluate/metrics.parquet").exists()
    assert main(["-q", "resume", str(run_dir)]) == 0
    assert temp_files(run_dir) == []
    assert assert_same_outputs(clean_dir, run_dir) >= 20
