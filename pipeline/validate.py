"""Checks that run before any work and create nothing: run dir, identity, model vs data, target.

Each failure is a :class:`~pipeline.config.ConfigError` or
:class:`~pipeline.atomic.StoreError` whose message names the problem and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from hawq.optional import EXTRAS, available, install_hint
from pipeline.atomic import StoreError
from pipeline.config import ConfigError, RunConfig, section_dict
from pipeline.data import DataBundle
from pipeline.data_factory import FactoryData
from pipeline.data_images import StreamingImages
from pipeline.store import LAUNCH_DIR, RunStore
from pipeline.user_code import check_imports

log = logging.getLogger(__name__)

__all__ = [
    "check_devices",
    "check_extras",
    "check_hessian_memory",
    "check_identity",
    "check_imports",
    "check_run_dir",
    "identity_of",
    "preflight",
]


def check_extras(cfg: RunConfig) -> None:
    """The optional dependencies the config needs are installed (the fix names hawq's extra)."""
    world = cfg.distributed.world_size
    needs = [
        ("backend.kind", cfg.backend.kind, "ray", cfg.backend.kind == "ray"),
        ("distributed.world_size", world, "ray", world > 1),
        ("data.name", cfg.data.name, "sklearn", cfg.data.name == "digits"),
        ("data.name", cfg.data.name, "PIL", cfg.data.name == "imagefolder"),
    ]
    for key, value, module, needed in needs:
        if needed and not available(module):
            dist = EXTRAS[module][0]
            raise ConfigError(key, f"{value!r} needs {dist}. Fix: {install_hint(module)}")


def check_devices(cfg: RunConfig, device: torch.device) -> None:
    """The resolved device can run ``precision.amp``, and a private Ray's GPUs can hold the
    Hessian actors (``backend.gpus_per_actor``; a joined cluster is checked when they start)."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    cfg.precision.check_device(device.type, bf16_supported=bf16)
    b = cfg.backend
    if b.kind != "ray" or not b.gpus_per_actor or b.address is not None:
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    shards = b.data_shards or 1  # unset: the backend picks at least one shard
    need = shards * b.block_groups * b.gpus_per_actor
    if need > have + 1e-9:
        raise ConfigError(
            "backend.gpus_per_actor",
            f"{shards} x {b.block_groups} Hessian actors x {b.gpus_per_actor:g} GPU need "
            f"{need:g} GPUs; this machine has {have}. Fix: lower backend.gpus_per_actor (a "
            "fraction shares a GPU), backend.data_shards or backend.block_groups, set it to 0 "
            "(CPU actors), or join a cluster with GPUs (backend.address)",
        )


def check_run_dir(root: Path) -> None:
    """The run dir must be a (new, empty or hawq) directory we can write; probe, leave nothing."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"run dir {root} is a file. Fix: pass --run-dir with a directory path.")
    store = RunStore(root)
    launcher_only = root.is_dir() and {p.name for p in root.iterdir()} <= {LAUNCH_DIR}
    if root.is_dir() and any(root.iterdir()) and not store.exists() and not launcher_only:
        raise StoreError(
            f"run dir {root} is not empty and holds no hawq run (no config.yaml). "
            "Fix: pass --run-dir with a new or empty directory."
        )
    probe_dir = root
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise StoreError(
            f"run dir {root} cannot be created: {probe_dir} is not a directory. "
            "Fix: pass --run-dir with a writable location."
        )
    fix = "Fix: pass --run-dir with a writable location."
    if probe_dir == root:  # existing dir: ask, touching nothing
        if not os.access(root, os.W_OK | os.X_OK):
            raise StoreError(f"run dir {root} is not writable. {fix}")
        return
    probe = probe_dir / f".hawq-probe-{uuid.uuid4().hex}.tmp"
    try:  # a real probe: permissions, read-only mounts and pseudo file systems alike
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(
            f"run dir {root} is not writable ({exc.strerror or exc} in {probe_dir}). {fix}"
        ) from None


def identity_of(cfg: RunConfig, data: DataBundle | FactoryData | StreamingImages) -> dict[str, Any]:
    """What a run dir is for: the model config and the data fingerprint."""
    return {
        "model": section_dict(cfg, "model"),
        "data": {"name": data.name, "location": data.location, "fingerprint": data.fingerprint},
    }


def check_identity(store: RunStore, ident: dict[str, Any]) -> None:
    """Refuse a run dir made for another model or dataset."""
    if not store.identity_path.exists():
        return
    try:
        old = json.loads(store.identity_path.read_text())
    except ValueError:
        raise StoreError(
            f"{store.identity_path} is corrupt. Fix: use a new --run-dir (or delete {store.root})."
        ) from None
    problems = []
    old_model, new_model = old.get("model", {}), ident["model"]
    for k in sorted(set(old_model) | set(new_model)):
        if old_model.get(k) != new_model.get(k):
            problems.append(f"model.{k} {old_model.get(k)!r} (now {new_model.get(k)!r})")
    old_fp, new_fp = old.get("data", {}).get("fingerprint"), ident["data"]["fingerprint"]
    if old_fp != new_fp:
        problems.append(f"data {old_fp} (now {new_fp})")
    if problems:
        raise StoreError(
            f"run dir {store.root} was made for another model or dataset: "
            + "; ".join(problems)
            + ". Fix: pass a new --run-dir for this config (or delete the old run dir)."
        )


def check_loss(cfg: RunConfig, out: torch.Tensor, target: torch.Tensor) -> None:
    """The task loss takes the model's output and the data's targets and gives a finite scalar."""
    from hawq.metrics import task_loss
    from pipeline.models import task_loss_fn

    fix = "fix the function" if cfg.loss else "set loss: 'package.module:function'"
    if cfg.loss is None and (target.is_floating_point() or target.is_complex()):
        raise ConfigError(
            "loss",
            f"the targets are real values ({target.dtype}), not class indices, so cross-entropy "
            f"does not apply. Fix: {fix} (see docs/own_model.md)",
        )
    try:
        value = task_loss(out, target, task_loss_fn(cfg))
    except Exception as exc:  # noqa: BLE001 - the user's function or a shape mismatch
        what = cfg.loss or "cross-entropy"
        raise ConfigError(
            "loss",
            f"{what} fails on the model's output {tuple(out.shape)} and the targets "
            f"{tuple(target.shape)} {target.dtype} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Fix: {fix}",
        ) from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.isfinite().all():
        raise ConfigError("loss", f"{cfg.loss} must return a finite scalar tensor, got {value!r}")


def preflight(
    cfg: RunConfig, data: DataBundle | FactoryData | StreamingImages, device: torch.device
) -> None:
    """Fail before any work: checkpoint, model vs data shapes, the loss, blocks, size target."""
    from hawq.blocks import partition_blocks
    from pipeline.models import build_model
    from pipeline.stages.allocate import check_feasibility

    model = build_model(cfg.model).to(device).eval()  # loads (and checks) the checkpoint
    example, target = data.hessian[0]
    example, target = example[:2].to(device), target[:2].to(device)
    try:
        with torch.no_grad():
            out = model(example)
    except RuntimeError as exc:
        raise ConfigError(
            "model",
            f"{cfg.model.name} cannot take the data's inputs {tuple(example.shape)} "
            f"({str(exc).splitlines()[0]}); check model.in_channels / image_size and data",
        ) from None
    if data.num_classes is not None and out.shape[-1] != data.num_classes:
        raise ConfigError(
            "model.num_classes",
            f"the model outputs {out.shape[-1]} classes but data has {data.num_classes}",
        )
    check_loss(cfg, out, target)
    patterns = [tuple(p) for p in cfg.hessian.patterns] or None
    try:  # the same blocks the hessian stage will use
        blocks = partition_blocks(model, grouping=cfg.hessian.grouping, patterns=patterns)
    except ValueError as exc:
        key = "hessian.patterns" if patterns else "hessian.grouping"
        raise ConfigError(key, str(exc)) from None
    if not blocks:
        raise ConfigError("model", f"{cfg.model.name} has no Conv/Linear layers to quantize")
    check_feasibility(cfg, model, blocks, example[:1])
    check_hessian_memory(cfg, model, blocks, (example, target))


def check_hessian_memory(cfg: RunConfig, model, blocks, example) -> None:
    """The Hessian memory budget holds one batch's first-order graph (measured on one sample)."""
    from hawq.hessian.memory import MemoryBudgetError, check_memory_budget, estimate_graph_memory
    from hawq.hessian.operator import HessianError
    from pipeline.models import loss_fn_for

    ray_budget = cfg.backend.kind == "ray" and cfg.backend.memory_budget_mb is not None
    key = "backend.memory_budget_mb" if ray_budget else "hessian.memory_budget_mb"
    budget_mb = cfg.backend.memory_budget_mb if ray_budget else cfg.hessian.memory_budget_mb
    if not budget_mb:  # null: no cap; 0: no caching on purpose
        return
    dtype = torch.float64 if cfg.hessian.dtype == "float64" else torch.float32
    x, y = example
    try:
        memory = estimate_graph_memory(model.to(dtype), loss_fn_for(cfg), (x.to(dtype), y), blocks)
    except (HessianError, RuntimeError) as exc:  # the hessian stage diagnoses these
        log.debug("hessian memory check skipped: %s", exc)
        return
    batch = min(cfg.data.hessian_batch_size, cfg.data.hessian_samples)
    try:
        check_memory_budget(memory, batch, budget_mb, key=key, batch_key="data.hessian_batch_size")
    except MemoryBudgetError as exc:
        raise ConfigError(key, str(exc).removeprefix(f"{key}=")) from None
