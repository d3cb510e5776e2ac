"""Config settings that reach the engine (regressions fixed in 6c02275): each test fails if the
setting is silently dropped on its way from the YAML to hawq.

One tiny digits run (``pipeline.scheduler.run``) is shared; changing a finetune setting re-runs
only fine-tuning (the stage key), so each variant costs one QAT pass:

- ``finetune.schedule: step`` with ``step_size`` / ``gamma``: the per-epoch LR recorded in
  ``finetune/epochs.parquet`` is ``lr * gamma ** (epoch // step_size)``;
- ``finetune.alpha``: distillation with ``alpha = 0`` is ``(1 - 0) * CE`` exactly, so its
  training losses equal the plain cross-entropy run's bit for bit, and ``alpha = 0.5`` differs;
- ``hessian.patterns``: the sensitivity table has the blocks the patterns define, and a pattern
  matching no module is refused before any work.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_run import TINY, write_config

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.scheduler import run

LR = TINY["finetune"]["lr"]
EPOCHS = TINY["finetune"]["epochs_per_stage"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("settings")
    config = write_config(folder / "tiny.yaml", {"finetune": {"epochs_per_stage": 3}})
    run(load_config(config), folder / "run", progress=False, until="finetune")
    return config, folder / "run"


def finetune_epochs(config: Path, run_dir: Path, *sets: str) -> list[dict]:
    outcome = run(load_config(config, sets), run_dir, progress=False, until="finetune")
    actions = {p.stage: p.action for p in outcome.plan}
    assert actions["hessian"] == "skip"  # only fine-tuning depends on these settings
    table = pq.read_table(run_dir / "stages" / "finetune" / "epochs.parquet").to_pylist()
    rows = [r for r in table if r["phase"] == "finetune"]
    assert len(rows) == 3 * 3  # 3 QAT stages (one block each) x 3 epochs
    return rows


@pytest.mark.parametrize(("step_size", "gamma"), [(1, 0.5), (2, 0.25)])
def test_step_schedule_uses_step_size_and_gamma(base, step_size, gamma) -> None:
    config, run_dir = base
    sets = ("finetune.schedule=step", f"finetune.step_size={step_size}", f"finetune.gamma={gamma}")
    rows = finetune_epochs(config, run_dir, *sets)
    lrs = [r["lr"] for r in rows]
    want = [LR * gamma ** (r["epoch"] // step_size) for r in rows]
    assert [r["epoch"] for r in rows] == [0, 1, 2] * 3  # 0-based within each QAT stage
    assert lrs == pytest.approx(want, rel=1e-12)
    assert len(set(lrs)) > 1  # the LR really steps


def test_distillation_alpha_weighs_the_losses(base) -> None:
    config, run_dir = base
    ce = finetune_epochs(config, run_dir, "finetune.loss=ce")
    only_ce = finetune_epochs(config, run_dir, "finetune.loss=distill", "finetune.alpha=0")
    half = finetune_epochs(config, run_dir, "finetune.loss=distill", "finetune.alpha=0.5")
    assert [r["train_loss"] for r in only_ce] == [r["train_loss"] for r in ce]
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(half, ce, strict=True))


def test_hessian_patterns_define_the_blocks(base, tmp_path: Path) -> None:
    config, _ = base
    sets = ('hessian.patterns=[["fc[12]", "hidden"]]',)
    out = run(load_config(config, sets), tmp_path / "run", progress=False, until="hessian")
    assert [p.action for p in out.plan[:2]] == ["run", "run"]
    rows = pq.read_table(tmp_path / "run" / "stages" / "hessian" / "sensitivity.parquet")
    got = [(r["block"], r["modules"], r["n_params"]) for r in rows.to_pylist()]
    # 64 -> 32 -> 16 -> 10: fc1 2080 + fc2 528 parameters in one block, fc3 170 alone
    assert got == [("hidden", ["fc1", "fc2"], 2608), ("fc3", ["fc3"], 170)]


def test_pattern_matching_no_module_fails_before_any_work(base, tmp_path: Path, capsys) -> None:
    config, _ = base
    run_dir = tmp_path / "run"
    bad = 'hessian.patterns=[["conv.*", "convs"]]'
    with pytest.raises(ConfigError, match=r"hessian\.patterns: patterns matched no"):
        run(load_config(config, [bad]), run_dir, progress=False)
    assert main(["-q", "run", str(config), "--run-dir", str(run_dir), "--set", bad]) == 2
    assert "hessian.patterns" in capsys.readouterr().err
    assert not run_dir.exists()
