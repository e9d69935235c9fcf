"""Packed rows (padding removal, prefix sharing): the plan, and a model forward/backward on packed rows equal to the
padded one."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.workers.megatron.forward import Microbatch, model_forward, run_microbatches
from dpo_rl.workers.megatron.logprobs import sequence_logprobs
from dpo_rl.workers.megatron.packing import plan_packing
from tests.tolerance import assert_close
from tests.workers.megatron.common import VOCAB

#: (left padding, prompt + response tokens) per row, in a width of 44: lengths from 5 to 40.
ROWS = [(0, 40), (6, 12), (3, 25), (10, 8), (1, 30), (0, 15), (20, 10), (2, 5)]
WIDTH = 44


def varied_batch(seed: int = 7):
    """Rows [left padding | real tokens | right padding] with the lengths of ROWS; the second half of each
    row's real tokens is its response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(ROWS), WIDTH, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for row, (left, n) in enumerate(ROWS):
        ids[row, left:left + n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention[row, left:left + n] = 1
        response[row, left + n // 2:left + n] = 1
    return ids, attention, response


def test_plan_packs_every_real_token_once_into_fewer_rows():
    ids, attention, _ = varied_batch()
    plan = plan_packing(attention)
    assert plan.width == 40 and plan.rows < len(ROWS)
    assert int(plan.real.sum()) == int(attention.sum())  # every real token, once
    packed = plan.pack(ids)
    assert sorted(packed[plan.segments > 0].tolist()) == sorted(ids[attention.bool()].tolist())
    # unpacking puts each token back in its place and zeros on padding
    back = plan.unpack(plan.pack(torch.arange(ids.numel()).view_as(ids))[..., None])[..., 0]
    assert torch.equal(back, torch.where(attention.bool(), torch.arange(ids.numel()).view_as(ids), 0))
    # each sequence keeps its own positions 0..n-1
    for segment in range(1, len(ROWS) + 1):
        assert plan.positions[plan.segments == segment].tolist() == list(range(ROWS[segment - 1][1]))


def test_at_positions_reads_the_packed_output_of_given_padded_positions():
    ids, attention, _ = varied_batch()
    plan = plan_packing(attention)
    flat_ids = torch.arange(ids.numel()).view_as(ids)
    packed = plan.pack(flat_ids)[..., None]  # each packed position holds its padded flat index
    wanted = attention.flatten().nonzero().flatten()[torch.randperm(int(attention.sum()))[:30]]
    assert torch.equal(plan.at_positions(packed, wanted)[:, 0], wanted)
    with pytest.raises(ValueError, match="padding"):
        plan.at_positions(packed, torch.tensor([WIDTH - 1]))  # row 0 is padding after its 40 tokens


def test_packed_logits_without_their_plan_are_refused():
    ids, attention, response = varied_batch()
    plan = plan_packing(attention)
    packed_logits = torch.randn(plan.rows, plan.width, VOCAB)
    with pytest.raises(ValueError, match="packing=micro.packing"):
        sequence_logprobs(packed_logits, ids, response)


def test_attention_never_crosses_sequences_and_no_query_is_fully_blocked():
    _, attention, _ = varied_batch()
    plan = plan_packing(attention)
    blocked = plan.blocked_attention()[:, 0]  # [R, W(q), W(k)]
    seg = plan.segments
    visible = ~blocked
    same = seg[:, :, None] == seg[:, None, :]
    real_query = (seg > 0)[:, :, None]
    assert not (visible & real_query & ~same).any()
    assert visible.any(dim=-1).all()
    # a real token sees exactly its own sequence's tokens up to itself
    assert int((visible & real_query).sum()) == sum(n * (n + 1) // 2 for _, n in ROWS)


def test_no_plan_when_packing_saves_no_row_and_an_error_for_padding_inside_a_row():
    assert plan_packing(torch.ones(4, 10, dtype=torch.long)) is None
    holes = torch.ones(2, 6, dtype=torch.long)
    holes[1, 3] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have padding between real tokens"):
        plan_packing(holes)


def test_packed_forward_gives_the_padded_logits_on_every_real_token(model):
    ids, attention, _ = varied_batch()
    padded_micro = Microbatch(ids, attention)
    packed_micro = Microbatch(ids, attention, packing=plan_packing(attention))
    with torch.no_grad():
        padded = model_forward(model, padded_micro)
        packed = packed_micro.padded(model_forward(model, packed_micro))
    real = attention.bool()
    assert_close(packed[real], padded[real], rtol=1e-5, what="logits of real tokens, packed vs padded")
    assert (packed[~real] == 0).all()


def test_packed_training_step_gives_the_padded_loss_and_gradients(model):
    """run_microbatches with pack=True: the same summed response log-probs and parameter gradients."""
    ids, attention, response = varied_batch()

    def compute(output, micro):
        lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"], with_entropy=True,
                               packing=micro.packing)
        return lp.summed.sum(), {"summed": lp.summed.detach(), "entropy": lp.mean_entropy().detach()}

    results = {}
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        micro = Microbatch(ids, attention, {"response_mask": response})
        out = run_microbatches(model, [micro], compute, forward_only=False, pack=pack)
        assert (micro.packing is not None) == pack
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[pack] = (out[0], grads)
    model.zero_grad(set_to_none=True)
    (padded, padded_grads), (packed, packed_grads) = results[False], results[True]
    assert_close(packed["summed"], padded["summed"], rtol=1e-5, what="summed response log-probs")
    assert_close(packed["entropy"], padded["entropy"], rtol=1e-5, what="mean entropy")
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    for name, grad in padded_grads.items():
        assert_close(packed_grads[name], grad, rtol=1e-4, what=f"gradient of {name}")


def shared_prompt_batch(seed: int = 3):
    """Rows [left padding | prompt | response | right padding] where rows 0, 3 and 5 share one prompt, rows 1
    and 4 another (different responses), row 2 has its own, and row 6 has no response tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (9, 6, 11)]
    layout = [(0, 5), (1, 7), (2, 4), (0, 12), (1, 2), (0, 1), (2, 0)]  # (prompt, response length)
    width = 24
    ids = torch.zeros(len(layout), width, dtype=torch.long)
    attention, response = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (prompt, n) in enumerate(layout):
        tokens = torch.cat([prompts[prompt], torch.randint(3, VOCAB, (n,), generator=g)])
        left = row % 3
        ids[row, left:left + len(tokens)] = tokens
        attention[row, left:left + len(tokens)] = 1
        response[row, left + len(prompts[prompt]):left + len(tokens)] = 1
    return ids, attention, response


def test_sequences_with_one_prompt_share_one_copy_of_it():
    ids, attention, response = shared_prompt_batch()
    plan = plan_packing(attention, input_ids=ids, response_mask=response)
    prompts_once = 9 + 6 + 11  # row 6 (no response: its prompt is all of it) shares row 2's prompt
    assert int(plan.real.sum()) == prompts_once + int(response.sum())
    # every real padded position reads the packed position holding its token
    assert torch.equal(plan.unpack(plan.pack(ids)[..., None])[..., 0], ids * attention)
    # a continuation sees its prompt and itself, never another continuation of the same prompt
    blocked = plan.blocked_attention()[:, 0]
    visible = ~blocked & (plan.segments > 0)[:, :, None]
    branch = plan.branches
    assert not (visible & (branch[:, :, None] != branch[:, None, :]) & (branch[:, None, :] != 0)).any()
    # each token sees as many keys as it has tokens up to itself in its own sequence
    seen = visible.sum(-1)
    assert torch.equal(seen[plan.segments > 0], plan.positions[plan.segments > 0] + 1)


def test_shared_prompt_forward_gives_the_padded_logits_and_gradients(model):
    ids, attention, response = shared_prompt_batch()

    def compute(output, micro):
        lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"], packing=micro.packing,
                               with_entropy=True)
        values = micro.padded(output) * micro.attention_mask[..., None]  # every real token's logits, shared or not
        return lp.summed.sum() + values[..., :7].sum() * 1e-3, {"summed": lp.summed.detach(),
                                                                "entropy": lp.mean_entropy().detach(),
                                                                "logits": values.detach()}

    results = {}
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        micro = Microbatch(ids, attention, {"response_mask": response})
        out = run_microbatches(model, [micro], compute, forward_only=False, pack=pack, share_prompts=True)
        if pack:
            assert micro.packing.shares_prompts
            assert micro.packing.rows * micro.packing.width < int(attention.sum())  # fewer positions than tokens
        results[pack] = (out[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    (padded, padded_grads), (shared, shared_grads) = results[False], results[True]
    real = attention.bool()
    assert_close(shared["logits"][real], padded["logits"][real], rtol=1e-5, what="logits of every real token")
    assert_close(shared["summed"], padded["summed"], rtol=1e-5, what="summed response log-probs")
    assert_close(shared["entropy"], padded["entropy"], rtol=1e-5, what="mean entropy")
    for name, grad in padded_grads.items():
        assert_close(shared_grads[name], grad, rtol=1e-4, what=f"gradient of {name}")


def test_shared_spans_stay_within_twice_the_padded_width_and_empty_prompts_are_not_shared():
    width, prompt = 12, torch.arange(3, 9)  # six prompt tokens, then six response tokens in every row
    ids = torch.cat([prompt.expand(5, 6), torch.arange(20, 50).view(5, 6)], dim=1)
    attention, response = torch.ones(5, width, dtype=torch.long), torch.zeros(5, width, dtype=torch.long)
    response[:, 6:] = 1
    plan = plan_packing(attention, input_ids=ids, response_mask=response)
    assert plan.width <= 2 * width  # a span holds the prompt and three responses (24), not all five (36)
    assert int(plan.real.sum()) == 2 * 6 + 5 * 6  # two prompt copies
    # every token a response token (no prompt): nothing is shared, each sequence is its own span
    lengths = [10, 4, 3, 2]
    attention = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    plan = plan_packing(attention, input_ids=torch.arange(40).view(4, 10), response_mask=attention)
    assert plan.rows == 2 and not plan.shares_prompts
    assert sorted(plan.segments.unique().tolist()) == [0, 1, 2, 3, 4]
