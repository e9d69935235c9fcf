"""Key-map maths: fuse/split, shard/unshard."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.checkpoint import hf_weights
from tests.workers.megatron.common import tiny_config


def test_fuse_qkv_groups_heads_per_kv_group():
    config = tiny_config("llama", num_attention_heads=4, num_query_groups=2, hidden_size=8)  # head_dim 2
    q = torch.arange(8).repeat_interleave(1)[:, None].float()  # rows 0..7: 4 heads x 2
    k = 100 + torch.arange(4)[:, None].float()  # 2 groups x 2
    v = 200 + torch.arange(4)[:, None].float()
    fused = hf_weights.fuse_qkv(q, k, v, config)[:, 0].tolist()
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    back = hf_weights.split_qkv(hf_weights.fuse_qkv(q, k, v, config), config)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("split", hf_weights.TP_SPLITS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_inverse(split, tp):
    full = torch.randn(8, 12)
    parts = [hf_weights.shard(full, split, r, tp) for r in range(tp)]
    assert torch.equal(hf_weights.unshard(parts, split), full)


def test_gate_up_shards_split_gate_and_up_separately():
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    local = hf_weights.shard(torch.cat([gate, up]), "gate_up", tp_rank=1, tp_size=2)
    assert local[:2].eq(0).all() and local[2:].eq(1).all()
