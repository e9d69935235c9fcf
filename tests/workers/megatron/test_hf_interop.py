"""Key-map maths (fuse/split, shard/unshard), loading HF weights into the model and its errors."""

from __future__ import annotations


import pytest
import torch

from dpo_rl.config.errors import ConfigError
from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_files
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.workers.megatron.common import tiny_config, tiny_hf_model


def test_fuse_qkv_groups_heads_per_kv_group():
    config = tiny_config("llama", num_attention_heads=4, num_query_groups=2, hidden_size=8)  # head_dim 2
    q = torch.arange(8).repeat_interleave(1)[:, None].float()  # rows 0..7: 4 heads x 2
    k = 100 + torch.arange(4)[:, None].float()  # 2 groups x 2
    v = 200 + torch.arange(4)[:, None].float()
    fused = hf_interop.fuse_qkv(q, k, v, config)[:, 0].tolist()
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    back = hf_interop.split_qkv(hf_interop.fuse_qkv(q, k, v, config), config)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("split", hf_interop.TP_SPLITS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_unshard_inverse(split, tp):
    full = torch.randn(8, 12)
    parts = [hf_interop.shard(full, split, r, tp) for r in range(tp)]
    assert torch.equal(hf_interop.unshard(parts, split), full)


def test_gate_up_shards_split_gate_and_up_separately():
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    local = hf_interop.shard(torch.cat([gate, up]), "gate_up", tp_rank=1, tp_size=2)
    assert local[:2].eq(0).all() and local[2:].eq(1).all()





def test_safetensors_checkpoint_loads_into_model(tmp_path, megatron_single_rank):
    config = tiny_config("qwen2")
    hf_model = tiny_hf_model(config)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    checkpoint = hf_files.HFCheckpoint(tmp_path)
    assert checkpoint.config() == config
    model = build_gpt_model(config, ParallelConfig())
    counts = hf_interop.load_into_current_rank(model, checkpoint, config)
    assert counts["loaded"] == len([k for k, v in model.state_dict().items() if torch.is_tensor(v)])
    exported = hf_interop.export_from_current_rank(model, config)
    assert all(torch.equal(exported[k], checkpoint.get(k)) for k in exported)


def test_missing_and_mismatched_tensors_are_reported(megatron_single_rank):
    config = tiny_config("llama")
    state = dict(tiny_hf_model(config).state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.norm.weight"] = torch.ones(7)
    model = build_gpt_model(config, ParallelConfig())
    with pytest.raises(ConfigError) as err:
        hf_interop.load_into_current_rank(model, state, config)
    text = str(err.value)
    assert "no tensor 'model.layers.1.mlp.up_proj.weight'" in text
    assert "model.norm.weight: shape (7,)" in text
