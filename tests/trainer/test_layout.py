"""Mini-batch layout over DP ranks, and the pair layout of an actor micro-batch."""

from __future__ import annotations

import torch

from dpo_rl.batch import Batch
from dpo_rl.trainer.loop import minibatch_layout
from dpo_rl.trainer.online_dpo import gather_pairs
from dpo_rl.workers.policy import pair_microbatch, split_pair_halves


def test_layout_deals_each_minibatch_evenly_to_dp_ranks():
    index, minibatch, weight = minibatch_layout(
        10, mini_batch_size=4, dp_size=2, micro_batch_size=1, epochs=2, shuffle=False, seed=0)
    per_rank = [slice(0, len(index) // 2), slice(len(index) // 2, len(index))]
    # 3 mini-batches per epoch (4, 4, 2 pairs), 2 epochs; each rank holds half of each.
    for rank in per_rank:
        assert minibatch[rank].tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    for m in range(6):
        rows = minibatch == m
        assert torch.isclose(weight[rows].sum(), torch.tensor(1.0))
    # Every real pair appears once per epoch; the rank-0 part of mini-batch 0 is pairs 0, 1.
    real = weight > 0
    assert sorted(index[real].tolist()) == sorted(list(range(10)) * 2)
    assert index[per_rank[0]][:2].tolist() == [0, 1] and index[per_rank[1]][:2].tolist() == [2, 3]


def test_layout_pads_with_zero_weight_rows_and_shuffles_by_seed():
    index, minibatch, weight = minibatch_layout(
        5, mini_batch_size=5, dp_size=2, micro_batch_size=2, epochs=1, shuffle=True, seed=1)
    assert len(index) == 8 and int((weight == 0).sum()) == 3
    again, _, _ = minibatch_layout(5, mini_batch_size=5, dp_size=2, micro_batch_size=2, epochs=1, shuffle=True, seed=1)
    other, _, _ = minibatch_layout(5, mini_batch_size=5, dp_size=2, micro_batch_size=2, epochs=1, shuffle=True, seed=2)
    assert torch.equal(index, again) and not torch.equal(index, other)


def test_micro_batch_with_several_prompts_lays_out_chosen_then_rejected():
    seqs = torch.arange(6)[:, None] * 100 + torch.arange(4)  # sample s has tokens s*100 + t
    rollout = -(torch.arange(6)[:, None] + torch.tensor([0.1, 0.2]))  # 2 response tokens: -(s + 0.1), -(s + 0.2)
    samples = Batch({"sequences": seqs, "attention_mask": torch.ones(6, 4, dtype=torch.long),
                     "response_mask": torch.tensor([[0, 0, 1, 1]] * 6), "rollout_logprobs": rollout})
    # Three prompts' pairs: (chosen, rejected) = (1, 0), (2, 3), (5, 4).
    pairs = gather_pairs(samples, torch.tensor([1, 2, 5]), torch.tensor([0, 3, 4]))
    micro = pair_microbatch(pairs)
    assert micro.input_ids[:, 0].tolist() == [100, 200, 500, 0, 300, 400]
    # the rollout log-probs follow their sequences and sit at the response tokens' positions
    assert torch.equal(micro.extras["rollout_logps"][:, :2], torch.zeros(6, 2))
    assert torch.allclose(micro.extras["rollout_logps"][:, 2:], rollout[[1, 2, 5, 0, 3, 4]])
    chosen, rejected = split_pair_halves(micro.input_ids[:, 0])
    assert chosen.tolist() == [100, 200, 500] and rejected.tolist() == [0, 300, 400]
