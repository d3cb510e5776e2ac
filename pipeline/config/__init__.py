"""The run config: strict YAML <-> frozen kw-only dataclasses, ``--set`` overrides.

- :mod:`pipeline.config.strict`: ``ConfigError`` and the ``Section`` base (typed coercion,
  validators);
- one section per pipeline component, each with its conversion to its hawq config
  (``to_hawq``): :mod:`pipeline.config.inputs` (run, model, data), :mod:`.hessian` (hessian,
  backend), :mod:`.allocation`, :mod:`.training` (baseline, finetune), :mod:`.distributed`,
  :mod:`.precision`; :mod:`pipeline.config.run_config`: ``RunConfig`` (every section, the
  cross-section rules);
- :mod:`pipeline.config.loading`: reading YAML files, ``a.b=value`` overrides, path checks.
"""

from pipeline.config.allocation import AllocationSection
from pipeline.config.distributed import DistributedSection
from pipeline.config.hessian import BackendSection, HessianSection
from pipeline.config.inputs import DataConfig, ModelConfig, RunSection
from pipeline.config.loading import (
    check_paths,
    config_from_dict,
    config_to_yaml,
    load_config,
    section_dict,
)
from pipeline.config.run_config import RunConfig
from pipeline.config.strict import ConfigError
from pipeline.config.training import BaselineSection, FinetuneSection

__all__ = [
    "AllocationSection",
    "BackendSection",
    "BaselineSection",
    "ConfigError",
    "DataConfig",
    "DistributedSection",
    "FinetuneSection",
    "HessianSection",
    "ModelConfig",
    "RunConfig",
    "RunSection",
    "check_paths",
    "config_from_dict",
    "config_to_yaml",
    "load_config",
    "section_dict",
]
