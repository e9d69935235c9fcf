"""Tokenizers load from local directories only; a missing or empty one names the setting, and the Hub is never tried."""

from __future__ import annotations

import pytest

from dpo_rl.data.tokenizers import load_local_tokenizer
from dpo_rl.errors import ConfigError


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    """Record transformers' loads (and their keyword arguments), calling the real one."""
    from transformers import AutoTokenizer

    calls, real = [], AutoTokenizer.from_pretrained

    def spy(path, *args, **kwargs):
        calls.append((str(path), kwargs))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    return calls


def test_a_hub_looking_name_is_refused_before_transformers_is_asked(from_pretrained_calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "gpt2" is no local directory here
    with pytest.raises(ConfigError, match=r"training.tokenizer_name_or_path='gpt2' is not a local directory"):
        load_local_tokenizer("gpt2", "training.tokenizer_name_or_path")
    assert from_pretrained_calls == []


def test_a_directory_without_tokenizer_files_is_named(from_pretrained_calls, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds no tokenizer files"):
        load_local_tokenizer(tmp_path, "reward.tokenizer_name_or_path")
    assert from_pretrained_calls == []


def test_a_local_tokenizer_loads_with_local_files_only(from_pretrained_calls, tokenizer_dir):
    tokenizer = load_local_tokenizer(tokenizer_dir, "training.tokenizer_name_or_path")
    assert tokenizer.vocab_size > 0
    assert from_pretrained_calls == [(str(tokenizer_dir), {"local_files_only": True})]
