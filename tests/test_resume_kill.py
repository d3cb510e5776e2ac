"""Kill ``hawq run`` with SIGKILL at five points, resume each time, compare with a clean run.

The test hook ``HAWQ_TEST_PAUSE_AT=<stage>:<point>`` makes the real CLI process write the point
to ``HAWQ_TEST_PAUSE_FILE`` and sleep there; the test then SIGKILLs it. One chain of processes:
kill inside baseline (after epoch 1 of 2), inside hessian (after block 1 of 3), between stages
(allocate done, order not started), inside finetune (after epoch 3 of 6) and inside export (a
temp file written, not yet renamed); each kill is followed by ``hawq status`` and ``hawq
resume``. The final run dir must equal an uninterrupted run's, timing columns aside, with no
temp files left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_run import (
    assert_same_outputs,
    finished_run,
    hawq_cmd,
    snapshot,
    subprocess_env,
    temp_files,
    write_config,
)

from pipeline.cli import main
from pipeline.store import MANIFEST, RunStore

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 240


def _run_until_pause(
    args: list[str], point: str, marker: Path, while_paused: Callable[[], None] | None = None
) -> tuple[int, str]:
    """Start the CLI, wait until it pauses at ``point``, run ``while_paused``, SIGKILL it."""
    marker.unlink(missing_ok=True)
    env = subprocess_env(HAWQ_TEST_PAUSE_AT=point, HAWQ_TEST_PAUSE_FILE=str(marker))
    proc = subprocess.Popen(
        hawq_cmd(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + WAIT_S
    try:
        while not (marker.exists() and marker.read_text()):
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"hawq exited ({proc.returncode}) before {point}:\n{err.decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"hawq did not reach {point} in {WAIT_S}s")
            time.sleep(0.05)
        assert marker.read_text() == point
        if while_paused is not None:
            while_paused()
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return proc.returncode, err.decode()


def _status(run_dir: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["-q", "status", str(run_dir)]) == 0
    return capsys.readouterr().out


def _state(status_text: str, stage: str) -> str:
    for line in status_text.splitlines():
        if line.startswith(stage + " "):
            return line.split()[1]
    raise AssertionError(f"{stage} not in:\n{status_text}")


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path: Path, tmp_path_factory, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml")
    killed, marker = tmp_path / "killed", tmp_path / "paused"
    clean = finished_run(tmp_path_factory)  # ground truth: the same config, never interrupted

    # 1. inside baseline: epoch 1 of 2 persisted, epoch 2 not started.
    _run_until_pause(["run", str(config), "--run-dir", str(killed)], "baseline:epoch:1", marker)
    text = _status(killed, capsys)
    assert _state(text, "baseline") == "interrupted" and "1/2 epochs" in text
    assert "next: baseline" in text

    # 2. inside hessian: resume baseline, then stop after the first block's row is on disk.
    def live_status() -> None:  # the paused process still holds the run lock
        text = _status(killed, capsys)
        assert _state(text, "hessian") == "running" and "running: hessian" in text

    _, err = _run_until_pause(["resume", str(killed)], "hessian:block:1", marker, live_status)
    assert "resuming training after epoch 1" in err
    text = _status(killed, capsys)
    assert _state(text, "baseline") == "done" and _state(text, "hessian") == "interrupted"
    assert "1/3 blocks" in text and "next: hessian" in text
    block0 = killed / "stages/hessian/blocks/0000.parquet"
    block0_bytes = block0.read_bytes()

    # 3. between stages: allocate marked done in the manifest, order not started.
    _, err = _run_until_pause(["resume", str(killed)], "allocate:done", marker)
    assert "1/3 blocks already done" in err
    assert block0.read_bytes() == block0_bytes  # the finished block was not recomputed
    text = _status(killed, capsys)
    assert _state(text, "allocate") == "done" and _state(text, "order") == "pending"
    assert "next: order" in text
    capsys.readouterr()  # a partial run reports what it has so far
    assert main(["-q", "report", str(killed), "--out", str(tmp_path / "partial")]) == 0
    out = capsys.readouterr().out
    assert "Per-block sensitivity" in out and "Allocation" in out and "Baseline" in out
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == [
        "bits.png",
        "pareto.png",
        "report.html",
        "sensitivity.png",
    ]

    # 4. inside finetune: QAT stage 2 of 3, after its first epoch (global epoch 3 of 6).
    _run_until_pause(["resume", str(killed)], "finetune:epoch:3", marker)
    text = _status(killed, capsys)
    assert _state(text, "finetune") == "interrupted" and "3/6 epochs" in text
    assert "next: finetune" in text

    # 5. inside export: the integer model's temp file is written but not yet renamed.
    _, err = _run_until_pause(["resume", str(killed)], "export:write:model_int.safetensors", marker)
    assert "resuming training after stage 2 epoch 1" in err
    tmps = temp_files(killed)
    assert len(tmps) == 1 and tmps[0].name.startswith(".model_int.safetensors.")
    text = _status(killed, capsys)
    assert _state(text, "evaluate") == "done" and _state(text, "export") == "interrupted"
    assert "next: export" in text

    # Finish without interruption (in-process: the five kills above were real processes).
    assert main(["-q", "resume", str(killed)]) == 0
    assert temp_files(killed) == []
    text = _status(killed, capsys)
    assert "all stages done" in text

    n = assert_same_outputs(clean, killed)
    assert n >= 20
    manifest = RunStore(killed).read_manifest()
    clean_manifest = RunStore(clean).read_manifest()
    assert {k: (r.key, r.status) for k, r in manifest.items()} == {
        k: (r.key, r.status) for k, r in clean_manifest.items()
    }
    assert (killed / MANIFEST).exists() and "lock" not in snapshot(killed)  # released
