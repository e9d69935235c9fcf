"""Response log-probs and entropy from megatron logits equal those computed from HF logits."""

from __future__ import annotations

import torch

from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.forward import Microbatch, model_forward
from dpo_rl.workers.megatron.logprobs import sequence_logprobs, vocab_parallel_entropy, vocab_parallel_token_logprobs
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.tolerance import assert_close, assert_differs
from tests.workers.megatron.common import random_batch, tiny_config, tiny_hf_model

#: Per-token log-probs and entropies agree to this fraction of their largest value; summed log-probs
#: (~ -150 here) each to this fraction of their own size.
RTOL = 1e-5


def reference_from_hf_logits(logits, ids, response_mask):
    """The textbook computation: log_softmax, gather the next token, mask, sum."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, ids[:, 1:, None])[..., 0]
    mask = response_mask[:, 1:].float()
    entropy = -(logp.exp() * logp).sum(-1)
    return token, (token * mask).sum(-1), entropy


def setup():
    config = tiny_config("qwen2")
    hf_model = tiny_hf_model(config)
    model = build_gpt_model(config, ParallelConfig()).eval()
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    ids, attention, response = random_batch(4, 48, prompt_lens=[20, 10, 30, 24])
    with torch.no_grad():
        ours_logits = model_forward(model, Microbatch(ids, attention))
        hf_logits = hf_model(ids, attention_mask=attention).logits
    return ids, response, ours_logits, hf_logits


def test_logprobs_and_entropy_match_hf(megatron_single_rank):
    ids, response, ours_logits, hf_logits = setup()
    ours = sequence_logprobs(ours_logits, ids, response, with_entropy=True)
    token, summed, entropy = reference_from_hf_logits(hf_logits, ids, response)
    mask = response[:, 1:].bool()
    assert_close(ours.token_logprobs[mask], token[mask], rtol=RTOL, what="token log-probs")
    assert_close(ours.summed, summed, rtol=RTOL, scale=0.0, what="summed log-probs")
    assert_close(ours.entropy[mask], entropy[mask], rtol=RTOL, what="entropy")
    assert torch.equal(ours.num_tokens, response[:, 1:].sum(-1).float())
    # Summed log-probs really do depend on the mask (not a trivially shared value).
    assert len(set(ours.summed.tolist())) == 4


def test_logits_are_not_modified(megatron_single_rank):
    ids, response, ours_logits, _ = setup()
    before = ours_logits.clone()
    sequence_logprobs(ours_logits, ids, response, with_entropy=True)
    assert torch.equal(before, ours_logits)


def test_negative_control_off_by_one_alignment_fails(megatron_single_rank):
    ids, response, ours_logits, hf_logits = setup()
    # Scoring each token with the logits *at its own position* (no shift) is the classic bug.
    wrong = sequence_logprobs(torch.cat([ours_logits[:, 1:], ours_logits[:, -1:]], 1), ids, response)
    _, summed, _ = reference_from_hf_logits(hf_logits, ids, response)
    assert_differs(wrong.summed, summed, rtol=RTOL, scale=0.0, what="logits not shifted")


def test_logprob_gradients_match_autograd_reference(megatron_single_rank):
    logits = torch.randn(2, 7, 32, dtype=torch.float64).float().requires_grad_()
    ids = torch.randint(0, 32, (2, 7))
    response = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])
    ours = sequence_logprobs(logits, ids, response, with_entropy=True)
    (ours.summed.sum() + ours.mean_entropy().sum()).backward()
    ours_grad = logits.grad.clone()
    logits.grad = None
    token, summed, entropy = reference_from_hf_logits(logits, ids, response)
    mask = response[:, 1:].float()
    (summed.sum() + ((entropy * mask).sum(-1) / mask.sum(-1)).sum()).backward()
    assert_close(ours_grad, logits.grad, rtol=RTOL, what="gradient wrt the logits")


def test_vocab_parallel_path_equals_the_one_rank_path(megatron_single_rank):
    """With TP = 1, sequence_logprobs takes one log_softmax; the vocab-parallel functions (used under TP)
    give the same numbers on one rank, so the two paths cannot drift apart."""
    ids, response, ours_logits, _ = setup()
    one_rank = sequence_logprobs(ours_logits, ids, response, with_entropy=True)
    shifted = ours_logits[:, :-1]
    response_positions = response[:, 1:].bool()  # the one-rank path reads these positions only (0 elsewhere)
    assert_close(vocab_parallel_token_logprobs(shifted, ids[:, 1:])[response_positions],
                 one_rank.token_logprobs[response_positions], rtol=RTOL, what="vocab-parallel token log-probs")
    assert not one_rank.token_logprobs[~response_positions].any()
    assert_close(vocab_parallel_entropy(shifted)[response_positions], one_rank.entropy[response_positions],
                 rtol=RTOL, what="vocab-parallel entropy")
    assert not one_rank.entropy[~response_positions].any()
    assert_close(one_rank.mean_entropy(), (vocab_parallel_entropy(shifted) * one_rank.mask).sum(-1)
                 / one_rank.num_tokens.clamp(min=1), rtol=RTOL, what="mean response entropy")


def test_wpo_log_sum_sq_probs_match_hf_and_the_vocab_parallel_path(megatron_single_rank):
    """WPO's log sum_v p_v^2 (one-rank log_softmax and vocab-parallel reductions) equals the textbook
    log(sum(softmax^2)) from HF's logits, and wpo_logps averages log p - log sum p^2 over each response."""
    from dpo_rl.workers.megatron.logprobs import vocab_parallel_log_sum_sq_probs

    ids, response, ours_logits, hf_logits = setup()
    ours = sequence_logprobs(ours_logits, ids, response, with_sum_sq=True)
    probs = torch.softmax(hf_logits[:, :-1].float(), dim=-1)
    expected = (probs ** 2).sum(-1).log()
    mask = response[:, 1:].bool()
    assert_close(ours.log_sum_sq_probs[mask], expected[mask], rtol=RTOL, what="log sum p^2")
    assert_close(vocab_parallel_log_sum_sq_probs(ours_logits[:, :-1])[mask], expected[mask], rtol=RTOL,
                 what="vocab-parallel log sum p^2")
    token, _, _ = reference_from_hf_logits(hf_logits, ids, response)
    aligned = ((token - expected) * mask).sum(-1) / mask.sum(-1)
    assert_close(ours.wpo_logps(), aligned, rtol=RTOL, scale=0.0, what="WPO aligned log-probs")
    assert not ours.wpo_logps().requires_grad and ours.log_sum_sq_probs[~mask].eq(0).all()


def test_ld_summed_counts_the_shared_tokens_fully_and_the_rest_at_alpha():
    from dpo_rl.workers.megatron.logprobs import SequenceLogprobs

    token = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])  # 4 and 2 response targets
    lp = SequenceLogprobs(token_logprobs=token, mask=mask)
    shared = torch.tensor([2, 2])  # the pair's shorter response
    assert lp.ld_summed(shared, 0.5).tolist() == [-1.0 - 2.0 + 0.5 * (-3.0 - 4.0), -11.0]
    assert lp.ld_summed(shared, 1.0).tolist() == lp.summed.tolist()
    assert lp.ld_summed(shared, 0.0).tolist() == [-3.0, -11.0]
