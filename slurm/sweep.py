"""``hawq-slurm sweep``: one config over a grid of settings, as one Slurm job array.

``--set key=v1,v2,...`` (several allowed: their product) makes one point per combination; a
``--set`` with one value applies to every point. Point ``i`` runs in ``SWEEP/points/<i>-<name>``
as array task ``i`` (submitit ``batch``: ``<array id>_<i>``). All points share the stage cache
``SWEEP/cache`` (:mod:`pipeline.stage_cache`): a stage whose key is the same across points
(baseline and Hessian, when only the size target varies) is computed by one task and restored
by the others. On Slurm a summary job (``afterok`` on the array) writes ``SWEEP/summary.parquet``
(one row per point: its settings, size, compression, PTQ and final accuracy) and
``summary.png`` (accuracy vs size); elsewhere ``--wait`` writes them.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import submitit

from pipeline.atomic import atomic_write_bytes, atomic_write_json, atomic_write_parquet
from slurm.launch import LaunchError, make_executor, make_job
from slurm.launch_config import SlurmLaunchConfig
from slurm.run_record import new_record, record_job

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SUMMARY_SCHEMA = pa.schema(
    [
        ("point", pa.int64()),
        ("name", pa.string()),
        ("settings", pa.string()),  # JSON {key: value} of the swept keys
        ("run_dir", pa.string()),
        ("size_mb", pa.float64()),
        ("weight_compression", pa.float64()),
        ("ptq_acc", pa.float64()),
        ("final_acc", pa.float64()),
        ("float_acc", pa.float64()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    index: int
    name: str
    settings: dict[str, str]  # the swept keys' values
    overrides: tuple[str, ...]  # fixed + swept
    run_dir: str


def sweep_points(sets: Sequence[str], sweep_dir: Path) -> list[SweepPoint]:
    """The product of the ``key=v1,v2`` axes (``key=[...]`` and single values stay fixed)."""
    fixed, axes = [], []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {item!r} must look like key.path=v1,v2,...")
        values = [value] if value.startswith(("[", "{")) else value.split(",")
        if any(v == "" for v in values):
            raise ValueError(f"--set {item!r}: an empty value in the list")
        (axes if len(values) > 1 else fixed).append((key, values))
    if not axes:
        raise ValueError("a sweep needs at least one --set key=v1,v2,... with several values")
    points = []
    for i, combo in enumerate(itertools.product(*(vals for _, vals in axes))):
        settings = {key: v for (key, _), v in zip(axes, combo, strict=True)}
        name = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings.items())
        name = f"{i}-" + re.sub(r"[^A-Za-z0-9_.=-]+", "-", name)
        overrides = (*(f"{k}={v[0]}" for k, v in fixed), *(f"{k}={v}" for k, v in settings.items()))
        points.append(
            SweepPoint(
                index=i,
                name=name,
                settings=settings,
                overrides=overrides,
                run_dir=str(sweep_dir / "points" / name),
            )
        )
    return points


def submit_sweep(
    config_path: str | Path,
    sweep_dir: str | Path,
    sets: Sequence[str],
    launch_cfg: SlurmLaunchConfig | None = None,
) -> tuple[list[submitit.Job], submitit.Job | None]:
    """Submit every point as one job array; on Slurm also the summary job (``afterok``).

    Every point is validated first (config, run dir, allocation): nothing is submitted if one
    fails. Returns (the point jobs in point order, the summary job or None).
    """
    root = Path(sweep_dir).expanduser().absolute()
    cfg = (launch_cfg or SlurmLaunchConfig()).for_run_dir(root)
    points = sweep_points(sets, root)
    cache = str(root / "cache")
    for p in points:  # validate all before snapshotting any
        make_job(config_path, p.run_dir, p.overrides, cfg)
    jobs_fn = []
    for p in points:
        job = make_job(config_path, p.run_dir, p.overrides, cfg, snapshot=True)
        job.stage_cache = cache
        jobs_fn.append(job)
    executor = make_executor(cfg)
    try:
        with executor.batch():
            jobs = [executor.submit(fn) for fn in jobs_fn]
    except (submitit.core.utils.FailedSubmissionError, OSError) as err:
        raise LaunchError(f"submission of the sweep to {cfg.cluster} failed: {err}") from err
    for p, fn, job in zip(points, jobs_fn, jobs, strict=True):
        record_job(p.run_dir, new_record(job.job_id, cfg.cluster, str(cfg.folder),
                                         Path(fn.config_path), cfg.num_tasks))  # fmt: skip
    summary = None
    if cfg.cluster == "slurm":
        array = jobs[0].job_id.split("_")[0]
        one = replace(cfg, nodes=1, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0,
                      time_min=max(10, cfg.signal_delay_s // 60 + 5), requeue=False)  # fmt: skip
        summary_executor = make_executor(one)
        summary_executor.update_parameters(dependency=f"afterok:{array}")
        summary = summary_executor.submit(functools.partial(write_summary, str(root)))
    atomic_write_json(
        root / SWEEP_FILE,
        {
            "config": str(Path(config_path).absolute()),
            "points": [{**vars(p), "job_id": j.job_id} for p, j in zip(points, jobs, strict=True)],
            "summary_job": None if summary is None else summary.job_id,
        },
    )
    log.info("submitted %d points as %s", len(jobs), ", ".join(j.job_id for j in jobs))
    return jobs, summary


def _metrics(run_dir: Path) -> dict[str, Any]:
    from pipeline.atomic import read_parquet

    stages = run_dir / "stages"
    size = read_parquet(stages / "allocate" / "summary.parquet").to_pylist()[0]
    acc = {r["phase"]: r for r in read_parquet(stages / "evaluate" / "metrics.parquet").to_pylist()}
    return {
        "size_mb": size["size_mb"],
        "weight_compression": size["weight_compression"],
        "ptq_acc": acc.get("ptq", {}).get("eval_acc"),
        "final_acc": acc.get("final", {}).get("eval_acc"),
        "float_acc": acc.get("float", {}).get("eval_acc"),
    }


def write_summary(sweep_dir: str | Path) -> Path:
    """``summary.parquet`` (+ ``summary.png`` with matplotlib) from the finished points."""
    root = Path(sweep_dir)
    spec = json.loads((root / SWEEP_FILE).read_text())
    rows = []
    for p in spec["points"]:
        rows.append(
            {
                "point": p["index"],
                "name": p["name"],
                "settings": json.dumps(p["settings"], sort_keys=True),
                "run_dir": p["run_dir"],
                **_metrics(Path(p["run_dir"])),
            }
        )
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    path = root / "summary.parquet"
    atomic_write_parquet(path, table)
    for r in rows:
        log.info("%-32s size %.4g MB (x%.3g)  PTQ acc %.4f  final acc %.4f", r["name"],
                 r["size_mb"], r["weight_compression"], r["ptq_acc"], r["final_acc"])  # fmt: skip
    _plot(root / "summary.png", rows)
    return path


def _plot(path: Path, rows: list[dict]) -> None:
    from hawq.optional import available

    if not available("matplotlib"):
        log.warning("summary.png skipped: matplotlib is not installed")
        return
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = sorted(rows, key=lambda r: r["size_mb"])
    sizes = [r["size_mb"] for r in rows]
    ax.plot(sizes, [r["final_acc"] for r in rows], "o-", label="fine-tuned")
    ax.plot(sizes, [r["ptq_acc"] for r in rows], "s--", label="PTQ")
    for r in rows:
        ax.annotate(r["name"].split("-", 1)[1], (r["size_mb"], r["final_acc"]), fontsize=7)
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("accuracy")
    ax.set_title("Sweep: accuracy vs size")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
