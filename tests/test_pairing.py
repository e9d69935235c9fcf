"""Pairing strategies, ties, margins and several prompts per batch."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.pairing import build_pairs


def as_pairs(p):
    return list(zip(p.chosen.tolist(), p.rejected.tolist()))


def test_best_vs_worst_one_pair_per_prompt_across_interleaved_prompts():
    # Prompts 0, 1, 2 with 3 samples each, rows deliberately interleaved.
    index = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    scores = torch.tensor([0.1, 5.0, -1.0, 0.9, 2.0, -3.0, 0.5, 7.0, -2.0])
    pairs = build_pairs(scores, index)
    assert as_pairs(pairs) == [(3, 0), (7, 4), (2, 5)]
    assert pairs.candidates == 3 and pairs.ties == 0 and len(pairs) == 3


def test_all_pairs_orients_every_pair_by_score():
    index = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    pairs = build_pairs(scores, index, strategy="all_pairs")
    assert as_pairs(pairs) == [(1, 0), (2, 0), (1, 2), (3, 4)]
    assert all(scores[c] > scores[r] for c, r in as_pairs(pairs))


def test_ties_are_skipped_and_counted():
    index = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([1.0, 1.0, 2.0, 0.0])
    pairs = build_pairs(scores, index)
    assert as_pairs(pairs) == [(2, 3)]
    assert pairs.ties == 1 and pairs.dropped_ties == 1 and pairs.tie_rate == 0.5


def test_random_tie_policy_keeps_ties_with_seeded_orientation():
    index = torch.arange(40).repeat_interleave(2)
    scores = torch.zeros(80)
    a = build_pairs(scores, index, tie_policy="random", seed=3)
    b = build_pairs(scores, index, tie_policy="random", seed=3)
    c = build_pairs(scores, index, tie_policy="random", seed=4)
    assert len(a) == 40 and a.ties == 40 and a.dropped_ties == 0
    assert as_pairs(a) == as_pairs(b) and as_pairs(a) != as_pairs(c)
    flipped = sum(ch > rj for ch, rj in as_pairs(a))
    assert 0 < flipped < 40  # both orientations occur


def test_min_score_margin_drops_close_pairs():
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([1.0, 1.2, 0.0, 3.0, 5.0, 5.0])
    pairs = build_pairs(scores, index, strategy="all_pairs", min_score_margin=0.5, tie_policy="random")
    assert as_pairs(pairs) == [(3, 2)]
    assert pairs.dropped_margin == 1 and pairs.dropped_ties == 1  # ties never pass a positive margin


def test_single_sample_prompt_gives_no_pair_and_unknown_options_fail():
    assert len(build_pairs(torch.tensor([1.0]), torch.tensor([0]))) == 0
    with pytest.raises(ValueError, match="strategy"):
        build_pairs(torch.zeros(2), torch.zeros(2, dtype=torch.long), strategy="best_of_n")
    with pytest.raises(ValueError, match="tie_policy"):
        build_pairs(torch.zeros(2), torch.zeros(2, dtype=torch.long), tie_policy="coin")


def test_late_pairing_orients_each_prompts_two_samples_as_the_rule_pairs_them():
    from dpo_rl.batch import Batch
    from dpo_rl.pairing import LatePairing, PairingRule, prompt_pairs

    class Ready:  # the reward call's result, already in
        def __init__(self, scores):
            self.scores = scores

        def resolve(self):
            return Batch({"scores": self.scores})

    prompt_index = torch.tensor([2, 0, 1, 0, 3, 1, 2, 3])  # interleaved, as DP shards come back
    first, second = prompt_pairs(prompt_index)
    assert first.tolist() == [1, 2, 0, 4] and second.tolist() == [3, 5, 6, 7]
    eos = torch.tensor([True, True, True, True, True, True, False, True])
    # prompt 0: 3 beats 1 (swapped); 1: 2 beats 5; 2: 0 beats 6 only through 6's missing-EOS penalty; 3: tie
    scores = torch.tensor([0.5, 0.1, 0.7, 0.4, 0.3, 0.2, 1.2, 0.3])
    rule = PairingRule(strategy="best_vs_worst", min_score_margin=0.0, tie_policy="skip", missing_eos_penalty=1.0,
                       seed=0)
    pairs = rule.pairs(scores, eos, prompt_index)
    assert sorted(zip(pairs.chosen.tolist(), pairs.rejected.tolist())) == [(0, 6), (2, 5), (3, 1)]
    # layout: prompts 0 and 1 in mini-batch 0, prompts 2 and 3 in mini-batch 1, plus a padding row
    rows_first = torch.cat([first, first[-1:]])
    minibatch = torch.tensor([0, 0, 1, 1, 1])
    weight = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0])
    late = LatePairing(Ready(scores), rule, prompt_index, eos, first=rows_first,
                       second=torch.cat([second, second[-1:]]), minibatch=minibatch, laid_out=weight > 0)
    swapped, new_weight = late.rows(rows_first, minibatch, weight)
    assert swapped.tolist() == [True, False, False, False, False]
    assert new_weight.tolist() == [0.5, 0.5, 1.0, 0.0, 0.0]  # the tie's row and the padding count for nothing
    assert [late.pairs_in(m) for m in (0, 1, 2)] == [2, 1, 0]
    oriented = {(int(s if w else f), int(f if w else s)) for f, s, w, k in
                zip(rows_first, torch.cat([second, second[-1:]]), swapped, new_weight) if k > 0}
    assert oriented == set(zip(pairs.chosen.tolist(), pairs.rejected.tolist()))


def test_prompt_pairs_needs_two_samples_per_prompt():
    from dpo_rl.pairing import prompt_pairs

    with pytest.raises(ValueError, match="exactly two samples"):
        prompt_pairs(torch.tensor([0, 0, 0, 1, 1, 1]))


def test_length_penalty_lowers_scores_beyond_the_target_and_can_change_the_pair():
    from dpo_rl.pairing import PairingRule, length_penalty

    lengths = torch.tensor([3, 8, 12, 5])
    assert length_penalty(lengths, 0.5, 5).tolist() == [0.0, 1.5, 3.5, 0.0]
    scores, eos = torch.tensor([1.0, 2.0, 3.0, 1.5]), torch.ones(4, dtype=torch.bool)
    prompt_index = torch.zeros(4, dtype=torch.long)
    plain = PairingRule(strategy="best_vs_worst", min_score_margin=0.0, tie_policy="skip", missing_eos_penalty=1.0,
                        seed=0)
    assert as_pairs(plain.pairs(scores, eos, prompt_index, lengths)) == [(2, 0)]  # the longest scores highest
    rule = PairingRule(strategy="best_vs_worst", min_score_margin=0.0, tie_policy="skip", missing_eos_penalty=1.0,
                       seed=0, length_penalty=0.5, length_penalty_target=5)
    assert rule.penalized(scores, eos, lengths).tolist() == [1.0, 0.5, -0.5, 1.5]
    assert as_pairs(rule.pairs(scores, eos, prompt_index, lengths)) == [(3, 2)]  # now it is the worst
    with pytest.raises(ValueError, match="response lengths"):
        rule.pairs(scores, eos, prompt_index)


def test_paired_samples_keeps_only_paired_samples_and_points_each_pair_at_its_rows():
    from dpo_rl.batch import Batch
    from dpo_rl.trainer.online_dpo import gather_pairs, paired_samples

    # three prompts x four samples, interleaved as DP shards come back; best-vs-worst pairs two of each four
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.4, 0.3, 0.8, 0.6, 0.5, 0.1, 0.45])
    pairs = build_pairs(scores, prompt_index)
    assert as_pairs(pairs) == [(3, 0), (1, 10), (8, 5)]
    sequences = torch.arange(12)[:, None] * 10 + torch.arange(4)  # each sample's row is recognisable
    samples = Batch({"sequences": sequences, "prompt_index": prompt_index, "attention_mask": torch.ones(12, 4),
                     "response_mask": torch.ones(12, 4), "rollout_logprobs": torch.zeros(12, 3)})
    paired, chosen, rejected = paired_samples(samples, pairs)
    assert len(paired) == 6 and paired["sequences"][:, 0].tolist() == [0, 10, 30, 50, 80, 100]
    rows = gather_pairs(paired, chosen, rejected)
    assert rows["chosen_ids"][:, 0].tolist() == [30, 10, 80] and rows["rejected_ids"][:, 0].tolist() == [0, 100, 50]
    assert (paired["prompt_index"][chosen] == paired["prompt_index"][rejected]).all()
    bad = build_pairs(scores, prompt_index)
    bad.rejected = torch.tensor([1, 0, 5])  # a pair across prompts 0 and 1
    with pytest.raises(RuntimeError, match="different prompts"):
        paired_samples(samples, bad)


def test_shared_response_tokens_are_each_pairs_shorter_response_and_a_sample_has_one_pair():
    from dpo_rl.pairing import shared_response_tokens

    # response targets (response_mask[:, 1:]) per sample: 3, 5, 2, 4, 1
    response = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1],
                             [0, 0, 0, 0, 0, 1]])
    shared = shared_response_tokens(response, torch.tensor([1, 3]), torch.tensor([0, 2]))
    assert shared.tolist() == [3, 3, 2, 2, 0]  # sample 4 is in no pair
    with pytest.raises(ValueError, match="several pairs"):
        shared_response_tokens(response, torch.tensor([1, 1]), torch.tensor([0, 2]))
