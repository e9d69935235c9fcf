"""Attention masks and the SDPA core attention against megatron's own DotProductAttention."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron.forward import blocked_attention
from dpo_rl.workers.megatron.model_factory import transformer_config
from dpo_rl.workers.megatron.sdpa_attention import SDPAttention
from tests.tolerance import assert_close, assert_differs
from tests.workers.megatron.common import tiny_config


def test_blocked_attention_causal_padding_and_self():
    mask = torch.tensor([[0, 1, 1]])
    blocked = blocked_attention(mask)[0, 0].int().tolist()
    assert blocked == [
        [0, 1, 1],  # a padding query sees only itself
        [1, 0, 1],  # a real query never sees the padding key, nor the future
        [1, 0, 0],
    ]
    # Decode step: one query (the last position) over the whole cache.
    assert blocked_attention(mask, query_len=1)[0, 0].int().tolist() == [[1, 0, 0]]


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_sdpa_attention_equals_megatron_dot_product_attention(megatron_single_rank, groups):
    config = transformer_config(tiny_config("llama", num_query_groups=groups), ParallelConfig())
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, theirs = SDPAttention(**args), DotProductAttention(**args)
    g = torch.Generator().manual_seed(0)
    sq, b, heads, d = 9, 3, config.num_attention_heads, config.kv_channels
    q = torch.randn(sq, b, heads, d, generator=g)
    k = torch.randn(sq, b, groups, d, generator=g)
    v = torch.randn(sq, b, groups, d, generator=g)
    padding = torch.ones(b, sq, dtype=torch.long)
    padding[1, :3] = 0
    mask = blocked_attention(padding)
    out_ours, out_theirs = ours(q, k, v, mask), theirs(q, k, v, mask)
    assert out_ours.shape == out_theirs.shape == (sq, b, heads * d)
    real = padding.T.bool()  # [sq, b]
    assert_close(out_ours[real], out_theirs[real], rtol=1e-5, what="attention output")
    # Negative control: a non-causal mask must change the result.
    no_future_block = padding[:, None, None, :] == 0
    assert_differs(ours(q, k, v, no_future_block)[real], out_theirs[real], rtol=1e-5, what="non-causal mask")


def test_rope_angles_at_given_positions_are_megatrons_own(megatron_single_rank):
    """rope_positions.angles of 0..s-1 in every row is megatron's RotaryEmbedding output, bit for bit, per row;
    a row's shifted positions give the angles of those positions."""
    from dpo_rl.config.model import ParallelConfig
    from dpo_rl.workers.megatron import rope_positions
    from dpo_rl.workers.megatron.model_factory import build_gpt_model
    from tests.workers.megatron.common import tiny_config

    rope = build_gpt_model(tiny_config("llama", rope_scaling_type="llama3"), ParallelConfig()).rotary_pos_emb
    own = rope(12)  # [s, 1, 1, d]
    positions = torch.arange(12).expand(3, 12).clone()
    positions[2] += 5
    ours = rope_positions.angles(rope, positions)  # [s, b, 1, d]
    assert ours.shape == (12, 3, 1, own.shape[-1])
    assert torch.equal(ours[:, 0], own[:, 0]) and torch.equal(ours[:, 1], own[:, 0])
    assert torch.equal(ours[:7, 2], own[5:, 0])
