"""The reward worker re-tokenizes only for another tokenizer, not for the actor's tokenizer at another path."""

from __future__ import annotations

import pytest

from dpo_rl.data.tokenizers import load_local_tokenizer
from dpo_rl.workers.reward import needs_retokenizing


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from tests.tokenizer_variants import build_variants

    return build_variants(tmp_path_factory.mktemp("variants"))


@pytest.mark.parametrize("reward, retokenize", [("copy", False), ("extra", True), ("eos", True)])
def test_only_another_tokenizer_is_re_tokenized_for(variants, reward, retokenize):
    actor, own = (load_local_tokenizer(variants[name], name) for name in ("base", reward))
    assert needs_retokenizing(actor, own) is retokenize
