"""Run the stage DAG in a run directory: validate everything, plan, then execute.

``prepare`` checks the run dir, config, data, checkpoint and size target and computes every
stage's key, creating nothing; ``execute`` takes the run lock, removes temp files an earlier
kill left, and runs each stage whose key is not done in the manifest: a stage whose settings
changed re-runs together with everything downstream (its key hashes the upstream keys), and
the log says which setting changed. ``hawq resume DIR`` is ``run`` with ``DIR/config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hawq
from pipeline.atomic import (
    StoreError,
    atomic_write_json,
    atomic_write_text,
    check_file,
    pause_point,
)
from pipeline.config import ConfigError, RunConfig, config_to_yaml, load_config
from pipeline.data import DataBundle, load_data
from pipeline.data_factory import FactoryData
from pipeline.data_images import StreamingImages
from pipeline.run_log import LOG_FILE, log_to_file
from pipeline.run_summary import write_run_summary
from pipeline.stage_cache import StageCache
from pipeline.stages import STAGES, StageContext, stage_by_name
from pipeline.stages.base import Params, resolve_device
from pipeline.stages.parallel import check_world_size
from pipeline.store import RunStore
from pipeline.validate import (
    check_devices,
    check_extras,
    check_identity,
    check_imports,
    check_run_dir,
    identity_of,
    preflight,
)

log = logging.getLogger(__name__)

__all__ = [
    "Prepared",
    "RunOutcome",
    "StagePlan",
    "execute",
    "load_run_config",
    "prepare",
    "resume",
    "run",
    "stage_keys",
]


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What the scheduler will do with one stage, and why."""

    stage: str
    key: str
    params: Params
    action: str  # "skip" | "run" | "resume" | "rerun"
    reason: str
    clear: bool = False  # delete the stage's old outputs first (its key changed)


@dataclass(kw_only=True)
class Prepared:
    """A validated run: nothing has been written yet."""

    cfg: RunConfig
    store: RunStore
    data: DataBundle | FactoryData | StreamingImages
    device: torch.device
    plan: list[StagePlan]
    identity: dict[str, Any]
    corrupt: list[Path] = field(default_factory=list)  # deleted by execute (``repair``)


@dataclass(kw_only=True)
class RunOutcome:
    """What a run did: the plan and the seconds each executed stage took."""

    run_dir: Path
    plan: list[StagePlan]
    seconds: dict[str, float] = field(default_factory=dict)
    restored: list[str] = field(default_factory=list)  # stages taken from a stage cache


# --------------------------------------------------------------------------- keys and plans


def stage_keys(cfg: RunConfig, fingerprint: str) -> dict[str, tuple[str, Params]]:
    """Stage name -> (key, params): sha256 of (name, params, upstream keys, hawq version)."""
    out: dict[str, tuple[str, Params]] = {}
    for st in STAGES:
        params = st.params(cfg, fingerprint)
        blob = json.dumps(
            {
                "stage": st.name,
                "params": params,
                "upstream": {d: out[d][0] for d in st.deps},
                "version": hawq.__version__,
            },
            sort_keys=True,
            default=str,
        )
        out[st.name] = (hashlib.sha256(blob.encode()).hexdigest()[:16], params)
    return out


def _explain(old_json: str | None, new: Params, changed_upstream: list[str]) -> str:
    old = json.loads(old_json) if old_json else {}
    diffs = [
        f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diffs:
        return "settings changed: " + "; ".join(diffs)
    if changed_upstream:
        return "upstream re-runs: " + ", ".join(changed_upstream)
    return f"code version changed (hawq {hawq.__version__})"


def make_plan(
    store: RunStore, keys: dict[str, tuple[str, Params]], corrupt: Sequence[Path] = ()
) -> list[StagePlan]:
    """Compare each stage's key with the manifest: skip, run, resume or re-run.

    Files in ``corrupt`` count as missing (``execute`` deletes them first); a corrupt manifest
    counts as none (every stage re-runs).
    """
    manifest = {} if store.manifest_path in corrupt else store.read_manifest()
    plan: list[StagePlan] = []
    rerun: set[str] = set()
    for st in STAGES:
        key, params = keys[st.name]
        row = manifest.get(st.name)
        if row is None:
            leftovers = store.stage_dir(st.name).exists()
            p = StagePlan(
                stage=st.name, key=key, params=params, action="run", reason="not run yet",
                clear=leftovers,
            )  # fmt: skip
        elif row.key != key:
            ups = [d for d in st.deps if d in rerun]
            p = StagePlan(
                stage=st.name, key=key, params=params, action="rerun",
                reason=_explain(row.params, params, ups), clear=True,
            )  # fmt: skip
        elif row.status != "done":
            p = StagePlan(
                stage=st.name, key=key, params=params, action="resume",
                reason="interrupted; resuming from its saved progress",
            )  # fmt: skip
        else:
            folder = store.stage_dir(st.name)
            missing = [o for o in st.outputs if not (folder / o).exists()]
            broken = [o for o in st.outputs if folder / o in set(corrupt)]
            if missing or broken:
                why = [f"output {', '.join(missing)} missing"] if missing else []
                why += [f"output {', '.join(broken)} corrupt (repair)"] if broken else []
                p = StagePlan(
                    stage=st.name, key=key, params=params, action="rerun", reason="; ".join(why)
                )
            else:
                p = StagePlan(stage=st.name, key=key, params=params, action="skip", reason="done")
        if p.action != "skip" and p.clear:
            rerun.add(st.name)
        plan.append(p)
    return plan


def prepare(
    cfg: RunConfig, run_dir: str | os.PathLike | None = None, *, repair: bool = False
) -> Prepared:
    """Validate ``cfg`` against ``run_dir`` (default ``run.directory``); create nothing.

    A truncated or corrupt file in the run dir is an error naming it, unless ``repair``: then
    :func:`execute` deletes it and the stage that wrote it recomputes it.
    """
    root = Path(run_dir if run_dir is not None else cfg.run.directory)
    check_run_dir(root)
    check_extras(cfg)
    check_world_size(cfg)
    check_imports(cfg)
    store = RunStore(root)
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", "cuda is not available here; use 'cpu' or 'auto'")
    check_devices(cfg, device)
    from pipeline.config import check_paths

    check_paths(cfg)
    data = load_data(cfg.data, device)
    ident = identity_of(cfg, data)
    check_identity(store, ident)
    corrupt = _corrupt_files(store, repair)
    preflight(cfg, data, device)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=str(root)))
    plan = make_plan(store, stage_keys(cfg, data.fingerprint), corrupt)
    return Prepared(
        cfg=cfg, store=store, data=data, device=device, plan=plan, identity=ident, corrupt=corrupt
    )


def _corrupt_files(store: RunStore, repair: bool) -> list[Path]:
    """Truncated/corrupt run files: raise naming the first, or (``repair``) list them all."""
    found = []
    try:
        store.read_manifest()
    except StoreError:
        if not repair:
            raise
        found.append(store.manifest_path)
    for st in STAGES:
        for path in store.stage_files(st.name):
            try:
                check_file(path)
            except StoreError:
                if not repair:
                    raise
                found.append(path)
    return found


# --------------------------------------------------------------------------- execution


def execute(
    prep: Prepared,
    *,
    progress: bool = True,
    until: str | None = None,
    backend: Callable[[], Any] | None = None,
    stage_cache: StageCache | None = None,
) -> RunOutcome:
    """Run the plan under the run lock; ``until`` stops after that stage (a stage name).

    ``stage_cache`` (a sweep's): a stage whose key is cached is restored, not run; one that is
    not is claimed, run and published, so runs sharing the cache compute each key once.
    """
    from pipeline.backends import make_backend

    store, cfg = prep.store, prep.cfg
    store.create()
    outcome = RunOutcome(run_dir=store.root, plan=prep.plan)
    # resources: what a stage keeps for the rest of the run (a Ray cluster it started)
    with store.lock(), log_to_file(store.root / LOG_FILE), contextlib.ExitStack() as resources:
        store.remove_temp_files()
        for path in prep.corrupt:
            log.warning("repair: deleting corrupt %s (its stage recomputes it)", path)
            path.unlink(missing_ok=True)
        atomic_write_text(store.config_path, config_to_yaml(placement_free(cfg)))
        atomic_write_json(store.identity_path, prep.identity)
        last = len(prep.plan) if until is None else [p.stage for p in prep.plan].index(until) + 1
        todo = [p for p in prep.plan[:last] if p.action != "skip"]
        for p in prep.plan[:last]:
            if p.action == "skip":
                log.info("%s: skip (done, key %s)", p.stage, p.key)
            else:
                log.info("%s: %s (%s)", p.stage, p.action, p.reason)
        cache: dict[str, Any] = {}
        make = backend or (lambda: make_backend(cfg.backend, device=str(prep.device)))
        t_run = time.perf_counter()
        for i, p in enumerate(todo):
            st = stage_by_name(p.stage)
            if p.clear:
                store.forget([p.stage])
            store.mark_running(p.stage, p.key, json.dumps(p.params, sort_keys=True, default=str))
            log.info("[%d/%d] %s: %s", i + 1, len(todo), p.stage, st.summary)
            pause_point(f"{p.stage}:start")
            ctx = StageContext(
                cfg=cfg,
                store=store,
                stage=p.stage,
                key=p.key,
                data=prep.data,
                device=prep.device,
                progress=progress,
                backend=make,
                cache=cache,
                resources=resources,
            )
            t0 = time.perf_counter()
            claim = (
                stage_cache.claim(store, p.stage, p.key)
                if stage_cache is not None
                else contextlib.nullcontext(False)
            )
            with claim as restored:  # True: another run of a sweep computed this stage key
                if not restored:
                    st.run(ctx)
                    pause_point(f"{p.stage}:written")  # outputs on disk, manifest row not done
                store.mark_done(p.stage, p.key)
                if restored:
                    outcome.restored.append(p.stage)
                elif stage_cache is not None:
                    stage_cache.publish(store, p.stage, p.key)
            outcome.seconds[p.stage] = time.perf_counter() - t0
            log.info(
                "[%d/%d] %s done in %.1fs (%.0fs elapsed)",
                i + 1, len(todo), p.stage, outcome.seconds[p.stage], time.perf_counter() - t_run,
            )  # fmt: skip
            pause_point(f"{p.stage}:done")
        write_run_summary(store, cfg)
    return outcome


def placement_free(cfg: RunConfig) -> RunConfig:
    """``cfg`` without ``backend.address``: a Ray head lives only as long as its job, so the run
    dir never stores one (a later ``hawq resume`` starts its own Ray instead of dialling it)."""
    if cfg.backend.address is None:
        return cfg
    return dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, address=None))


def run(
    cfg: RunConfig,
    run_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    until: str | None = None,
    repair: bool = False,
    stage_cache: StageCache | None = None,
) -> RunOutcome:
    """Validate, then run every stage that is not done with its current key."""
    prep = prepare(cfg, run_dir, repair=repair)
    return execute(prep, progress=progress, until=until, stage_cache=stage_cache)


def load_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The config stored in a run dir (``StoreError`` if it is not a hawq run dir)."""
    root = Path(run_dir)
    store = RunStore(root)
    if not root.is_dir():
        raise StoreError(f"run dir {root} does not exist. Fix: check the path (see `hawq run`).")
    if not store.config_path.exists():
        raise StoreError(
            f"{root} is not a hawq run dir (no config.yaml). Fix: pass the directory "
            "`hawq run` created (runs/<name> by default)."
        )
    return load_config(store.config_path)


def resume(
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    until: str | None = None,
    repair: bool = False,
) -> RunOutcome:
    """``run`` with the config stored in ``run_dir``."""
    cfg = load_run_config(run_dir)
    return run(cfg, run_dir, progress=progress, until=until, repair=repair)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, kw_only=True)
class StageStatus:
    """One stage as ``hawq status`` shows it."""

    stage: str
    state: str  # done | running | interrupted | pending | stale
    seconds: float | None  # done: duration; running/interrupted: time since it started
    progress: str  # e.g. "3/10 blocks"
    summary: str


def status(run_dir: str | os.PathLike) -> tuple[list[StageStatus], str | None]:
    """Each stage's state from the run dir alone, and the stage that runs next (None: all done).

    ``stale`` = done under settings that differ from the stored config (it will re-run);
    ``interrupted`` = the manifest says running but no process holds the run lock.
    """
    cfg = load_run_config(run_dir)
    store = RunStore(Path(run_dir))
    fingerprint = ""
    if store.identity_path.exists():
        fingerprint = json.loads(store.identity_path.read_text())["data"]["fingerprint"]
    keys = stage_keys(cfg, fingerprint)
    manifest = store.read_manifest()
    locked = store.is_locked()
    now = time.time()
    rows, upstream_changed = [], False
    for st in STAGES:
        row = manifest.get(st.name)
        prog = store.read_progress(st.name)
        text = f"{prog['done']}/{prog['total']} {prog['unit']}" if prog else ""
        seconds = None
        if row is None:
            state = "pending"
        elif row.key != keys[st.name][0] or upstream_changed:
            state = "stale"
        elif row.status == "done":
            missing = [o for o in st.outputs if not (store.stage_dir(st.name) / o).exists()]
            state = "pending" if missing else "done"
            seconds = row.seconds
        else:
            state = "running" if locked else "interrupted"
            seconds = now - row.started
        upstream_changed = upstream_changed or state == "stale"
        rows.append(
            StageStatus(
                stage=st.name, state=state, seconds=seconds, progress=text, summary=st.summary
            )
        )
    nxt = next((r.stage for r in rows if r.state != "done"), None)
    return rows, nxt
