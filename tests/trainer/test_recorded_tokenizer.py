"""An offline dataset's recorded tokenizer is compared with the trained model's as a tokenizer, not as a path."""

from __future__ import annotations

import pytest

from dpo_rl.trainer.offline_stages import recorded_tokenizer_warning

KEY = "actor_rollout_ref.actor_rollout.tokenizer_name_or_path"


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    from tests.tokenizer_variants import build_variants

    return build_variants(tmp_path_factory.mktemp("variants"))


def test_the_same_tokenizer_at_another_path_or_spelling_gives_no_warning(variants):
    assert recorded_tokenizer_warning("data.train_path=d", str(variants["copy"]), KEY, str(variants["base"])) is None
    assert recorded_tokenizer_warning("data.train_path=d", f"{variants['base']}/", KEY, str(variants["base"])) is None


def test_another_tokenizer_is_named_with_what_differs(variants):
    warning = recorded_tokenizer_warning("data.train_path=d", str(variants["eos"]), KEY, str(variants["base"]))
    assert warning == (f"data.train_path=d was tokenized with {variants['eos']}, not with the trained model's tokenizer "
                       f"{KEY}={variants['base']} (model vs dataset: eos_token_id 1 vs 0); preprocess it again with "
                       f"--tokenizer-name-or-path {variants['base']}")


def test_a_recorded_tokenizer_missing_here_cannot_be_compared(variants, tmp_path):
    warning = recorded_tokenizer_warning("data.train_path=d", str(tmp_path / "gone"), KEY, str(variants["base"]))
    assert warning.startswith(f"data.train_path=d was tokenized with {tmp_path / 'gone'}, which is not a directory "
                              "here, so it cannot be compared")
