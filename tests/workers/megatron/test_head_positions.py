"""The LM head at the response targets only: the same log-probs, entropy and gradients as the full head, on
padded and packed rows, with the head computing only those rows; value heads are left alone."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import head_positions
from dpo_rl.workers.megatron.forward import Microbatch, model_forward, run_microbatches
from dpo_rl.workers.megatron.head_positions import response_target_positions
from dpo_rl.workers.megatron.logprobs import microbatch_logprobs, sequence_logprobs
from dpo_rl.workers.megatron.model_factory import build_reward_model
from tests.tolerance import assert_close
from tests.workers.megatron.common import VOCAB, tiny_config
from tests.workers.megatron.test_packing import shared_prompt_batch, varied_batch


def test_response_target_positions_are_the_positions_before_each_response_token():
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
    assert response_target_positions(response).tolist() == [1, 2, 5]  # row 0 predicts cols 2, 3; row 1 col 1


def test_head_computes_only_the_selected_rows_and_gives_their_full_head_logits(model):
    ids, attention, response = varied_batch()
    positions = response_target_positions(response)
    head_rows = []
    hook = model.output_layer.register_forward_hook(lambda module, args, out: head_rows.append(out[0].shape[:2]))
    try:
        with torch.no_grad():
            full = model_forward(model, Microbatch(ids, attention))
            picked = model_forward(model, Microbatch(ids, attention, head_positions=positions))
    finally:
        hook.remove()
    assert head_rows == [(ids.shape[1], ids.shape[0]), (len(positions), 1)]  # [s, b], then [T, 1]
    assert picked.shape == (len(positions), VOCAB)
    assert_close(picked, full.reshape(-1, VOCAB)[positions], rtol=1e-5, what="logits at the response targets")


@pytest.mark.parametrize("pack,batch", [(False, varied_batch), (True, varied_batch), (True, shared_prompt_batch)])
def test_training_step_with_the_head_at_the_targets_gives_the_full_head_loss_and_gradients(model, pack, batch):
    ids, attention, response = batch()

    def compute(output, micro):
        lp = microbatch_logprobs(output, micro, with_entropy=True)
        return lp.summed.sum(), {"summed": lp.summed.detach(), "entropy": lp.mean_entropy().detach(),
                                 "rows": torch.tensor([output.shape[0]])}

    results = {}
    for at_responses in (False, True):
        model.zero_grad(set_to_none=True)
        micro = Microbatch(ids, attention, {"response_mask": response})
        out = run_microbatches(model, [micro], compute, forward_only=False, pack=pack, share_prompts=True,
                               logits_at_responses=at_responses)
        assert (micro.head_positions is not None) == at_responses
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[at_responses] = (out[0], grads)
    model.zero_grad(set_to_none=True)
    (full, full_grads), (picked, picked_grads) = results[False], results[True]
    assert int(picked["rows"]) == int(response[:, 1:].sum())  # the head's output: one row per response target
    assert_close(picked["summed"], full["summed"], rtol=1e-5, what="summed response log-probs")
    assert_close(picked["entropy"], full["entropy"], rtol=1e-5, what="mean entropy")
    assert full_grads.keys() == picked_grads.keys() and "output_layer.weight" in picked_grads
    for name, grad in full_grads.items():
        assert_close(picked_grads[name], grad, rtol=1e-4, what=f"gradient of {name}")


def test_logits_of_other_positions_are_refused_as_targets():
    ids, _, response = varied_batch()
    with pytest.raises(ValueError, match="response targets"):
        sequence_logprobs(torch.zeros(3, VOCAB), ids, response, at_targets=True)


def test_run_microbatches_needs_a_response_mask_to_pick_the_head_rows(model):
    ids, attention, _ = varied_batch()
    with pytest.raises(ValueError, match=r"extras\['response_mask'\]"):
        run_microbatches(model, [Microbatch(ids, attention)], lambda out, m: (out.sum(), {}), forward_only=True,
                         logits_at_responses=True)


def test_value_heads_and_sequence_parallel_heads_compute_every_position(model, megatron_single_rank):
    assert head_positions.can_select(model)
    reward = build_reward_model(tiny_config("llama"), ParallelConfig())
    assert not head_positions.can_select(reward)  # its value head was not given the hook
    model.output_layer.sequence_parallel = True
    try:
        assert not head_positions.can_select(model)
    finally:
        model.output_layer.sequence_parallel = False
