"""The one place that builds megatron-core models.

``build_gpt_model`` turns a :class:`ModelConfig` (architecture) plus a
:class:`ParallelConfig` (TP, PP, dtype, device) into a ``megatron.core.models.gpt.GPTModel``
for this process's pipeline stage. ``build_reward_model`` builds the same trunk with a
scalar value head in place of the LM head. The layer spec is megatron-core's local
spec on CPU and TransformerEngine's when it is installed on GPU; at TP = 1 the local spec's linear
layers (and the LM head) are :mod:`.single_rank_linear`'s, which skip megatron's one-rank TP plumbing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpo_rl.config.model import ModelConfig, ParallelConfig
from dpo_rl.errors import ConfigError
from dpo_rl.workers.megatron import head_positions, rope_positions
from dpo_rl.workers.megatron.parallel_state import torch_device

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, overrides: dict | None = None):
    """megatron-core ``TransformerConfig`` for ``model`` sharded as ``parallel``; ``overrides`` sets further
    ``TransformerConfig`` fields (a trained role's activation recomputation)."""
    from megatron.core.transformer.transformer_config import TransformerConfig  # deferred: heavy (megatron-core)

    problems = model.check() + parallel.check(model)
    if problems:
        raise ConfigError(problems)
    dtype = TORCH_DTYPES[parallel.params_dtype]
    on_cpu = parallel.device == "cpu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=parallel.params_dtype == "bf16",
        fp16=parallel.params_dtype == "fp16",
        attention_softmax_in_fp32=True,
        use_cpu_initialization=on_cpu,
        # Fused kernels are CUDA-only; the unfused paths are numerically the same.
        bias_activation_fusion=not on_cpu and model.swiglu,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_comm=not on_cpu,  # gloo has no batched isend/irecv
        deallocate_pipeline_outputs=False,
        **(overrides or {}),
    )


def layer_spec(parallel: ParallelConfig, use_transformer_engine: bool | None = None):
    """The decoder layer spec: TransformerEngine's on GPU when installed, else megatron's
    local spec with its core attention computed by PyTorch SDPA (:mod:`.sdpa_attention`) and, at
    TP = 1, linear layers with a direct forward (:mod:`.single_rank_linear`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # deferred: heavy (megatron-core)

    from dpo_rl.workers.megatron.sdpa_attention import SDPAttention  # deferred: imports megatron-core

    if use_transformer_engine is None:
        use_transformer_engine = parallel.device == "cuda" and _transformer_engine_available()
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (  # deferred: heavy (megatron-core)
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if parallel.tensor_model_parallel_size == 1:
        from dpo_rl.workers.megatron.single_rank_linear import (  # deferred: imports megatron-core
            SingleRankColumnLinear,
            SingleRankRowLinear,
        )

        mlp = spec.submodules.mlp.submodules
        attention.linear_qkv, mlp.linear_fc1 = SingleRankColumnLinear, SingleRankColumnLinear
        attention.linear_proj, mlp.linear_fc2 = SingleRankRowLinear, SingleRankRowLinear
    return spec


def _transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401  (deferred: GPU-only, optional)
    except ImportError:
        return False
    return True


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    use_transformer_engine: bool | None = None,
    share_embeddings: bool | None = None,
    overrides: dict | None = None,
):
    """A ``GPTModel`` for this process's pipeline stage (parallel state must be initialised)."""
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)
    from megatron.core.models.gpt import GPTModel  # deferred: heavy (megatron-core)

    config = transformer_config(model, parallel, overrides)
    tie = model.tie_word_embeddings if share_embeddings is None else share_embeddings
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(parallel, use_transformer_engine),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=tie,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=False,
    )
    if model.rope_scaling_type == "llama3":
        _apply_llama3_rope_scaling(gpt, model)
    if parallel.tensor_model_parallel_size == 1:  # the LM head is megatron's own layer under either spec
        from dpo_rl.workers.megatron.single_rank_linear import use_direct_output_layer  # deferred: megatron-core

        use_direct_output_layer(gpt)
    head_positions.install(gpt)  # losses read the response positions' logits only
    rope_positions.install(gpt)  # packed continuations of a shared prompt rotate by their own positions
    if parallel.device != "cpu":
        gpt = gpt.to(device=torch_device(parallel.device))
    return gpt


def _apply_llama3_rope_scaling(gpt, model: ModelConfig) -> None:
    """Scale RoPE inverse frequencies with all four Llama 3 parameters.

    megatron-core's ``rope_scaling`` fixes low/high frequency factors and the original
    context at 1, 4 and 8192; Llama 3.x checkpoints name them, so pass them through to
    megatron's own scaling function.
    """
    rope = gpt.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=model.rope_scaling_factor,
        low_freq_factor=model.low_freq_factor,
        high_freq_factor=model.high_freq_factor,
        original_max_position_embeddings=model.original_max_position_embeddings,
    )


class ScalarValueHead(nn.Module):
    """A scalar head with the call signature of GPTModel's output layer.

    ``GPTModel`` calls ``output_layer(hidden, weight=..., runtime_gather_output=...)`` and
    expects ``(output, bias)``. This head maps each position's hidden state [s, b, h] to
    one value [s, b, 1]; it is replicated on every TP rank (hidden states are full there).
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype, init_std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):  # noqa: ARG002
        return F.linear(hidden_states, self.weight), None


def build_reward_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    use_transformer_engine: bool | None = None,
    overrides: dict | None = None,
):
    """The GPT trunk with a scalar value head instead of the LM head.

    Its forward returns per-position values [b, s, 1] on the last stage; the reward is the
    value at each sequence's last real token.
    """
    gpt = build_gpt_model(
        model, parallel, use_transformer_engine=use_transformer_engine, share_embeddings=False, overrides=overrides
    )
    if gpt.post_process:
        param = next(gpt.parameters())
        gpt.output_layer = ScalarValueHead(model.hidden_size, param.dtype, model.init_method_std).to(
            param.device
        )
    return gpt
