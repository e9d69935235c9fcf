"""Schema for model architecture files (``configs/rlxf/model/<name>.yaml``) and parallel layout.

A model file holds one top-level key, the model's name, whose fields are those of
:class:`ModelConfig` (seed 001's layout: ``defaults: [model: llama32-1b]`` then
``model: llama32-1b`` in a role picks it). Fields are validated when the file is
loaded: a typo or a wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_rl.errors import ConfigError

#: Families with a declarative HF key map (``dpo_rl.checkpoint.hf_weights``).
MODEL_FAMILIES = ("llama", "qwen2")
ROPE_SCALING_TYPES = ("none", "llama3")
NORMALIZATIONS = ("RMSNorm",)
DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda", "npu")


#: Fields every model file must give: they fix the shapes, so no default could be right.
ARCHITECTURE_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                       "num_query_groups", "vocab_size", "max_position_embeddings")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only GPT model (Llama / Qwen2 family).

    The fields of :data:`ARCHITECTURE_FIELDS` have no default: a model file that leaves one out is
    an error naming the file. The rest default to what Llama uses."""

    family: str
    """HF family whose weight layout this model follows: ``llama`` or ``qwen2``."""
    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Width of the residual stream."""
    ffn_hidden_size: int
    """Inner width of the MLP (per gate / up projection when ``swiglu``)."""
    num_attention_heads: int
    """Number of query heads."""
    num_query_groups: int
    """Number of key/value heads (grouped-query attention); equal to heads for MHA."""
    vocab_size: int
    """Vocabulary size of the embedding and LM head (must be divisible by TP)."""
    max_position_embeddings: int
    """Longest sequence the model is built for (RoPE table length)."""
    kv_channels: Optional[int] = None
    """Per-head width; ``null`` means ``hidden_size // num_attention_heads``."""
    rotary_base: float = 10000.0
    """RoPE base (theta)."""
    rope_scaling_type: str = "none"
    """``none`` or ``llama3`` (Llama 3.1/3.2 frequency-dependent scaling)."""
    rope_scaling_factor: float = 8.0
    """Llama 3 rope scaling ``factor`` (used when ``rope_scaling_type: llama3``)."""
    low_freq_factor: float = 1.0
    """Llama 3 rope scaling ``low_freq_factor``."""
    high_freq_factor: float = 4.0
    """Llama 3 rope scaling ``high_freq_factor``."""
    original_max_position_embeddings: int = 8192
    """Llama 3 rope scaling ``original_max_position_embeddings``."""
    normalization: str = "RMSNorm"
    """Normalisation layer; only ``RMSNorm`` (Llama and Qwen2 use it)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers (HF ``rms_norm_eps``)."""
    swiglu: bool = True
    """Gated SiLU MLP (``gate_proj``/``up_proj``/``down_proj``)."""
    add_qkv_bias: bool = False
    """Bias on the Q, K and V projections (Qwen2 has it, Llama does not)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head (Llama 3.2 1B, small Qwen2.5)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation used when weights are not loaded."""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def check(self, where: str = "model") -> list[str]:
        """Return every rule this architecture breaks, each naming key, value, rule and fix."""
        problems = []
        if self.family not in MODEL_FAMILIES:
            problems.append(
                f"{where}.family={self.family!r} is not a known family; use one of {MODEL_FAMILIES}"
            )
        if self.rope_scaling_type not in ROPE_SCALING_TYPES:
            problems.append(
                f"{where}.rope_scaling_type={self.rope_scaling_type!r} is unknown; "
                f"use one of {ROPE_SCALING_TYPES}"
            )
        if self.normalization not in NORMALIZATIONS:
            problems.append(
                f"{where}.normalization={self.normalization!r} is unsupported; use one of {NORMALIZATIONS}"
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{where}.{name}={getattr(self, name)} must be positive")
        if self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups:
            problems.append(
                f"{where}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"{where}.num_query_groups ({self.num_query_groups}); pick a divisor of the heads"
            )
        if self.kv_channels is None and self.num_attention_heads > 0 and (
            self.hidden_size % self.num_attention_heads
        ):
            problems.append(
                f"{where}.hidden_size ({self.hidden_size}) must be a multiple of "
                f"{where}.num_attention_heads ({self.num_attention_heads}), or set {where}.kv_channels"
            )
        return problems


@dataclass
class ParallelConfig:
    """How one role's model is sharded and where it runs."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    params_dtype: str = "fp32"
    """Parameter and activation precision: ``fp32``, ``bf16`` or ``fp16``."""
    device: str = "cpu"
    """``cpu`` (gloo), ``cuda`` (nccl) or ``npu`` (hccl)."""

    def check(self, model: ModelConfig, where: str = "parallel", model_where: str = "model",
              device_key: Optional[str] = None) -> list[str]:
        """Return every rule this layout breaks for ``model``. Messages name the layout's keys under ``where``,
        the model's under ``model_where`` (``model.<name>``) and the device as ``device_key`` (``training.device``
        in a trainer config; default ``<where>.device``)."""
        problems = []
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        device_key = device_key or f"{where}.device"
        if self.params_dtype not in DTYPES:
            problems.append(f"{where}.params_dtype={self.params_dtype!r} is unknown; use one of {DTYPES}")
        if self.device not in DEVICES:
            problems.append(f"{device_key}={self.device!r} is unknown; use one of {DEVICES}")
        if tp < 1 or pp < 1:
            problems.append(f"{where}: tensor/pipeline parallel sizes must be >= 1 (got TP={tp}, PP={pp})")
            return problems
        for name in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size"):
            value = getattr(model, name)
            if value % tp:
                problems.append(
                    f"{model_where}.{name} ({value}) must be a multiple of "
                    f"{where}.tensor_model_parallel_size ({tp}); choose a TP size that divides it"
                )
        if model.num_layers % pp:
            problems.append(
                f"{model_where}.num_layers ({model.num_layers}) must be a multiple of "
                f"{where}.pipeline_model_parallel_size ({pp}); choose a PP size that divides it"
            )
        if pp > 1 and model.tie_word_embeddings and self.device == "cpu":
            problems.append(
                f"{where}.pipeline_model_parallel_size={pp} with {model_where}.tie_word_embeddings=true is "
                "GPU-only (the embedding all-reduce across stages needs CUDA); use PP=1 on CPU"
            )
        if self.device == "cpu" and self.params_dtype == "fp16":
            problems.append(f"{where}.params_dtype=fp16 is not supported on CPU; use fp32 or bf16")
        return problems


def model_config_from_dict(values: dict[str, Any], source: str) -> ModelConfig:
    """Build a :class:`ModelConfig`, failing on missing architecture fields, unknown keys or wrong types
    with ``source`` named."""
    schema = OmegaConf.structured(ModelConfig)
    try:
        merged = OmegaConf.merge(schema, values)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"{source}: {exc.msg} (key {exc.full_key!r})"]) from None
    missing = [key for key in ARCHITECTURE_FIELDS if OmegaConf.is_missing(merged, key)]
    if missing:
        raise ConfigError([f"{source}: architecture field {key!r} is missing; a model file must give every one of "
                           f"{', '.join(ARCHITECTURE_FIELDS)}" for key in missing])
    config: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    problems = config.check(where=source)
    if problems:
        raise ConfigError(problems)
    return config


def load_model_config(path: str | Path) -> ModelConfig:
    """Load a model architecture file: one top-level key (the model name) holding the fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"model config file {str(path)!r} does not exist"])
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(
            [f"{path}: a model file must hold exactly one top-level key, the model name "
             f"(found {list(raw) if isinstance(raw, dict) else type(raw).__name__})"]
        )
    (name, values), = raw.items()
    return model_config_from_dict(values, source=f"{path.name}:{name}")


MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "rlxf" / "model"


def shipped_model_config(name: str) -> ModelConfig:
    """Load one of the architecture files shipped in ``configs/rlxf/model``."""
    return load_model_config(MODEL_CONFIG_DIR / f"{name}.yaml")


def replace(config: ModelConfig, **changes: Any) -> ModelConfig:
    """A copy of ``config`` with ``changes`` applied (dataclasses.replace, re-checked)."""
    new = dataclasses.replace(config, **changes)
    problems = new.check()
    if problems:
        raise ConfigError(problems)
    return new


__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "load_model_config",
    "model_config_from_dict",
    "shipped_model_config",
    "replace",
    "MODEL_FAMILIES",
    "ARCHITECTURE_FIELDS",
]
