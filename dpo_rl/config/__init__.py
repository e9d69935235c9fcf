"""Configuration schemas (dataclasses) and their validation."""

from dpo_rl.config.model import (
    ModelConfig,
    ParallelConfig,
    load_model_config,
    shipped_model_config,
)
from dpo_rl.errors import ConfigError

__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "load_model_config", "shipped_model_config"]
