"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron-core's local ``DotProductAttention`` (it subclasses it, so head
counts, TP partitioning and softmax scale come from megatron): same inputs
(query [sq, b, np, hn], key/value [sk, b, ng, hn], boolean mask [b, 1, sq, sk] with True
= blocked) and output [sq, b, np * hn]. It lets PyTorch pick its fused CPU kernel and
attends grouped KV heads natively (``enable_gqa``) instead of materialising
``repeat_interleave`` copies of K and V. Used in the local layer spec (CPU); GPU runs use
TransformerEngine's attention when it is installed.

Masks must leave every query at least one visible key (``forward.blocked_attention``
always lets a position see itself); a fully blocked row would give NaN here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """megatron-core ``DotProductAttention`` computed with PyTorch SDPA."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        keep = None if attention_mask is None else ~attention_mask
        is_causal = keep is None and mask_type == AttnMaskType.causal and sq == sk
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=keep,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition,
        )
        return context.permute(2, 0, 1, 3).reshape(sq, context.shape[0], self.hidden_size_per_partition)
