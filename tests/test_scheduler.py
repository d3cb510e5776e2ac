"""Scheduler: stage keys follow the right settings; changed settings re-run exactly the stages
downstream of them (and say why); missing or corrupt outputs are handled; reverting a change
reproduces the original outputs bit for bit."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_run import assert_same_outputs, copy_of_finished_run, finished_run, write_config

from pipeline import scheduler
from pipeline.config import load_config
from pipeline.store import RunStore, StoreError

ORDER = ["baseline", "hessian", "allocate", "order", "finetune", "evaluate", "export"]


def _keys(cfg) -> dict[str, str]:
    return {k: v[0] for k, v in scheduler.stage_keys(cfg, "fp").items()}


def _changed(cfg, section: str, **values) -> list[str]:
    part = dataclasses.replace(getattr(cfg, section), **values)
    new = dataclasses.replace(cfg, **{section: part})
    a, b = _keys(cfg), _keys(new)
    return [s for s in ORDER if a[s] != b[s]]


def test_stage_keys_follow_their_settings(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml"))
    assert list(_keys(cfg)) == ORDER and len(set(_keys(cfg).values())) == len(ORDER)
    assert _changed(cfg, "baseline", lr=0.2) == ORDER
    assert _changed(cfg, "hessian", max_iter=11) == ORDER[1:]
    assert _changed(cfg, "allocation", compression=6.0) == ORDER[2:]
    assert _changed(cfg, "finetune", order="reverse") == ORDER[3:]
    assert _changed(cfg, "finetune", lr=0.02) == ORDER[4:]
    assert _changed(cfg, "backend", kind="ray", data_shards=2) == []  # same rows either way
    assert _changed(cfg, "run", torch_threads=2, name="other") == []
    other_fp = {k: v[0] for k, v in scheduler.stage_keys(cfg, "fp2").items()}
    assert [s for s in ORDER if other_fp[s] != _keys(cfg)[s]] == ORDER


def _mtimes(root: Path, stage: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (root / "stages" / stage).rglob("*")}


@pytest.mark.slow
def test_allocation_change_reruns_allocate_and_downstream_only(
    tmp_path: Path, tmp_path_factory, caplog
) -> None:
    original = finished_run(tmp_path_factory)
    run = copy_of_finished_run(tmp_path_factory, tmp_path / "run")
    before = {s: _mtimes(run, s) for s in ("baseline", "hessian")}
    rows_before = RunStore(run).read_manifest()
    caplog.set_level(logging.INFO, logger="pipeline.scheduler")

    cfg6 = load_config(write_config(tmp_path / "c6.yaml", {"allocation": {"compression": 6.0}}))
    outcome = scheduler.run(cfg6, run, progress=False)
    actions = {p.stage: (p.action, p.reason) for p in outcome.plan}
    assert [s for s in ORDER if actions[s][0] == "skip"] == ["baseline", "hessian"]
    assert actions["allocate"] == ("rerun", "settings changed: allocation.compression: 5.0 -> 6.0")
    assert actions["order"] == ("rerun", "upstream re-runs: allocate")
    assert actions["export"] == ("rerun", "upstream re-runs: finetune")
    assert list(outcome.seconds) == ORDER[2:]
    assert "baseline: skip (done" in caplog.text
    assert "allocate: rerun (settings changed: allocation.compression: 5.0 -> 6.0)" in caplog.text
    assert "finetune: rerun (upstream re-runs: order)" in caplog.text
    # baseline and hessian untouched, the rest recomputed under the new keys
    assert {s: _mtimes(run, s) for s in ("baseline", "hessian")} == before
    rows = RunStore(run).read_manifest()
    for s in ("baseline", "hessian"):
        assert rows[s] == rows_before[s]
    for s in ORDER[2:]:
        assert rows[s].key != rows_before[s].key and rows[s].status == "done"
    summary = pq.read_table(run / "stages/allocate/summary.parquet").to_pylist()[0]
    assert summary["weight_compression"] >= 6.0

    # nothing changed -> nothing runs
    again = scheduler.run(cfg6, run, progress=False)
    assert {p.action for p in again.plan} == {"skip"} and again.seconds == {}

    # back to the original setting -> identical to the original run, file by file
    cfg5 = load_config(write_config(tmp_path / "c5.yaml"))
    back = scheduler.run(cfg5, run, progress=False)
    assert list(back.seconds) == ORDER[2:]
    assert assert_same_outputs(original, run) >= 20


@pytest.mark.slow
def test_missing_or_corrupt_output(tmp_path: Path, tmp_path_factory) -> None:
    original = finished_run(tmp_path_factory)
    run = copy_of_finished_run(tmp_path_factory, tmp_path / "run")
    cfg = scheduler.load_run_config(run)

    # a done stage whose output is gone re-runs alone (its key, and so downstream, is unchanged)
    (run / "stages/order/order.parquet").unlink()
    rows, nxt = scheduler.status(run)
    assert nxt == "order" and [r.state for r in rows].count("done") == 6
    out = scheduler.run(cfg, run, progress=False)
    assert [(p.stage, p.reason) for p in out.plan if p.action != "skip"] == [
        ("order", "output order.parquet missing")
    ]

    # a truncated output stops the run before any work, naming the file and the fix ...
    sens = run / "stages/hessian/sensitivity.parquet"
    sens.write_bytes(sens.read_bytes()[:100])
    with pytest.raises(StoreError, match=f"{sens}: Parquet file is truncated or corrupt.*--repair"):
        scheduler.prepare(cfg, run)
    # ... and --repair deletes it and recomputes it from the per-block rows, bit for bit; a
    # corrupt per-block row of that stage is recomputed too
    block = run / "stages/hessian/blocks/0001.parquet"
    block.write_bytes(b"garbage")
    out = scheduler.resume(run, progress=False, repair=True)
    assert [(p.stage, p.reason) for p in out.plan if p.action != "skip"] == [
        ("hessian", "output sensitivity.parquet corrupt (repair)")
    ]
    assert assert_same_outputs(original, run) >= 20

    # a corrupt manifest under --repair: every stage recomputes, with identical results
    manifest = run / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-30])
    with pytest.raises(StoreError, match="manifest.parquet: Parquet file is truncated"):
        scheduler.resume(run, progress=False)
    out = scheduler.resume(run, progress=False, repair=True)
    assert list(out.seconds) == ORDER
    assert assert_same_outputs(original, run) >= 20


@pytest.mark.slow
def test_until_stops_after_the_named_stage(tmp_path: Path, tmp_path_factory) -> None:
    run = copy_of_finished_run(tmp_path_factory, tmp_path / "run")
    cfg = load_config(write_config(tmp_path / "lr.yaml", {"finetune": {"lr": 0.02}}))
    assert scheduler.run(cfg, run, progress=False, until="order").seconds == {}
    out = scheduler.run(cfg, run, progress=False, until="finetune")
    assert list(out.seconds) == ["finetune"]
    rows, nxt = scheduler.status(run)
    states = {r.stage: r.state for r in rows}
    assert states["finetune"] == "done" and states["evaluate"] == states["export"] == "stale"
    assert nxt == "evaluate"
