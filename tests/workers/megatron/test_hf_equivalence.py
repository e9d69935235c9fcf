"""megatron-core models built by the factory reproduce HF transformers exactly (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.checkpoint import hf_weights
from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.forward import Microbatch, model_forward
from dpo_rl.workers.megatron.model_factory import build_gpt_model, build_reward_model
from tests.tolerance import assert_close, assert_differs
from tests.workers.megatron.common import (
    VOCAB,
    random_batch,
    tiny_config,
    tiny_hf_model,
)

#: Logits agree to this fraction of the largest logit (float32, the same maths in another order).
RTOL = 1e-5
CASES = {
    "llama": dict(family="llama"),
    "qwen2": dict(family="qwen2"),
    "llama3_rope_scaling_tied": dict(
        family="llama", rope_scaling_type="llama3", rope_scaling_factor=32.0,
        original_max_position_embeddings=32, tie_word_embeddings=True,
    ),
}


def mcore_from_hf(config, hf_model, reward=False):
    build = build_reward_model if reward else build_gpt_model
    model = build(config, ParallelConfig()).eval()
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config, reward=reward)
    return model


def logits_pair(config, hf_model, mcore_model, seq=96):
    ids, attention, _ = random_batch(3, seq)
    with torch.no_grad():
        ours = model_forward(mcore_model, Microbatch(ids, attention))
        theirs = hf_model(ids, attention_mask=attention).logits
    real = attention.bool()
    return ours[real], theirs[real]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(megatron_single_rank, case):
    config = tiny_config(**CASES[case])
    hf_model = tiny_hf_model(config)
    ours, theirs = logits_pair(config, hf_model, mcore_from_hf(config, hf_model))
    assert_close(ours, theirs, rtol=RTOL, what=f"{case} logits")


def test_negative_control_ungrouped_qkv_layout_fails(megatron_single_rank, monkeypatch):
    """Concatenating q, k, v without grouping them per KV group must break equivalence."""
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config)
    monkeypatch.setattr(hf_weights, "fuse_qkv", lambda q, k, v, cfg: torch.cat([q, k, v], dim=0))
    ours, theirs = logits_pair(config, hf_model, mcore_from_hf(config, hf_model))
    assert_differs(ours, theirs, rtol=RTOL, what="ungrouped qkv")


def test_negative_control_wrong_rotary_base_fails(megatron_single_rank):
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config)
    wrong = tiny_config("llama", rotary_base=500000.0)
    ours, theirs = logits_pair(config, hf_model, mcore_from_hf(wrong, hf_model))
    assert_differs(ours, theirs, rtol=RTOL, what="wrong rotary base")


def test_negative_control_missing_llama3_rope_scaling_fails(megatron_single_rank):
    config = tiny_config(**CASES["llama3_rope_scaling_tied"])
    hf_model = tiny_hf_model(config)
    unscaled = tiny_config("llama", tie_word_embeddings=True)
    ours, theirs = logits_pair(config, hf_model, mcore_from_hf(unscaled, hf_model))
    assert_differs(ours, theirs, rtol=RTOL, what="llama3 rope scaling missing")


def last_real_token_values(config, reward_model, ids, attention):
    with torch.no_grad():
        values = model_forward(reward_model, Microbatch(ids, attention))[..., 0]
    last = attention.shape[1] - 1 - attention.flip(-1).argmax(-1)  # index of the last real token
    return values.gather(1, last[:, None])[:, 0]


def reward_batch():
    """Right-padded rows (HF's sequence classifier scores the token before the first pad)."""
    ids = torch.randint(3, VOCAB, (4, 40), generator=torch.Generator().manual_seed(2))
    attention = torch.ones_like(ids)
    for row, length in enumerate((40, 31, 25, 12)):
        ids[row, length:] = 0
        attention[row, length:] = 0
    return ids, attention


def test_reward_variant_matches_sequence_classification(megatron_single_rank):
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config, reward=True)
    ours_model = mcore_from_hf(config, hf_model, reward=True)
    ids, attention = reward_batch()
    ours = last_real_token_values(config, ours_model, ids, attention)
    with torch.no_grad():
        theirs = hf_model(ids, attention_mask=attention).logits[:, 0]
    assert_close(ours, theirs, rtol=RTOL, what="reward values")


def test_reward_negative_control_wrong_position_fails(megatron_single_rank):
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config, reward=True)
    ours_model = mcore_from_hf(config, hf_model, reward=True)
    ids, attention = reward_batch()
    with torch.no_grad():
        values = model_forward(ours_model, Microbatch(ids, attention))[..., 0]
        theirs = hf_model(ids, attention_mask=attention).logits[:, 0]
    at_end = values[:, -1]  # the last *position*, padding for most rows
    assert_differs(at_end, theirs, rtol=RTOL, what="value read at the last position")
