"""hawq-slurm sweep without Slurm (submitit's debug executor): points, shared stages, summary.

The ground truth of every point is a separate ``hawq run`` of the same overrides; the shared
stage cache must change nothing but who computes a stage. The real job array runs in
tests/test_slurm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_run import assert_same_outputs, write_config

from pipeline.config import load_config
from pipeline.scheduler import run
from pipeline.stage_cache import StageCache
from slurm import cli
from slurm.launch import outcome
from slurm.launch_config import SlurmLaunchConfig
from slurm.run_record import recorded_jobs
from slurm.sweep import submit_sweep, sweep_points, write_summary


def test_points_are_the_product_of_the_swept_keys(tmp_path):
    sets = ["allocation.compression=4,8", "run.seed=1", "finetune.lr=0.1,0.01",
            "allocation.candidate_bits=[2,4,8]"]  # fmt: skip
    points = sweep_points(sets, tmp_path)
    assert [p.name for p in points] == [
        "0-compression=4_lr=0.1", "1-compression=4_lr=0.01",
        "2-compression=8_lr=0.1", "3-compression=8_lr=0.01",
    ]  # fmt: skip
    assert points[3].overrides == (
        "run.seed=1", "allocation.candidate_bits=[2,4,8]",
        "allocation.compression=8", "finetune.lr=0.01",
    )  # fmt: skip
    assert points[0].run_dir == str(tmp_path / "points" / "0-compression=4_lr=0.1")
    with pytest.raises(ValueError, match="at least one --set key=v1,v2"):
        sweep_points(["run.seed=1"], tmp_path)
    with pytest.raises(ValueError, match="an empty value"):
        sweep_points(["allocation.compression=4,"], tmp_path)


def test_sweep_computes_shared_stages_once_and_equals_separate_runs(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml")
    sweep_dir = tmp_path / "sweep"
    cfg = SlurmLaunchConfig(cluster="debug")
    jobs, summary = submit_sweep(config, sweep_dir, ["allocation.compression=4,6,8"], cfg)
    assert summary is None and len(jobs) == 3
    results = [outcome(j).result for j in jobs]  # the debug executor runs them in order
    assert results[0].restored == []
    for r in results[1:]:  # same baseline/hessian keys: restored from the first point's
        assert r.restored[:2] == ["baseline", "hessian"]
        assert "finetune" not in r.restored  # the size target changes everything after
    cache = StageCache(sweep_dir / "cache")
    hessian = [p for p in (sweep_dir / "cache" / "hessian").iterdir() if p.is_dir()]
    assert len(hessian) == 1  # one key, computed once
    assert cache.producer("hessian", hessian[0].name)["run_dir"].endswith("0-compression=4")
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    for p in points:
        alone = tmp_path / f"alone-{p['index']}"
        run(load_config(config, p["overrides"]), alone, progress=False)
        assert assert_same_outputs(alone, Path(p["run_dir"])) >= 20
        (record,) = recorded_jobs(p["run_dir"])
        assert record.cluster == "debug"
    path = write_summary(sweep_dir)
    rows = pq.read_table(path).to_pylist()
    assert [json.loads(r["settings"]) for r in rows] == [
        {"allocation.compression": c} for c in ("4", "6", "8")
    ]
    sizes = [r["size_mb"] for r in rows]
    assert sizes == sorted(sizes, reverse=True)  # more compression, smaller model
    assert all(0 <= r["final_acc"] <= 1 for r in rows)
    assert (sweep_dir / "summary.png").stat().st_size > 1000
    capsys.readouterr()
    argv = ["sweep", str(config), "--sweep-dir", str(tmp_path / "dry"), "--dry-run"]
    assert cli.main([*argv, "--set", "allocation.compression=4,6"]) == 0
    out = capsys.readouterr().out
    assert out.count("point ") == 2 and not (tmp_path / "dry").exists()
