"""HF config.json <-> ModelConfig, and reading checkpoint directories."""

from __future__ import annotations

import json

import pytest

from dpo_rl.checkpoint import hf_files
from dpo_rl.config.model import shipped_model_config
from dpo_rl.errors import ConfigError


@pytest.mark.parametrize("name", ["llama32-1b", "llama3-8b", "qwen25-0.5b", "qwen25-7b", "tiny"])
def test_hf_config_round_trip(name):
    config = shipped_model_config(name)
    assert hf_files.model_config_from_hf(hf_files.hf_config_dict(config)) == config


def test_transformers_reads_our_config_dict():
    config = shipped_model_config("llama32-1b")
    hf_cfg = hf_files.hf_transformers_config(config)
    assert hf_cfg.num_key_value_heads == 8 and hf_cfg.tie_word_embeddings
    # transformers 5 keeps rope scaling under rope_parameters; either spelling maps back.
    assert hf_files.model_config_from_hf(hf_cfg.to_dict()) == config


def test_unsupported_model_type():
    with pytest.raises(ConfigError, match="model_type='gpt2' is not supported"):
        hf_files.model_config_from_hf({"model_type": "gpt2"})


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        hf_files.HFCheckpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        hf_files.HFCheckpoint(tmp_path)
