"""HF Llama / Qwen2 <-> megatron-core weights, in memory, at any TP/PP sharding.

The conversion is a declarative key map per family (:data:`KEY_MAPS`): each
:class:`TensorRule` names one megatron-core tensor, the HF tensors it is made of, how
they combine (``copy``, ``qkv`` fusion, ``gate_up`` concatenation) and how the result
is split over tensor-parallel ranks. Layer rules carry ``{i}`` for the layer index;
pipeline stages own a contiguous block of layers.

Conversion works tensor by tensor through a ``get(hf_name) -> Tensor`` callable, so a
caller can stream from checkpoint shards (``tools/checkpoint`` does) instead of holding
the whole checkpoint. Reading and writing HF directories and ``config.json`` live in
:mod:`dpo_rl.checkpoint.hf_files`. Everything here takes the ranks and process groups as
arguments and imports nothing of megatron-core, so the converter (``tools/checkpoint``) and the
workers share it; :mod:`dpo_rl.workers.megatron.hf_interop` applies it to a worker's own grid.

Layouts (megatron-core 0.16.1, local and TransformerEngine specs):

* ``linear_qkv`` rows are grouped per KV group: ``[q heads of group g; k_g; v_g]`` for
  g in groups. TP splits whole groups, so a plain chunk along dim 0 is right.
* ``linear_fc1`` is ``[gate; up]``; under TP each of gate and up is split separately
  and the rank's local tensor is ``[gate_r; up_r]``.
* No rotary permutation: megatron's RoPE (non-interleaved) matches HF's rotate_half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from dpo_rl.config.model import ModelConfig
from dpo_rl.errors import ConfigError

TensorGetter = Callable[[str], torch.Tensor]
#: The HF tensors one megatron tensor is made of, as ``(hf_name, tensor)``.
HFGroup = list[tuple[str, torch.Tensor]]

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

#: Infix of LoRA adapter parameters (``<linear>.adapter.lora_a``, :mod:`dpo_rl.workers.megatron.lora`): they are
#: no base weight, so the key maps, loaders and exporters here never see them.
ADAPTER_PREFIX = ".adapter."

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


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's base weights by state-dict name (TransformerEngine's extra states and LoRA adapters left out)."""
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and ADAPTER_PREFIX not in k}


def uses_te_names(params: dict[str, torch.Tensor]) -> bool:
    """Whether a model's tensors carry TransformerEngine-spec names (its norms fused into the linears)."""
    return any(k.endswith("layer_norm_weight") for k in params)


def copy_local_tensor(params: dict[str, torch.Tensor], name: str, tensor: torch.Tensor, *, uses_te: bool,
                      label: str) -> tuple[str, Optional[str]]:
    """Copy one local-spec tensor into ``params`` (a :func:`model_tensors` dict; TE names mapped when
    ``uses_te``, see :func:`uses_te_names`).

    Returns (the parameter's name, ``None``) or (that name, the problem) when the model has no such
    parameter or its shape differs; ``label`` names the tensor's source in the problem.
    """
    target_name = te_name(name) if uses_te else name
    target = params.get(target_name)
    if target is None:
        return target_name, f"model has no parameter {target_name!r} (for {label}); wrong family or spec?"
    if target.shape != tensor.shape:
        return target_name, (f"{label}: shape {tuple(tensor.shape)} after sharding does not match {target_name} "
                             f"{tuple(target.shape)}; does the model config match the checkpoint?")
    with torch.no_grad():
        target.copy_(tensor)
    return target_name, None


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
    params = model_tensors(model)
    uses_te = uses_te_names(params)
    problems = [] if problems is None else problems
    filled: set[str] = set()
    for name, tensor in state.items():
        target_name, problem = copy_local_tensor(params, name, tensor, uses_te=uses_te,
                                                 label=(labels or {}).get(name, name))
        if problem:
            problems.append(problem)
        else:
            filled.add(target_name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        problems.append(f"model parameters not filled from the checkpoint: {unfilled[:5]}")
    if problems:
        raise ConfigError(problems)
    return len(filled)


def local_mcore_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's base weight tensors by local-spec name (TE names mapped back; LoRA adapters left out)."""
    inverse = {te: local for local, te in _TE_RENAMES.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if not torch.is_tensor(tensor) or ADAPTER_PREFIX in name:
            continue
        for te, local in inverse.items():
            if name.endswith(te):
                name = name[: -len(te)] + local
        state[name] = tensor.detach()
    return state


def stage_hf_groups(
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    tp_group: Optional[dist.ProcessGroup],
    tp_rank: int,
    tp_size: int,
    pp_rank: int,
    pp_size: int,
    reward: bool = False,
    tensors: Optional[dict[str, torch.Tensor]] = None,
) -> Iterator[HFGroup]:
    """This stage's weights in HF names, one group per megatron tensor (collective over TP).

    On TP rank 0 each group holds full HF tensors (on the model's device); other TP ranks take
    part in the gathers and yield nothing. Peak extra memory: one full megatron tensor.
    ``tensors`` (local megatron name -> tensor, e.g. gradients) replaces the weights.
    """
    local = local_mcore_state(model) if tensors is None else tensors
    for rule, layer, local_name in local_tensor_names(key_map(config, reward=reward), config, pp_rank, pp_size):
        tensor = local[local_name].detach()
        if tp_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = unshard(parts, rule.tp_split)
        if tp_rank != 0:
            continue
        names = [h.format(i=layer) for h in rule.hf]
        yield [(name, piece.contiguous()) for name, piece in zip(names, decompose(rule, tensor, config))]


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
    dict on the output rank (TP rank 0 of the last pipeline stage, the rank that owns every
    result a worker group returns) and ``None`` elsewhere. Tensors are cloned to the CPU.
    ``tensors`` (local megatron name -> tensor, e.g. gradients) replaces the weights.
    """
    stage_part: dict[str, torch.Tensor] = {}
    for group in stage_hf_groups(model, config, tp_group=tp_group, tp_rank=tp_rank, tp_size=tp_size,
                                 pp_rank=pp_rank, pp_size=pp_size, reward=reward, tensors=tensors):
        for name, piece in group:
            stage_part[name] = piece.detach().to("cpu").clone()
    if pp_size == 1:
        return stage_part if tp_rank == 0 else None
    gathered: list[Optional[dict]] = [None] * pp_size
    dist.all_gather_object(gathered, stage_part if tp_rank == 0 else {}, group=pp_group)
    if tp_rank != 0 or pp_rank != pp_size - 1:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part or {})
    return merged
