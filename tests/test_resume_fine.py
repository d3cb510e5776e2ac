"""Finer resume: Hutchinson probes persisted one by one; fine-tuning state every N steps.

A kill in the trace phase loses no finished probe; a kill mid-epoch resumes at the saved step
(data order included). The ground truth is an uninterrupted run of the same config: outputs
equal bit for bit (wall-clock columns aside).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import REPO, assert_same_outputs, hawq_cmd, subprocess_env, write_config

from hawq.hessian.table import HessianConfig, analyze
from pipeline.cli import main

WAIT_S = 240


def _kill_at(args: list[str], point: str, marker: Path) -> str:
    """Run the CLI until it pauses at ``point``; SIGKILL it; return its stderr."""
    marker.unlink(missing_ok=True)
    env = subprocess_env(HAWQ_TEST_PAUSE_AT=point, HAWQ_TEST_PAUSE_FILE=str(marker))
    proc = subprocess.Popen(hawq_cmd(*args), cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + WAIT_S
    try:
        while not (marker.exists() and marker.read_text()):
            if proc.poll() is not None:
                pytest.fail(f"hawq exited before {point}:\n{proc.communicate()[1].decode()}")
            assert time.monotonic() < deadline, f"hawq did not reach {point}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _quadratic_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model = model.double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (32,))
    return model, [(x[:16], y[:16]), (x[16:], y[16:])]


def test_analyze_reuses_saved_probes_bit_for_bit():
    model, batches = _quadratic_model()
    loss = torch.nn.functional.cross_entropy
    cfg = HessianConfig(max_iter=8, trace_max_probes=6, trace_min_probes=6, seed=3)
    saved: dict[int, dict[str, float]] = {}
    full = analyze(model, loss, batches, cfg, on_probe=saved.__setitem__, progress=False)
    assert sorted(saved) == list(range(6))
    again: list[int] = []
    partial = {p: saved[p] for p in (0, 1, 2)}
    resumed = analyze(
        model, loss, batches, cfg, probes=partial, on_probe=lambda p, v: again.append(p),
        progress=False,
    )  # fmt: skip
    assert again == [3, 4, 5]  # only the missing probes are computed
    assert resumed.drop_columns(["seconds"]).equals(full.drop_columns(["seconds"]))
    # a saved sample is really used: a changed one changes the trace
    poisoned = {**partial, 0: {b: v + 1.0 for b, v in partial[0].items()}}
    changed = analyze(model, loss, batches, cfg, probes=poisoned, progress=False)
    assert changed.column("trace").to_pylist() != full.column("trace").to_pylist()


@pytest.mark.slow
def test_kill_in_the_trace_phase_keeps_finished_probes(tmp_path):
    changes = {"hessian": {"trace_tol": 1e-9, "trace_max_probes": 5, "trace_min_probes": 2}}
    config = write_config(tmp_path / "tiny.yaml", changes)
    clean, killed, marker = tmp_path / "clean", tmp_path / "killed", tmp_path / "paused"
    assert main(["-q", "run", str(config), "--run-dir", str(clean)]) == 0
    _kill_at(["run", str(config), "--run-dir", str(killed)], "hessian:probe-saved:2", marker)
    probes = killed / "stages" / "hessian" / "probes"
    saved = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in probes.glob("*.parquet")}
    assert sorted(saved) == ["00000.parquet", "00001.parquet"]
    # resume; pause after its first new probe: the two finished ones were not rewritten
    err = _kill_at(["resume", str(killed)], "hessian:probe-saved:3", marker)
    assert "2 Hutchinson probe(s) already done" in err
    assert {p: (probes / p).stat().st_mtime_ns for p in saved} == {
        p: v[0] for p, v in saved.items()
    }
    assert sorted(p.name for p in probes.glob("*.parquet")) == [*sorted(saved), "00002.parquet"]
    assert main(["-q", "resume", str(killed)]) == 0
    assert not probes.exists()  # gone once the table is written
    assert assert_same_outputs(clean, killed) >= 20


@pytest.mark.slow
def test_kill_mid_epoch_resumes_at_the_saved_step(tmp_path, tmp_path_factory):
    """State every 3 steps (10 steps per epoch); killed after step 6 of global epoch 3, the run
    resumes at step 6 and ends with the weights of a run that never saved mid-epoch."""
    from tiny_run import finished_run

    config = write_config(tmp_path / "tiny.yaml", {"finetune": {"checkpoint_every_steps": 3}})
    killed, marker = tmp_path / "killed", tmp_path / "paused"
    _kill_at(["run", str(config), "--run-dir", str(killed)], "finetune:step:3:6", marker)
    state = killed / "stages" / "finetune" / "state.safetensors"
    from safetensors import safe_open

    with safe_open(str(state), "pt") as fh:
        meta = json.loads(fh.metadata()["qat"])
    assert (meta["global_epoch"], meta["partial"]["step"]) == (2, 6)
    assert len(meta["history"]) == 2  # epochs 1 and 2 finished; epoch 3 six steps in
    # resume, and stop at the next save: 3 steps later in the same epoch (not from its start)
    err = _kill_at(["resume", str(killed)], "finetune:step:*", marker)
    assert "resuming training after stage 2 epoch 0, 6 steps into the next" in err
    assert marker.read_text() == "finetune:step:3:9"
    assert main(["-q", "resume", str(killed)]) == 0
    clean = tmp_path / "clean"
    assert main(["-q", "run", str(config), "--run-dir", str(clean)]) == 0
    assert assert_same_outputs(clean, killed) >= 20
    # and saving mid-epoch changes nothing: the weights of a run that never did
    never = finished_run(tmp_path_factory) / "stages"
    for rel in ("finetune/model.safetensors", "export/model_int.safetensors"):
        assert _tensors(never / rel) == _tensors(killed / "stages" / rel), rel


def _tensors(path: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}


def test_preemption_waits_for_the_training_loop_to_save():
    """Inside a training loop a preemption handler waits for the next save (``safe_point``);
    outside one it runs at once."""
    from pipeline import preempt

    ran: list[str] = []
    preempt.defer_or_run(lambda: ran.append("outside"))
    assert ran == ["outside"] and not preempt.requested()
    with preempt.deferrable():
        preempt.defer_or_run(lambda: ran.append("in a step"))
        assert ran == ["outside"] and preempt.requested()  # waits for the step boundary
        with preempt.safe_point():  # the state was just saved: proceed
            assert ran == ["outside", "in a step"] and not preempt.requested()
            preempt.defer_or_run(lambda: ran.append("while saved"))
            assert ran[-1] == "while saved"
        preempt.defer_or_run(lambda: ran.append("later"))
        assert ran[-1] == "while saved"
        preempt.proceed()
    assert ran == ["outside", "in a step", "while saved", "later"]


PREEMPTED = """
import os, signal, sys
from slurm.launch import _defer_preemption_in_training
from pipeline.cli import main

def scheduler_handler(signum, frame):  # stands in for submitit's checkpoint + requeue + exit
    print("preempted", flush=True)
    os._exit(7)

signal.signal(signal.SIGUSR2, scheduler_handler)
_defer_preemption_in_training()
sys.exit(main(["-q", "run", sys.argv[1], "--run-dir", sys.argv[2]]))
"""


@pytest.mark.slow
def test_usr2_mid_step_saves_the_state_first_then_preempts(tmp_path, tmp_path_factory):
    """USR2 during step 5 of global epoch 2 (no periodic saves): the job's handler is deferred,
    the state is written after that step, then the scheduler's handler runs; the resumed run
    starts at step 5 and ends with the weights of a run never interrupted."""
    from tiny_run import finished_run

    config = write_config(tmp_path / "tiny.yaml")
    killed, marker = tmp_path / "killed", tmp_path / "signalled"
    env = subprocess_env(HAWQ_TEST_SIGNAL_AT="finetune:step:2:5", HAWQ_TEST_PAUSE_FILE=str(marker))
    proc = subprocess.run(
        [sys.executable, "-c", PREEMPTED, str(config), str(killed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert proc.returncode == 7 and proc.stdout == "preempted\n", proc.stderr[-3000:]
    assert marker.read_text() == "finetune:step:2:5"
    assert "preemption requested: saving the training state at the next step" in proc.stderr
    from safetensors import safe_open

    with safe_open(str(killed / "stages/finetune/state.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["qat"])
    assert (meta["global_epoch"], meta["partial"]["step"]) == (1, 5)
    assert main(["-q", "resume", str(killed)]) == 0
    assert assert_same_outputs(finished_run(tmp_path_factory), killed) >= 20
