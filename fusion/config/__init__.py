"""All configuration: typed dataclasses (`fields`), named sizes (`sizes`), loading, overrides and
validation (`load`), values derived once and the DeepSpeed JSON (`derived`).

Order of precedence (last wins): dataclass defaults -> the named size `model.size` -> the YAML file
-> `key.sub=value` overrides from the command line. Unknown keys and wrong types raise `ConfigError`
naming the key and where it came from. Every key is listed in docs/config.md.

This package imports nothing of fusion but `fusion.schema` (names every part shares).
"""

from fusion.config.derived import Derived, deepspeed_config, dense_baseline_ffn_dim, finalize, moe_layer_ids
from fusion.config.fields import (
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelConfig,
    MoEConfig,
    RunConfig,
    TrainConfig,
    VisionConfig,
)
from fusion.config.load import (
    META,
    apply_size,
    dump_yaml,
    load_config,
    merge,
    model_overrides,
    to_dict,
    validate,
)
from fusion.config.sizes import SIZES

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "Derived",
    "DistillConfig",
    "META",
    "ModelConfig",
    "MoEConfig",
    "RunConfig",
    "SIZES",
    "TrainConfig",
    "VisionConfig",
    "apply_size",
    "deepspeed_config",
    "dense_baseline_ffn_dim",
    "dump_yaml",
    "finalize",
    "load_config",
    "merge",
    "model_overrides",
    "moe_layer_ids",
    "to_dict",
    "validate",
]
