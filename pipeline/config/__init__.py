"""The run config: strict YAML <-> frozen kw-only dataclasses, ``--set`` overrides.

- :mod:`pipeline.config.strict`: ``ConfigError`` and the ``Section`` base (typed coercion,
  validators);
- :mod:`pipeline.config.sections`: one section per pipeline component, ``RunConfig``, and each
  section's conversion to its hawq config (``to_hawq``);
- :mod:`pipeline.config.loading`: reading YAML files, ``a.b=value`` overrides, path checks.
"""

from pipeline.config.distributed import DistributedSection
from pipeline.config.loading import (
    check_paths,
    config_from_dict,
    config_to_yaml,
    load_config,
    section_dict,
)
from pipeline.config.sections import (
    AllocationSection,
    BackendSection,
    BaselineSection,
    DataConfig,
    FinetuneSection,
    HessianSection,
    ModelConfig,
    RunConfig,
    RunSection,
)
from pipeline.config.strict import ConfigError

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
