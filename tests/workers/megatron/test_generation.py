"""KV-cached generation: equals HF greedy, equals the recompute path, reproducible per seed."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.batch import left_pad
from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.generation import (
    SamplingParams,
    choose_tokens,
    filter_logits,
    generate,
    sample_from_logits,
)
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.tolerance import assert_close
from tests.workers.megatron.common import VOCAB, tiny_config, tiny_hf_model

PROMPT_LENGTHS = (5, 11, 3, 8)


@pytest.fixture(scope="module")
def models(megatron_single_rank):
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config, seed=3)
    model = build_gpt_model(config, ParallelConfig())
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    return config, hf_model, model


def prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(hf_model, batch, max_new_tokens, eos):
    ids, mask = left_pad(batch, 0)
    return hf_model.generate(
        ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=list(eos), pad_token_id=0,
    )


def eos_ids_hit_early(hf_model, batch):
    """Two token ids that greedy decoding emits early in some rows, so EOS stopping is exercised."""
    free_run = hf_greedy(hf_model, batch, 12, eos=(1,))[:, max(PROMPT_LENGTHS):]
    return (int(free_run[0, 3]), int(free_run[2, 6]))


def test_greedy_equals_hf_generate_with_eos(models):
    _, hf_model, model = models
    batch = prompts()
    eos = eos_ids_hit_early(hf_model, batch)
    params = SamplingParams(max_new_tokens=24, do_sample=False, eos_token_ids=eos, pad_token_id=0)
    ours = generate(model, batch, params)
    theirs = hf_greedy(hf_model, batch, 24, eos)
    assert ours.ended_with_eos.any(), "the test must exercise EOS stopping"
    width = ours.sequences.shape[1]
    assert torch.equal(ours.sequences, theirs[:, :width])
    assert (theirs[:, width:] == 0).all()  # HF only padded after we stopped
    # Response masks end right after EOS.
    for row in range(len(batch)):
        response = ours.responses[row][ours.response_mask[row, ours.prompt_length:].bool()]
        if ours.ended_with_eos[row]:
            assert int(response[-1]) in eos and not any(int(t) in eos for t in response[:-1])


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_stopped_rows_leave_the_decode_batch(models, use_kv_cache):
    """Stopped rows leave the decode batch (once a quarter of it has stopped: with four rows, at every
    stop): summed over steps, the rows fed equal the summed response lengths (prefill feeds every row once)."""
    _, hf_model, model = models
    batch = prompts()
    eos = eos_ids_hit_early(hf_model, batch)
    fed = []
    hook = model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[0]))
    try:
        out = generate(model, batch, SamplingParams(max_new_tokens=24, do_sample=False, eos_token_ids=eos),
                       use_kv_cache=use_kv_cache)
    finally:
        hook.remove()
    lengths = out.response_mask.sum(-1)
    assert out.ended_with_eos.sum() >= 2 and fed[0] == len(batch) and fed[-1] < len(batch)
    assert fed == sorted(fed, reverse=True) and sum(fed) == int(lengths.sum())


def test_a_prompt_shared_by_several_rows_is_prefilled_once(models):
    """Rows repeating a prompt (n responses per prompt) share one prefill; their samples are those of the
    recompute path, which prefills nothing."""
    _, _, model = models
    batch = [p for p in prompts() for _ in range(3)]
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.8, seed=3)
    fed = []
    hook = model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[0]))
    try:
        cached = generate(model, batch, params)
    finally:
        hook.remove()
    recomputed = generate(model, batch, params, use_kv_cache=False)
    assert fed[0] == len(PROMPT_LENGTHS) and fed[1] == len(batch)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert not torch.equal(cached.responses[0], cached.responses[1])  # the rows still sample apart


def test_negative_control_perturbed_model_differs_from_hf(models):
    config, hf_model, _ = models
    perturbed = build_gpt_model(config, ParallelConfig())
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["model.layers.0.mlp.down_proj.weight"] += 0.5 * torch.randn_like(state["model.layers.0.mlp.down_proj.weight"])
    hf_interop.load_into_current_rank(perturbed, state, config)
    batch = prompts()
    params = SamplingParams(max_new_tokens=16, do_sample=False, pad_token_id=0)
    ours = generate(perturbed, batch, params)
    assert not torch.equal(ours.sequences, hf_greedy(hf_model, batch, 16, eos=(1,))[:, : ours.sequences.shape[1]])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=20, do_sample=False, eos_token_ids=(7,)),
        SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=4),
    ],
    ids=["greedy", "sampled"],
)
def test_kv_cache_equals_recompute(models, params):
    _, _, model = models
    cached = generate(model, prompts(), params, use_kv_cache=True)
    recomputed = generate(model, prompts(), params, use_kv_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert_close(cached.rollout_logprobs, recomputed.rollout_logprobs, rtol=1e-5, what="sampled tokens' log-probs")


def test_seeded_sampling_is_reproducible_and_seed_dependent(models):
    _, _, model = models
    params = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.0, seed=11)
    torch.manual_seed(123)
    first = generate(model, prompts(), params)
    torch.manual_seed(456)  # the global RNG must not matter
    second = generate(model, prompts(), params)
    other = generate(model, prompts(), SamplingParams(max_new_tokens=16, do_sample=True, seed=12))
    assert torch.equal(first.sequences, second.sequences)
    assert not torch.equal(first.sequences, other.sequences)


def test_top_k_one_is_greedy(models):
    _, _, model = models
    greedy = generate(model, prompts(), SamplingParams(max_new_tokens=10, do_sample=False))
    top1 = generate(model, prompts(), SamplingParams(max_new_tokens=10, do_sample=True, top_k=1, seed=9))
    assert torch.equal(greedy.sequences, top1.sequences)
    # rollout log-probs are the model's raw ones, whatever the filtering: top-k 1 reports greedy's
    assert torch.allclose(top1.rollout_logprobs, greedy.rollout_logprobs)
    assert (greedy.rollout_logprobs < 0).any()


def test_rollout_logprobs_are_raw_log_probs_of_the_chosen_tokens(models):
    """Under temperature and top-k, the reported log-probs are still the model's own (what the trainer
    computes for the same tokens), not the sampling distribution's."""
    from dpo_rl.workers.megatron.forward import Microbatch, model_forward
    from dpo_rl.workers.megatron.logprobs import sequence_logprobs

    _, _, model = models
    out = generate(model, prompts(), SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20,
                                                    seed=2))
    assert out.sequences.shape == out.attention_mask.shape == out.response_mask.shape
    assert out.response_mask[:, : out.prompt_length].sum() == 0
    with torch.no_grad():
        logits = model_forward(model, Microbatch(out.sequences, out.attention_mask))
    trainer = sequence_logprobs(logits, out.sequences, out.response_mask).token_logprobs[:, out.prompt_length - 1:]
    mask = out.response_mask[:, out.prompt_length:].bool()
    assert_close(out.rollout_logprobs[mask], trainer[mask], rtol=1e-5, what="rollout vs trainer log-probs")


def test_outputs_feed_a_training_forward(models):
    """Generation runs in inference mode; its outputs must still work under autograd."""
    from dpo_rl.workers.megatron.forward import Microbatch, model_forward
    from dpo_rl.workers.megatron.logprobs import sequence_logprobs

    _, _, model = models
    out = generate(model, prompts(), SamplingParams(max_new_tokens=6, do_sample=True, seed=1))
    logits = model_forward(model, Microbatch(out.sequences, out.attention_mask))
    sequence_logprobs(logits, out.sequences, out.response_mask).summed.sum().backward()
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # 0.5 + 0.3 reaches 0.8: the nucleus is the first two tokens.
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.81)).tolist() == [[False, False, False, True]]
    # A tiny top_p still keeps the most likely token.
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.01)).tolist() == [[False, True, True, True]]


def test_sampling_draws_each_token_with_its_softmax_probability():
    """200k draws of one distribution (with two never-allowed tokens, one of them last): each token's
    frequency is within 5 standard errors of its probability; a disallowed token is never drawn."""
    probs = torch.tensor([0.4, 0.0, 0.3, 0.2, 0.07, 0.03, 0.0])
    logits = probs.log().expand(200_000, -1)
    tokens = sample_from_logits(logits, torch.Generator().manual_seed(5))
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    frequency = counts / len(tokens)
    standard_error = (probs.double() * (1 - probs.double()) / len(tokens)).sqrt()
    assert counts[1] == 0 and counts[-1] == 0
    assert ((frequency - probs.double()).abs() <= 5 * standard_error + 1e-12).all(), frequency
    # seeded: the same generator state gives the same tokens, another seed other tokens
    again = sample_from_logits(logits[:64], torch.Generator().manual_seed(5))
    assert torch.equal(again, tokens[:64])
    assert not torch.equal(sample_from_logits(logits[:64], torch.Generator().manual_seed(6)), again)


def test_a_draw_at_the_very_top_takes_the_last_allowed_token(monkeypatch):
    """A uniform draw that rounds up to the total lands past the end; it must not land on a token with no
    weight (here the last two)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), float("-inf")]] * 3)
    monkeypatch.setattr(torch, "rand", lambda size, **kwargs: torch.ones(size, dtype=kwargs.get("dtype")))
    assert sample_from_logits(logits, None).tolist() == [2, 2, 2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("do_sample", [True, False])
def test_nonfinite_logits_stop_sampling(bad, do_sample):
    logits = torch.zeros(3, 8)
    logits[1, 4] = bad
    params = SamplingParams(do_sample=do_sample, temperature=0.7)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        choose_tokens(logits, params, torch.Generator().manual_seed(0))
    tokens, logprobs = choose_tokens(torch.zeros(3, 8), params, torch.Generator().manual_seed(0))
    assert torch.allclose(logprobs, torch.full((3,), -torch.log(torch.tensor(8.0))))


def test_bad_sampling_params_are_rejected(models):
    _, _, model = models
    with pytest.raises(ValueError, match="temperature=0"):
        generate(model, prompts(), SamplingParams(do_sample=True, temperature=0.0))
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(model, prompts(), SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], SamplingParams())
