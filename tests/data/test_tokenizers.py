"""Tokenizers load from local directories only; a missing or empty one names the setting, and the Hub is never tried."""

from __future__ import annotations

import pytest

from dpo_rl.data.tokenizers import (
    TokenizerFingerprint,
    load_local_tokenizer,
    tokenizer_difference,
    tokenizer_dirs_difference,
    tokenizer_fingerprint,
)
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


# ---------------------------------------------------------------- is it the same tokenizer?
@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from tests.tokenizer_variants import build_variants

    return build_variants(tmp_path_factory.mktemp("variants"))


def test_a_copy_of_the_tokenizer_is_the_same_tokenizer(variants):
    assert tokenizer_dirs_difference(variants["copy"], "a", variants["base"], "b") is None


def test_one_directory_spelled_two_ways_is_the_same_without_loading(variants, from_pretrained_calls, monkeypatch):
    monkeypatch.chdir(variants["base"].parent)
    for spelling in (f"{variants['base']}/", "./base", "base/", "copy/../base"):
        assert tokenizer_dirs_difference(spelling, "a", variants["base"], "b") is None, spelling
    assert from_pretrained_calls == []


def test_one_added_token_is_a_different_tokenizer_and_is_named(variants):
    from tests.tokenizer_variants import EXTRA_TOKEN

    size = len(load_local_tokenizer(variants["base"], "b"))
    differs = tokenizer_dirs_difference(variants["extra"], "a", variants["base"], "b", ("the reference's", "the actor's"))
    assert differs == f"vocabulary sizes {size + 1} vs {size}; only in the reference's: {EXTRA_TOKEN!r}={size}"


def test_another_eos_is_a_different_tokenizer_and_is_named(variants):
    base, eos = (load_local_tokenizer(variants[name], name) for name in ("base", "eos"))
    assert (eos.eos_token_id, base.eos_token_id) == (0, 1)  # <pad> is 0, </s> is 1 in the tiny world
    assert tokenizer_dirs_difference(variants["eos"], "a", variants["base"], "b") == "eos_token_id 0 vs 1"


def test_the_difference_names_moved_ids_and_every_special_id():
    specials = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "unk_token_id": None}
    a = TokenizerFingerprint({"a": 0, "b": 1, "c": 2}, specials)
    assert tokenizer_difference(a, TokenizerFingerprint(dict(a.vocab), dict(specials))) is None
    swapped = TokenizerFingerprint({"a": 0, "b": 2, "c": 1}, {**specials, "pad_token_id": None, "unk_token_id": 3})
    assert tokenizer_difference(a, swapped) == ("2 token(s) with other ids: 'b' 1 vs 2, 'c' 2 vs 1; "
                                                "pad_token_id 0 vs None; unk_token_id None vs 3")
    many = TokenizerFingerprint({**a.vocab, **{f"t{i}": 3 + i for i in range(5)}}, specials)
    assert tokenizer_difference(a, many, ("A", "B")) == ("vocabulary sizes 3 vs 8; only in B: 't0'=3, 't1'=4, 't2'=5, "
                                                         "... (5 in all)")


def test_the_fingerprint_holds_added_tokens_and_the_special_ids(variants):
    from tests.tokenizer_variants import EXTRA_TOKEN

    extra = load_local_tokenizer(variants["extra"], "a")
    fingerprint = tokenizer_fingerprint(extra)
    assert fingerprint.vocab[EXTRA_TOKEN] == len(extra) - 1
    assert fingerprint.special_ids == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "unk_token_id": None}
