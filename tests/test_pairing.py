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
