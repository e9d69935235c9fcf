"""HF Llama / Qwen2 <-> megatron-core weights, in memory, at any TP/PP sharding.

The conversion is a declarative key map per family (:data:`KEY_MAPS`): each
:class:`TensorRule` names one megatron-core tensor, the HF tensors it is made of, how
they combine (``copy``, ``qkv`` fusion, ``gate_up`` concatenation) and how the result
is split over tensor-parallel ranks. Layer rules carry ``{i}`` for the layer index;
pipeline stages own a contiguous block of layers.

Conversion works tensor by tensor through a ``get(hf_name) -> Tensor`` callable, so a
caller can stream from checkpoint shards (``tools/checkpoint`` does) instead of holding
the whole checkpoint.

Layouts (megatron-core 0.16.1, local and TransformerEngine specs):

* ``linear_qkv`` rows are grouped per KV group: ``[q heads of group g; k_g; v_g]`` for
  g in groups. TP splits whole groups, so a plain chunk along dim 0 is right.
* ``linear_fc1`` is ``[gate; up]``; under TP each of gate and up is split separately
  and the rank's local tensor is ``[gate_r; up_r]``.
* No rotary permutation: megatron's RoPE (non-interleaved) matches HF's rotate_half.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from dpo_rl.config.errors import ConfigError
from dpo_rl.config.model import ModelConfig, model_config_from_dict

TensorGetter = Callable[[str], torch.Tensor]

#: How a full tensor is split over TP ranks.
TP_SPLITS = ("replicated", "column", "row", "vocab", "gate_up")


@dataclass(frozen=True)
class TensorRule:
    """One megatron-core tensor and the HF tensors it is built from."""

    mcore: str
    """megatron-core name (``{i}`` = global layer index)."""
    hf: tuple[str, ...]
    """HF names combined into it, in order."""
    combine: str = "copy"
    """``copy`` (one HF tensor), ``qkv`` (q, k, v grouped per KV group) or ``gate_up``."""
    tp_split: str = "replicated"
    """One of :data:`TP_SPLITS`."""

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."

_LLAMA_RULES = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_split="vocab"),
    TensorRule(_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",)),
    TensorRule(
        _LAYER + "self_attention.linear_qkv.weight",
        tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
        combine="qkv",
        tp_split="column",
    ),
    TensorRule(
        _LAYER + "self_attention.linear_proj.weight",
        (_HF_LAYER + "self_attn.o_proj.weight",),
        tp_split="row",
    ),
    TensorRule(_LAYER + "pre_mlp_layernorm.weight", (_HF_LAYER + "post_attention_layernorm.weight",)),
    TensorRule(
        _LAYER + "mlp.linear_fc1.weight",
        (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
        combine="gate_up",
        tp_split="gate_up",
    ),
    TensorRule(_LAYER + "mlp.linear_fc2.weight", (_HF_LAYER + "mlp.down_proj.weight",), tp_split="row"),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
)

_QKV_BIAS_RULE = TensorRule(
    _LAYER + "self_attention.linear_qkv.bias",
    tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"),
    combine="qkv",
    tp_split="column",
)

LM_HEAD_RULE = TensorRule("output_layer.weight", ("lm_head.weight",), tp_split="vocab")
"""The LM head (absent when embeddings are tied)."""
SCORE_HEAD_RULE = TensorRule("output_layer.weight", ("score.weight",))
"""The reward variant's value head <-> HF ``*ForSequenceClassification.score`` (1 label)."""

KEY_MAPS: dict[str, tuple[TensorRule, ...]] = {
    "llama": _LLAMA_RULES,
    "qwen2": _LLAMA_RULES + (_QKV_BIAS_RULE,),
}

#: HF tensors that carry no weights (recomputed buffers); skipped, and counted, on load.
HF_NON_WEIGHTS = re.compile(r".*rotary_emb\.inv_freq$")

#: Local-spec names that TransformerEngine's spec fuses into the following linear layer.
_TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def key_map(config: ModelConfig, *, reward: bool = False) -> tuple[TensorRule, ...]:
    """The rules for ``config``'s family, with the right output head."""
    if config.family not in KEY_MAPS:
        raise ConfigError([f"model.family={config.family!r} has no HF key map; use one of {tuple(KEY_MAPS)}"])
    rules = KEY_MAPS[config.family]
    if config.family == "llama" and config.add_qkv_bias:
        rules = rules + (_QKV_BIAS_RULE,)
    if reward:
        return rules + (SCORE_HEAD_RULE,)
    if config.tie_word_embeddings:
        return rules
    return rules + (LM_HEAD_RULE,)


# --------------------------------------------------------------------------- pure tensor maths
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """HF q/k/v (weights [out, in] or biases [out]) -> megatron's grouped ``linear_qkv``."""
    groups, d = config.num_query_groups, config.head_dim
    heads_per_group = config.num_attention_heads // groups
    tail = q.shape[1:]
    fused = torch.cat(
        [
            q.reshape(groups, heads_per_group * d, *tail),
            k.reshape(groups, d, *tail),
            v.reshape(groups, d, *tail),
        ],
        dim=1,
    )
    return fused.reshape(-1, *tail)


def split_qkv(fused: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`."""
    groups, d = config.num_query_groups, config.head_dim
    heads_per_group = config.num_attention_heads // groups
    tail = fused.shape[1:]
    grouped = fused.reshape(groups, (heads_per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def shard(full: torch.Tensor, tp_split: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full megatron-core tensor."""
    if tp_size == 1 or tp_split == "replicated":
        return full
    if tp_split in ("column", "vocab"):
        return full.chunk(tp_size, dim=0)[tp_rank]
    if tp_split == "row":
        return full.chunk(tp_size, dim=1)[tp_rank]
    if tp_split == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    raise ValueError(f"unknown tp_split {tp_split!r}; expected one of {TP_SPLITS}")


def unshard(parts: list[torch.Tensor], tp_split: str) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every TP rank's slice, in rank order."""
    if len(parts) == 1 or tp_split == "replicated":
        return parts[0]
    if tp_split in ("column", "vocab"):
        return torch.cat(parts, dim=0)
    if tp_split == "row":
        return torch.cat(parts, dim=1)
    if tp_split == "gate_up":
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat(list(gates) + list(ups), dim=0)
    raise ValueError(f"unknown tp_split {tp_split!r}; expected one of {TP_SPLITS}")


def combine(rule: TensorRule, tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """HF tensors -> the full megatron-core tensor of ``rule``."""
    if rule.combine == "copy":
        return tensors[0]
    if rule.combine == "qkv":
        return fuse_qkv(*tensors, config)
    if rule.combine == "gate_up":
        return torch.cat(tensors, dim=0)
    raise ValueError(f"unknown combine {rule.combine!r}")


def decompose(rule: TensorRule, full: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`combine`."""
    if rule.combine == "copy":
        return (full,)
    if rule.combine == "qkv":
        return split_qkv(full, config)
    if rule.combine == "gate_up":
        return tuple(t.contiguous() for t in full.chunk(2, dim=0))
    raise ValueError(f"unknown combine {rule.combine!r}")


# --------------------------------------------------------------------------- layout
def stage_layers(config: ModelConfig, pp_rank: int, pp_size: int) -> range:
    """Global layer indices held by pipeline stage ``pp_rank``."""
    per_stage = config.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _rule_on_stage(rule: TensorRule, pp_rank: int, pp_size: int) -> bool:
    if rule.per_layer:
        return True
    if rule.mcore.startswith("embedding."):
        return pp_rank == 0
    return pp_rank == pp_size - 1  # final norm and output head


def local_tensor_names(
    rules: tuple[TensorRule, ...], config: ModelConfig, pp_rank: int, pp_size: int
) -> Iterator[tuple[TensorRule, int | None, str]]:
    """(rule, global layer or None, local megatron name) for every tensor on this stage."""
    layers = stage_layers(config, pp_rank, pp_size)
    for rule in rules:
        if not _rule_on_stage(rule, pp_rank, pp_size):
            continue
        if not rule.per_layer:
            yield rule, None, rule.mcore
            continue
        for local, global_layer in enumerate(layers):
            yield rule, global_layer, rule.mcore.format(i=local)


def te_name(name: str) -> str:
    """The TransformerEngine-spec name of a local-spec tensor name."""
    for local_spec, te in _TE_RENAMES.items():
        if name.endswith(local_spec):
            return name[: -len(local_spec)] + te
    return name


# --------------------------------------------------------------------------- load / export
def load_hf_weights(
    model: torch.nn.Module,
    get: TensorGetter,
    hf_names: set[str],
    config: ModelConfig,
    *,
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    reward: bool = False,
    keep_value_head: bool = False,
) -> dict[str, int]:
    """Copy this rank's shard of an HF checkpoint into ``model`` (a GPTModel stage).

    ``get(name)`` returns a full HF tensor, ``hf_names`` is every name the checkpoint
    holds. Raises :class:`ConfigError` when a tensor is missing, has the wrong shape, or
    the model has a parameter the key map did not fill. Returns counts of what was
    loaded and skipped. ``keep_value_head`` (reward models only) loads the trunk and keeps
    the model's own value head: a reward model started from a causal LM.
    """
    rules = key_map(config, reward=reward)
    state: dict[str, torch.Tensor] = {}
    if keep_value_head:
        if not reward:
            raise ValueError("keep_value_head is for reward models")
        rules = tuple(r for r in rules if r is not SCORE_HEAD_RULE)
        own = model.state_dict().get(SCORE_HEAD_RULE.mcore)
        if own is not None:  # the last pipeline stage holds the head
            state[SCORE_HEAD_RULE.mcore] = own.detach().clone()
    labels: dict[str, str] = {}
    problems: list[str] = []
    for rule, layer, local_name in local_tensor_names(rules, config, pp_rank, pp_size):
        names = [h.format(i=layer) for h in rule.hf]
        missing = [n for n in names if n not in hf_names]
        if missing:
            problems.append(f"HF checkpoint has no tensor {missing[0]!r} (needed for {local_name})")
            continue
        tensors = [get(n) for n in names]
        try:
            state[local_name] = shard(combine(rule, tensors, config), rule.tp_split, tp_rank, tp_size)
        except RuntimeError:  # a reshape in combine/shard: the checkpoint is another architecture
            problems.append(f"HF tensor {names[0]!r} has shape {tuple(tensors[0].shape)}, which does not fit "
                            f"{local_name} of the configured model (hidden_size={config.hidden_size}, "
                            f"heads={config.num_attention_heads}); does the model config match the checkpoint?")
            continue
        labels[local_name] = names[0]
    loaded = copy_local_state(model, state, labels=labels, problems=problems)
    skipped = sum(1 for n in hf_names if HF_NON_WEIGHTS.match(n))
    return {"loaded": loaded, "skipped_non_weights": skipped}


def copy_local_state(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    labels: Optional[dict[str, str]] = None,
    problems: Optional[list[str]] = None,
) -> int:
    """Copy local-spec tensors into ``model`` (TransformerEngine names mapped) and return how many.

    Every model parameter must be filled and every shape must match; otherwise raises one
    :class:`ConfigError` with all problems (``labels`` names each tensor's source in messages).
    """
    params = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    uses_te = any(k.endswith("layer_norm_weight") for k in params)
    problems = [] if problems is None else problems
    filled: set[str] = set()
    for name, tensor in state.items():
        target_name = te_name(name) if uses_te else name
        label = (labels or {}).get(name, name)
        target = params.get(target_name)
        if target is None:
            problems.append(f"model has no parameter {target_name!r} (for {label}); wrong family or spec?")
            continue
        if target.shape != tensor.shape:
            problems.append(f"{label}: shape {tuple(tensor.shape)} after sharding does not match {target_name} "
                            f"{tuple(target.shape)}; does the model config match the checkpoint?")
            continue
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(target_name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        problems.append(f"model parameters not filled from the checkpoint: {unfilled[:5]}")
    if problems:
        raise ConfigError(problems)
    return len(filled)


def local_mcore_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weight tensors by local-spec name (TE names mapped back)."""
    inverse = {te: local for local, te in _TE_RENAMES.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if not torch.is_tensor(tensor):
            continue
        for te, local in inverse.items():
            if name.endswith(te):
                name = name[: -len(te)] + local
        state[name] = tensor.detach()
    return state


def export_hf_weights(
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    tp_group: Optional[dist.ProcessGroup],
    pp_group: Optional[dist.ProcessGroup],
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    reward: bool = False,
    tensors: Optional[dict[str, torch.Tensor]] = None,
) -> Optional[dict[str, torch.Tensor]]:
    """Gather the model from every TP/PP rank into one HF state dict.

    Collective over the model-parallel ranks of one DP replica; returns the full HF state
    dict on (TP rank 0, PP rank 0) and ``None`` elsewhere. Tensors are cloned to the CPU.
    ``tensors`` (local megatron name -> tensor, e.g. gradients) replaces the weights.
    """
    rules = key_map(config, reward=reward)
    local = local_mcore_state(model) if tensors is None else tensors
    stage_part: dict[str, torch.Tensor] = {}
    for rule, layer, local_name in local_tensor_names(rules, config, pp_rank, pp_size):
        tensor = local[local_name]
        if tp_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = unshard(parts, rule.tp_split)
        if tp_rank != 0:
            continue
        names = [h.format(i=layer) for h in rule.hf]
        for name, piece in zip(names, decompose(rule, tensor, config)):
            stage_part[name] = piece.detach().to("cpu").clone()
    if pp_size == 1:
        return stage_part if tp_rank == 0 else None
    gathered: list[Optional[dict]] = [None] * pp_size
    dist.all_gather_object(gathered, stage_part if tp_rank == 0 else {}, group=pp_group)
    if tp_rank != 0 or pp_rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part or {})
    return merged


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
    from transformers import AutoConfig

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
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
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
        return model_config_from_hf(json.loads(path.read_text()), source=str(path))


def _open_safetensors(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


class _BinFile:
    """A ``pytorch_model*.bin`` file with safetensors' handle interface (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


def _open_bin(path: Path) -> _BinFile:
    return _BinFile(path)


# --------------------------------------------------------------------------- current-grid helpers
def load_into_current_rank(
    model: torch.nn.Module,
    source: "HFCheckpoint | dict[str, torch.Tensor]",
    config: ModelConfig,
    *,
    reward: bool = False,
    keep_value_head: bool = False,
) -> dict[str, int]:
    """:func:`load_hf_weights` for this process's place in the initialised Megatron grid."""
    from dpo_rl.workers.megatron.parallel_state import current_ranks

    ranks = current_ranks()
    if isinstance(source, HFCheckpoint):
        get, names = source.get, source.names
    else:
        get, names = source.__getitem__, set(source)
    return load_hf_weights(
        model, get, names, config,
        tp_rank=ranks.tp_rank, tp_size=ranks.tp_size, pp_rank=ranks.pp_rank, pp_size=ranks.pp_size,
        reward=reward, keep_value_head=keep_value_head,
    )


def export_from_current_rank(
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    reward: bool = False,
    tensors: Optional[dict[str, torch.Tensor]] = None,
) -> Optional[dict[str, torch.Tensor]]:
    """:func:`export_hf_weights` over this process's TP and PP groups."""
    from megatron.core import parallel_state as mpu

    from dpo_rl.workers.megatron.parallel_state import current_ranks

    ranks = current_ranks()
    return export_hf_weights(
        model, config,
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        tp_rank=ranks.tp_rank, tp_size=ranks.tp_size, pp_rank=ranks.pp_rank, pp_size=ranks.pp_size,
        reward=reward, tensors=tensors,
    )


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
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    config_json = hf_config_dict(config, reward=reward, torch_dtype=dtype, **extra)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    return directory
