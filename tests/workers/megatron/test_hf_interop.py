"""Loading HF weights into this rank's model shard and exporting them back, and the load errors."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.checkpoint import hf_files
from dpo_rl.config.model import ParallelConfig
from dpo_rl.errors import ConfigError
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.workers.megatron.common import tiny_config, tiny_hf_model


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
