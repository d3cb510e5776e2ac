"""Load, override, validate and serialize :class:`RunConfig` (YAML is its strict serialization).

- Unknown keys fail and list the valid keys at that level; duplicate YAML keys fail.
- Wrong types fail (ints are accepted where floats are expected); ``1e-3`` reads as a float.
- Overrides are ``a.b=value`` strings, the value parsed as a YAML scalar or list
  (``allocation.candidate_bits=[2,4,8]``, ``model.checkpoint=null``). Below a mapping-typed key
  the rest of the path is one key: ``allocation.pin.layer1.0.conv1=8``.
- Every error is a :class:`ConfigError` naming the file (or override), the key path and the fix.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.run_config import RunConfig
from pipeline.config.strict import ConfigError, Section, join_path
from pipeline.data_sources import FASHION_MNIST_DIR

__all__ = [
    "apply_overrides",
    "check_paths",
    "config_from_dict",
    "config_to_yaml",
    "load_config",
    "section_dict",
]

logger = logging.getLogger(__name__)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-3`` as a float (as YAML 1.2 does)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key != "<<" and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError("", f"duplicate key {key!r} at line {line}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML: {exc}") from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file, apply ``a.b=value`` overrides, validate, return the config."""
    file = os.fspath(path)
    if not os.path.isfile(file):
        raise ConfigError("", "config file not found; check the path", file=file)
    try:
        raw = _parse_yaml(Path(file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"not a text file (byte {exc.start} is not UTF-8); pass a YAML config", file=file
        ) from None
    except OSError as exc:
        msg = f"cannot be read ({exc.strerror or exc}); check the file"
        raise ConfigError("", msg, file=file) from None
    except ConfigError as exc:
        raise exc.in_file(file) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"top level must be a mapping, got {type(raw).__name__}", file=file)
    cfg = config_from_dict(raw, source=file, overrides=overrides)
    logger.info("loaded config %s (%d overrides)", file, len(overrides))
    return cfg


def config_from_dict(
    data: Mapping[str, Any], *, source: str | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Validate a plain dict (as from YAML) into a :class:`RunConfig`; errors name ``source``."""
    raw = apply_overrides(data, overrides)
    try:
        return typing.cast(RunConfig, RunConfig.from_dict(raw))
    except ConfigError as exc:
        culprit = next((o for o in overrides if _is_prefix(o.partition("=")[0], exc.path)), None)
        where = source
        if culprit is not None:
            where = f"override {culprit!r}" + (f" (on {source})" if source else "")
        raise exc.in_file(where) from None


def _is_prefix(key: str, path: str) -> bool:
    dotted = re.sub(r"\[(\d+)\]", "", path).replace("['", ".").replace("']", "")
    return dotted == key or dotted.startswith(key + ".")


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``a.b=value`` override set; bad key paths fail early."""
    raw = copy.deepcopy(dict(data))
    for text in overrides:
        try:
            _apply_one(raw, text)
        except ConfigError as exc:
            raise exc.in_file(f"override {text!r}") from None
    return raw


def _apply_one(raw: dict[str, Any], text: str) -> None:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", "an override must look like 'section.key=value'")
    value = _parse_yaml(value_text) if value_text.strip() else None
    parts = key.split(".")
    node, tp, path = raw, RunConfig, ""
    for i, part in enumerate(parts):
        fields = tp.field_types()
        if part not in fields:
            where = f" under {path}" if path else ""
            raise ConfigError(
                join_path(path, part), f"unknown key; valid keys{where}: " + ", ".join(fields)
            )
        path = join_path(path, part)
        if i == len(parts) - 1:
            node[part] = value
            return
        child = _unwrap_optional(fields[part])
        rest = ".".join(parts[i + 1 :])
        if isinstance(child, type) and issubclass(child, Section):
            sub = node.get(part)
            if sub is None:
                sub = node[part] = {}
            if not isinstance(sub, dict):
                raise ConfigError(path, f"holds {sub!r}, not a mapping; fix the file first")
            node, tp = sub, child
        elif typing.get_origin(child) in (dict, Mapping):
            sub = node.get(part)
            node[part] = dict(sub) if isinstance(sub, Mapping) else {}
            node[part][rest] = value
            return
        else:
            raise ConfigError(path, f"is a value, not a section; set it with '{path}=...'")


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def section_dict(cfg: RunConfig, name: str) -> dict[str, Any]:
    """One section as a plain dict, e.g. ``section_dict(cfg, "allocation")``."""
    fields = RunConfig.field_types()
    if name not in fields:
        raise ConfigError(name, "unknown section; valid sections: " + ", ".join(fields))
    return typing.cast(Section, getattr(cfg, name)).to_dict()


def config_to_yaml(cfg: RunConfig) -> str:
    """YAML text that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def check_paths(cfg: RunConfig, *, source: str | None = None) -> None:
    """Fail before any work if ``model.checkpoint`` or ``data.path`` does not exist."""
    ckpt = cfg.model.checkpoint
    if ckpt is not None and not os.path.isfile(ckpt):
        raise ConfigError(
            "model.checkpoint",
            f"file {ckpt!r} not found (relative paths start at {os.getcwd()}); fix the path or "
            "set model.checkpoint=null",
            file=source,
        )
    data_path = cfg.data.path
    fix = "fix data.path"
    if cfg.data.name == "fashion_mnist":
        data_path = data_path or FASHION_MNIST_DIR
        fix = "run 'apt-get install -y dataset-fashion-mnist' or set data.path to the idx files"
    if data_path is not None and not os.path.exists(data_path):
        raise ConfigError("data.path", f"{data_path!r} does not exist; {fix}", file=source)
