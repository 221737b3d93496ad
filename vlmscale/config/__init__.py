"""Typed run configuration: dataclasses per concern, YAML + dotted overrides, DeepSpeed JSON filling."""

from vlmscale.config.load import ConfigError, load_config, parse_cli, to_dict
from vlmscale.config.schema import (
    AlignConfig,
    PretrainConfig,
    RunConfig,
    CheckpointConfig,
    DataConfig,
    DeepSpeedSection,
    EvalConfig,
    EWCConfig,
    ModelConfig,
    ModulePolicy,
    OptimConfig,
    PolicyConfig,
    RegularizerConfig,
    SourceConfig,
    SFTConfig,
    TrainConfig,
)

__all__ = [
    "AlignConfig",
    "PretrainConfig",
    "RunConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedSection",
    "EvalConfig",
    "EWCConfig",
    "ModelConfig",
    "ModulePolicy",
    "OptimConfig",
    "PolicyConfig",
    "RegularizerConfig",
    "SFTConfig",
    "SourceConfig",
    "TrainConfig",
    "load_config",
    "parse_cli",
    "to_dict",
]
