"""HF checkpoint directories: ``config.json`` <-> :class:`ModelConfig`, a lazy reader of local
weight files (safetensors or PyTorch ``.bin``, one file or sharded), and writing an HF
checkpoint transformers loads. The weight maths (key maps, TP/PP sharding) is in
:mod:`dpo_rl.checkpoint.hf_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo_rl.checkpoint import readers
from dpo_rl.config.model import ModelConfig, model_config_from_dict
from dpo_rl.errors import ConfigError

# --------------------------------------------------------------------------- HF config <-> ModelConfig
_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_REWARD_ARCH = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}


def model_config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """Map an HF ``config.json`` (Llama or Qwen2) onto :class:`ModelConfig`."""
    model_type = hf_config.get("model_type")
    if model_type not in _HF_ARCH:
        raise ConfigError([f"{source}: model_type={model_type!r} is not supported; use one of {tuple(_HF_ARCH)}"])
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim == hf_config["hidden_size"] // heads:
        head_dim = None  # the default; keep configs canonical
    values = {
        "family": model_type,
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hf_config["hidden_size"],
        "ffn_hidden_size": hf_config["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf_config.get("num_key_value_heads") or heads,
        "kv_channels": head_dim,
        "vocab_size": hf_config["vocab_size"],
        "max_position_embeddings": hf_config["max_position_embeddings"],
        "rotary_base": float(hf_config.get("rope_theta") or _rope_parameters(hf_config).get("rope_theta", 10000.0)),
        "norm_epsilon": hf_config["rms_norm_eps"],
        "add_qkv_bias": model_type == "qwen2" or bool(hf_config.get("attention_bias", False)),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
    }
    scaling = _rope_parameters(hf_config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        values.update(
            rope_scaling_type="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise ConfigError([f"{source}: rope scaling type {rope_type!r} is not supported (only llama3)"])
    return model_config_from_dict(values, source=source)


def _rope_parameters(hf_config: dict) -> dict:
    """``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5), or {}."""
    return dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})


def hf_config_dict(config: ModelConfig, *, reward: bool = False, **extra) -> dict:
    """An HF ``config.json`` dict for ``config`` (loadable by transformers with no custom code)."""
    rope_scaling = None
    if config.rope_scaling_type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": config.rope_scaling_factor,
            "low_freq_factor": config.low_freq_factor,
            "high_freq_factor": config.high_freq_factor,
            "original_max_position_embeddings": config.original_max_position_embeddings,
        }
    out = {
        "architectures": [(_HF_REWARD_ARCH if reward else _HF_ARCH)[config.family]],
        "model_type": config.family,
        "num_hidden_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rotary_base,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": config.norm_epsilon,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.add_qkv_bias if config.family == "llama" else None,
        "mlp_bias": False if config.family == "llama" else None,
        "attention_dropout": 0.0,
    }
    if reward:
        out["num_labels"] = 1
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None or k == "rope_scaling"}


def hf_transformers_config(config: ModelConfig, *, reward: bool = False, **extra):
    """A ``transformers`` config object (LlamaConfig / Qwen2Config) for ``config``."""
    from transformers import AutoConfig  # deferred: transformers is heavy to import

    values = hf_config_dict(config, reward=reward, **extra)
    return AutoConfig.for_model(values.pop("model_type"), **values)


# --------------------------------------------------------------------------- local checkpoint files
class HFCheckpoint:
    """Lazy reader of a local HF checkpoint directory: safetensors (one file or a sharded index) or
    PyTorch ``.bin`` files (one or sharded), memory-mapped either way."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError([f"HF checkpoint directory {str(self.directory)!r} does not exist"])
        for index_name, pattern, opener in (("model.safetensors.index.json", "*.safetensors", _open_safetensors),
                                            ("pytorch_model.bin.index.json", "pytorch_model*.bin", _open_bin)):
            index = self.directory / index_name
            if index.is_file():
                weight_map = readers.read_json(index).get("weight_map") or {}
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (self.directory / f).is_file()]
                if not files or missing:
                    raise ConfigError([f"{index} names no weight files or missing ones ({missing[:3]}); the copy "
                                       "is incomplete: re-copy or re-export the checkpoint"])
            else:
                files = [p.name for p in sorted(self.directory.glob(pattern))]
                weight_map = {}
            if files:
                break
        else:
            raise ConfigError([f"{self.directory}: no *.safetensors or pytorch_model*.bin weight files"])
        self._handles = {f: opener(self.directory / f) for f in files}
        if not weight_map:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.weight_map: dict[str, str] = weight_map

    @property
    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.weight_map[name]].get_tensor(name)


    def config(self) -> ModelConfig:
        path = self.directory / "config.json"
        if not path.is_file():
            raise ConfigError([f"{self.directory}: no config.json"])
        return model_config_from_hf(readers.read_json(path), source=str(path))


def _open_safetensors(path: Path):
    return readers.open_safetensors(path)


class _BinFile:
    """A ``pytorch_model*.bin`` file with safetensors' handle interface (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.state = readers.torch_load(path, mmap=True)

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


def _open_bin(path: Path) -> _BinFile:
    return _BinFile(path)


def save_hf_checkpoint(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    *,
    reward: bool = False,
    dtype: str = "float32",
    **extra,
) -> Path:
    """Write ``state`` (HF names) as ``model.safetensors`` + ``config.json`` (loadable by transformers)."""
    from safetensors.torch import save_file  # deferred: only reading or writing checkpoints needs it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config_json = hf_config_dict(config, reward=reward, torch_dtype=dtype, **extra)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    return directory
