"""LoRA adapters on megatron-core's own tensor-parallel linear layers.

:func:`add_lora` gives each targeted ``ColumnParallelLinear`` / ``RowParallelLinear`` of every
decoder layer an :class:`LoRAAdapter` submodule (``<linear>.adapter.lora_a`` / ``lora_b``) and a
forward hook that adds ``alpha / r * B A dropout(x)`` to the layer's output, then freezes every
other parameter (a reward model's value head stays trainable). The base weights keep their
names, so every loader, exporter and key map of the project reads them unchanged; the adapters
are reached through the functions here.

Tensor parallelism: the factors are split the way the base weight is.

* Column-parallel (``linear_qkv``, ``linear_fc1``; weight ``[out/tp, in]``): ``A [r, in]`` is
  replicated, ``B [out/tp, r]`` holds the rank's rows of the full B in the base weight's own row
  layout (q/k/v grouped per KV group, gate and up split separately). ``A x`` enters the
  tensor-parallel region through megatron's ``copy_to_tensor_model_parallel_region``
  (all-reduce in the backward), so A's gradient is the full sum and equal on every rank.
* Row-parallel (``linear_proj``, ``linear_fc2``; weight ``[out, in/tp]``, input split): ``A
  [r, in/tp]`` holds the rank's columns, ``B [out, r]`` is replicated; the partial ``A x`` sums
  over ranks with ``reduce_from_tensor_model_parallel_region``.

So TP=2 computes what TP=1 does (the same sums in another order). The factors are initialised
from a generator seeded by the run's seed and the layer's global name, full size, then sharded:
every layout starts from the same adapters. A is Kaiming-uniform (PEFT's default), B zero, so
step 0 equals the base model. Dropout on the replicated input of a column-parallel adapter uses
the default generator, which every TP rank of a role seeds alike and draws from in step, so the
ranks draw the same mask (megatron's rule for dropout outside TP regions).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dpo_rl.checkpoint.hf_weights import ADAPTER_PREFIX, key_map, shard, unshard
from dpo_rl.config.model import ModelConfig
from dpo_rl.config.schema import LORA_ALL, LORA_TARGETS, LoRASettings
from dpo_rl.errors import ConfigError

#: Where each target lives in a decoder layer, and how megatron splits its weight over TP.
TARGET_PATHS = {
    "linear_qkv": ("self_attention.linear_qkv", "column"),
    "linear_proj": ("self_attention.linear_proj", "row"),
    "linear_fc1": ("mlp.linear_fc1", "column"),
    "linear_fc2": ("mlp.linear_fc2", "row"),
}


def lora_targets(settings: LoRASettings) -> tuple[str, ...]:
    """The targets ``settings.target_modules`` names (``all``/``all-linear`` = every one), in :data:`LORA_TARGETS`
    order (checked before anything starts: ``dpo_rl.config.resolution.check_lora``)."""
    wanted = settings.target_modules
    if isinstance(wanted, str):
        wanted = LORA_TARGETS if wanted.lower() in LORA_ALL else (wanted,)
    return tuple(t for t in LORA_TARGETS if t in set(wanted))


@dataclass(frozen=True)
class AdaptedLinear:
    """One adapted linear layer of this rank's model stage."""

    name: str
    """Local module name (``decoder.layers.{local}.self_attention.linear_qkv``)."""
    target: str
    """One of :data:`LORA_TARGETS`."""
    layer: int
    """Global decoder layer index (0-based)."""
    module: nn.Module


class LoRAAdapter(nn.Module):
    """The two factors of one adapted linear layer and how they act (see the module docstring)."""

    def __init__(self, kind: str, a_full: torch.Tensor, out_local: int, settings: LoRASettings, *, tp_rank: int,
                 tp_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        from megatron.core.tensor_parallel.layers import (  # deferred: heavy (megatron-core)
            set_tensor_model_parallel_attributes,
        )

        self.kind, self.scale = kind, settings.alpha / settings.rank
        a_local = shard(a_full, "row", tp_rank, tp_size) if kind == "row" else a_full
        self.lora_a = nn.Parameter(a_local.to(device=device, dtype=dtype).contiguous())
        self.lora_b = nn.Parameter(torch.zeros(out_local, settings.rank, dtype=dtype, device=device))
        # megatron counts a TP-split parameter on every rank and a replicated one once (gradient norm, clipping)
        split = self.lora_b if kind == "column" else self.lora_a
        set_tensor_model_parallel_attributes(split, True, 0 if kind == "column" else 1, 1)
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.enabled = True

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the layer's (local) output for input ``x``."""
        from megatron.core.tensor_parallel.mappings import (  # deferred: heavy (megatron-core)
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        h = F.linear(self.dropout(x), self.lora_a)
        h = copy_to_tensor_model_parallel_region(h) if self.kind == "column" else reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_b) * self.scale

    def merged_delta(self) -> torch.Tensor:
        """``alpha / r * B A`` in the shape of this rank's shard of the base weight (fp32)."""
        return (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scale


def _add_adapter_output(module: nn.Module, inputs: tuple, output):
    adapter: LoRAAdapter = module.adapter
    if not adapter.enabled:
        return output
    out, bias = output
    return out + adapter.delta(inputs[0]).to(out.dtype), bias


def _make_embedding_output_require_grad(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # With the embedding frozen nothing before the first layer needs a gradient; activation recomputation
    # (a checkpointed function) would then return outputs without a graph and the adapters would get none.
    return output.requires_grad_(True) if torch.is_grad_enabled() else output


def init_factor_a(seed: int, name: str, rank: int, in_features: int) -> torch.Tensor:
    """The full ``A [rank, in]`` of the adapter ``name`` (global layer naming): Kaiming-uniform with ``a = sqrt(5)``
    (PEFT's and ``nn.Linear``'s default, bound 1/sqrt(in)), from a generator seeded by ``seed`` and ``name``."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def add_lora(model: nn.Module, settings: LoRASettings, *, seed: int, tp_rank: int, tp_size: int,
             trainable: tuple[str, ...] = ()) -> list[AdaptedLinear]:
    """Give ``model`` (a GPTModel stage) the adapters ``settings`` asks for and freeze everything else but the
    parameters named in ``trainable`` (e.g. a reward model's value head). Returns the adapted layers."""
    adapted = []
    param = next(model.parameters())
    for local, layer in enumerate(model.decoder.layers):
        global_layer = layer.layer_number - 1
        for target in lora_targets(settings):
            path, kind = TARGET_PATHS[target]
            linear = layer.get_submodule(path)
            in_full = linear.input_size
            out_local = linear.weight.shape[0]
            a_full = init_factor_a(seed, f"layers.{global_layer}.{target}", settings.rank, in_full)
            linear.adapter = LoRAAdapter(kind, a_full, out_local, settings, tp_rank=tp_rank, tp_size=tp_size,
                                         dtype=param.dtype, device=param.device)
            linear.register_forward_hook(_add_adapter_output)
            adapted.append(AdaptedLinear(f"decoder.layers.{local}.{path}", target, global_layer, linear))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name) or name in trainable)
    if getattr(model, "pre_process", False):
        model.embedding.register_forward_hook(_make_embedding_output_require_grad)
    return adapted


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_PREFIX in name


def adapted_linears(model: nn.Module) -> list[AdaptedLinear]:
    """The layers :func:`add_lora` adapted (none for a model without adapters)."""
    out = []
    for local, layer in enumerate(getattr(getattr(model, "decoder", None), "layers", [])):
        for target, (path, _) in TARGET_PATHS.items():
            linear = layer.get_submodule(path)
            if isinstance(getattr(linear, "adapter", None), LoRAAdapter):
                out.append(AdaptedLinear(f"decoder.layers.{local}.{path}", target, layer.layer_number - 1, linear))
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model (every adapter off) inside the block."""
    adapters = [a.module.adapter for a in adapted_linears(model)]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def merged_weights(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base`` (the stage's local-spec weights, :func:`~dpo_rl.checkpoint.hf_weights.local_mcore_state`) with
    every adapter merged into its layer's weight: what the model computes, as plain weights (new tensors for the
    merged layers; the model is not changed)."""
    merged = dict(base)
    for a in adapted_linears(model):
        key = f"{a.name}.weight"
        weight = base[key]
        merged[key] = (weight.float() + a.module.adapter.merged_delta().to(weight.device)).to(weight.dtype)
    return merged


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters, a reward model's value head) by name: a LoRA checkpoint's model part."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Inverse of :func:`trainable_state`: every trainable parameter must be in ``state`` with its shape."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problems = [f"{source}: holds no {name!r}" for name in sorted(set(params) - set(state))][:5]
    problems += [f"{source}: {name!r} is not a trainable parameter of this model (was it saved with other lora "
                 "settings?)" for name in sorted(set(state) - set(params))][:5]
    problems += [f"{source}: {name!r} has shape {tuple(state[name].shape)}, the model's is {tuple(p.shape)}"
                 for name, p in params.items() if name in state and state[name].shape != p.shape]
    if problems:
        raise ConfigError(problems + ["resume it with the lora settings it was trained with"])
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def adapted_rule(target: str, config: ModelConfig, reward: bool):
    """The key-map rule of the base weight a ``target`` adapter belongs to (its HF pieces and TP split)."""
    path = TARGET_PATHS[target][0]
    return next(r for r in key_map(config, reward=reward) if r.mcore.endswith(f"{path}.weight"))


def gathered_adapters(model: nn.Module, config: ModelConfig, *, tp_group, tp_rank: int, tp_size: int,
                      reward: bool = False) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """This stage's adapters as HF modules: ``(hf module name, A [r, in], B [out, r])`` per HF linear layer
    (q/k/v and gate/up of a fused layer each get the shared A and their rows of B). Collective over TP; TP rank 0
    yields, the others take part in the gathers and yield nothing."""
    from dpo_rl.checkpoint.hf_weights import decompose  # the base weight's own HF split

    for a in adapted_linears(model):
        adapter, rule = a.module.adapter, adapted_rule(a.target, config, reward)
        factor_a, factor_b = adapter.lora_a.detach(), adapter.lora_b.detach()
        if tp_size > 1:
            split, which = (factor_b, "b") if adapter.kind == "column" else (factor_a, "a")
            parts = [torch.empty_like(split) for _ in range(tp_size)]
            torch.distributed.all_gather(parts, split.contiguous(), group=tp_group)
            full = unshard(parts, rule.tp_split if adapter.kind == "column" else "row")
            factor_a, factor_b = (factor_a, full) if which == "b" else (full, factor_b)
        if tp_rank != 0:
            continue
        modules = [h.format(i=a.layer).removesuffix(".weight") for h in rule.hf]
        pieces_b = decompose(rule, factor_b, config)
        for module, piece in zip(modules, pieces_b):
            yield module, factor_a.cpu().clone(), piece.cpu().contiguous().clone()


def peft_adapter_tensors(model: nn.Module, config: ModelConfig, ranks, *, reward: bool = False) -> Optional[dict]:
    """Every adapter of the model (and a reward model's value head, as ``score``) by HF module name, for
    :func:`~dpo_rl.checkpoint.peft_adapters.save_peft_adapter`: gathered over TP and PP (collective over one DP
    replica's model-parallel ranks); the dict on the output rank, ``None`` elsewhere."""
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    stage: dict = {module: (a, b) for module, a, b in gathered_adapters(
        model, config, tp_group=mpu.get_tensor_model_parallel_group(), tp_rank=ranks.tp_rank, tp_size=ranks.tp_size,
        reward=reward)}
    if reward and ranks.is_output_rank:
        stage["score"] = dict(model.named_parameters())["output_layer.weight"].detach().cpu().clone()
    if ranks.pp_size > 1:
        parts: list[Optional[dict]] = [None] * ranks.pp_size
        torch.distributed.all_gather_object(parts, stage if ranks.tp_rank == 0 else {},
                                            group=mpu.get_pipeline_model_parallel_group())
        stage = {k: v for part in parts for k, v in (part or {}).items()}
    return stage if ranks.is_output_rank else None


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters of this rank's stage."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

