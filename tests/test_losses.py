"""DPO losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_rl.losses import PairLogps, compute_dpo_loss


def logps(c, r, rc, rr, nc=None, nr=None):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(c), t(r), t(rc), t(rr), t(nc or [1.0] * len(c)), t(nr or [1.0] * len(c)))


def test_sigmoid_matches_hand_computation():
    lp = logps([-1.0, -5.0], [-3.0, -2.0], [-2.0, -4.0], [-2.0, -2.0])
    out = compute_dpo_loss(lp, "sigmoid", beta=0.5)
    # h = (c - r) - (rc - rr): [2 - 0, -3 - (-2)] = [2, -1]
    expected = [-math.log(1 / (1 + math.exp(-0.5 * 2))), -math.log(1 / (1 + math.exp(0.5)))]
    assert torch.allclose(out.losses, torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.5, 0.0], dtype=torch.float64))


def test_sigmoid_equal_logps_is_log2_and_label_smoothing():
    lp = logps([-1.0], [-1.0], [-1.0], [-1.0])
    assert compute_dpo_loss(lp, "sigmoid", beta=0.1).losses.item() == pytest.approx(math.log(2))
    lp = logps([0.0], [-2.0], [0.0], [0.0])  # h = 2, beta h = 2
    smoothed = compute_dpo_loss(lp, "sigmoid", beta=1.0, label_smoothing=0.1).losses.item()
    expected = 0.9 * math.log1p(math.exp(-2)) + 0.1 * math.log1p(math.exp(2))
    assert smoothed == pytest.approx(expected)


def test_sigmoid_large_margins_do_not_overflow():
    lp = logps([0.0, -1e4], [-1e4, 0.0], [0.0, 0.0], [0.0, 0.0])
    losses = compute_dpo_loss(lp, "sigmoid", beta=1.0).losses
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12) and losses[1].item() == pytest.approx(1e4)


def test_ipo_uses_length_averaged_logps():
    lp = logps([-4.0], [-6.0], [-2.0], [-6.0], nc=[2.0], nr=[3.0])
    # averaged: c=-2, r=-2, rc=-1, rr=-2 -> h = 0 - 1 = -1; (h - 1/(2*0.5))^2 = (-1 - 1)^2 = 4
    assert compute_dpo_loss(lp, "ipo", beta=0.5).losses.item() == pytest.approx(4.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        compute_dpo_loss(logps([0.0], [0.0], [0.0], [0.0]), "kto", beta=0.1)
    with pytest.raises(ValueError, match="at least one token"):
        compute_dpo_loss(logps([0.0], [0.0], [0.0], [0.0], nc=[0.0]), "sigmoid", beta=0.1)
