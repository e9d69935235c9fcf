"""Model architecture files: every shipped file loads; bad files fail naming file, key and fix."""

from __future__ import annotations

import pytest

from dpo_rl.config.model import (
    MODEL_CONFIG_DIR,
    ModelConfig,
    ParallelConfig,
    load_model_config,
    shipped_model_config,
)
from dpo_rl.errors import ConfigError

SHIPPED = ["tiny", "tiny-rm", "llama32-1b", "llama3-8b", "qwen25-0.5b", "qwen25-7b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_files_load(name):
    config = shipped_model_config(name)
    assert config.check() == []
    assert config.num_attention_heads % config.num_query_groups == 0


def test_shipped_files_are_exactly_these():
    assert sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml")) == sorted(SHIPPED)


def test_family_specific_fields():
    assert shipped_model_config("qwen25-7b").add_qkv_bias
    assert not shipped_model_config("llama3-8b").add_qkv_bias
    assert shipped_model_config("llama32-1b").tie_word_embeddings
    assert shipped_model_config("llama32-1b").rope_scaling_type == "llama3"
    assert shipped_model_config("llama32-1b").rope_scaling_factor == 32.0
    assert shipped_model_config("qwen25-0.5b").tie_word_embeddings
    assert not shipped_model_config("qwen25-7b").tie_word_embeddings


def write(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def test_typo_is_an_error_naming_file_and_key(tmp_path):
    path = write(tmp_path, "m:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"m\.yaml:m.*num_layer"):
        load_model_config(path)


def test_wrong_type_is_an_error(tmp_path):
    path = write(tmp_path, "m:\n  hidden_size: wide\n")
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model_config(path)


def test_file_must_hold_one_named_model(tmp_path):
    path = write(tmp_path, "a:\n  num_layers: 2\nb:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match="exactly one top-level key"):
        load_model_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config("/nonexistent/model.yaml")


def test_architecture_rules_are_all_reported_at_once():
    config = ModelConfig(family="gpt2", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=6,
                         num_query_groups=4, vocab_size=256, max_position_embeddings=128)
    with pytest.raises(ConfigError) as err:
        from dpo_rl.config.model import model_config_from_dict

        model_config_from_dict(vars(config), source="x")
    text = str(err.value)
    assert "x.family='gpt2'" in text
    assert "num_attention_heads (6) must be a multiple of x.num_query_groups (4)" in text
    assert "hidden_size (64) must be a multiple of x.num_attention_heads (6)" in text
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    "parallel, expected",
    [
        (ParallelConfig(tensor_model_parallel_size=3), "num_attention_heads (4) must be a multiple of parallel.tensor_model_parallel_size (3)"),
        (ParallelConfig(pipeline_model_parallel_size=3), "num_layers (4) must be a multiple of parallel.pipeline_model_parallel_size (3)"),
        (ParallelConfig(params_dtype="fp8"), "params_dtype='fp8' is unknown"),
        (ParallelConfig(params_dtype="fp16"), "fp16 is not supported on CPU"),
        (ParallelConfig(device="tpu"), "device='tpu' is unknown"),
    ],
)
def test_parallel_rules(parallel, expected):
    problems = parallel.check(shipped_model_config("tiny"))
    assert any(expected in p for p in problems), problems


def test_tied_embeddings_with_pp_is_refused_on_cpu():
    tied = shipped_model_config("llama32-1b")
    problems = ParallelConfig(pipeline_model_parallel_size=2).check(tied)
    assert any("tie_word_embeddings=true is GPU-only" in p for p in problems)
    assert not ParallelConfig(pipeline_model_parallel_size=2, device="cuda").check(tied)


def test_a_missing_architecture_field_is_an_error_naming_the_file(tmp_path):
    shipped = (MODEL_CONFIG_DIR / "tiny.yaml").read_text()
    path = write(tmp_path, "\n".join(line for line in shipped.splitlines() if "num_layers" not in line) + "\n")
    with pytest.raises(ConfigError, match=r"m\.yaml:tiny: architecture field 'num_layers' is missing") as err:
        load_model_config(path)
    assert len(err.value.problems) == 1  # the other fields are there
