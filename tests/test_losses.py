"""Every preference loss against values computed by hand (with ``math``), plus edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_rl.losses import (
    LOSSES,
    LossOptions,
    LossSpec,
    PairLogps,
    compute_preference_loss,
    preference_losses,
)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def logps(c, r, rc=None, rr=None, nc=None, nr=None):
    return PairLogps(chosen=t(c), rejected=t(r), chosen_tokens=t(nc or [1.0] * len(c)),
                     rejected_tokens=t(nr or [1.0] * len(c)),
                     ref_chosen=None if rc is None else t(rc), ref_rejected=None if rr is None else t(rr))


def ls(x):
    """log sigma(x)."""
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1 / (1 + math.exp(-x))


# One pair: dc = chosen - ref_chosen = 1.0, dr = rejected - ref_rejected = -2.0, h = 3.0; lengths 2 and 4.
ONE = dict(c=[-3.0], r=[-8.0], rc=[-4.0], rr=[-6.0], nc=[2.0], nr=[4.0])
DC, DR, H = 1.0, -2.0, 3.0
B = 0.5


@pytest.mark.parametrize("name, options, expected", [
    ("sigmoid", {}, -ls(B * H)),
    ("sigmoid", {"label_smoothing": 0.1}, -0.9 * ls(B * H) - 0.1 * ls(-B * H)),
    ("hinge", {}, max(0.0, 1 - B * H)),
    ("ipo", {}, ((DC / 2 - DR / 4) - 1 / (2 * B)) ** 2),
    ("exo_pair", {"label_smoothing": 1e-3},
     sig(B * H) * (ls(B * H) - math.log(1 - 1e-3)) + sig(-B * H) * (ls(-B * H) - math.log(1e-3))),
    ("nca_pair", {}, -ls(B * DC) - 0.5 * ls(-B * DC) - 0.5 * ls(-B * DR)),
    ("robust", {"label_smoothing": 0.2}, (-0.8 * ls(B * H) + 0.2 * ls(-B * H)) / 0.6),
    ("bco_pair", {}, -ls(B * DC) - ls(-B * DR)),
    ("sppo_hard", {}, (DC - 0.5 / B) ** 2 + (DR + 0.5 / B) ** 2),
    ("apo_zero", {}, 1 - sig(B * DC) + sig(B * DR)),
    ("apo_down", {}, sig(B * DC) + 1 - sig(B * H)),
    ("discopop", {"discopop_tau": 0.05},
     -ls(B * H) * (1 - sig(B * H / 0.05)) + math.exp(-B * H) * sig(B * H / 0.05)),
    ("sigmoid_norm", {}, -ls(B * (DC / 2 - DR / 4))),
    ("sft", {}, 3.0 / 2),
    # single pair: the KL estimates are max(0, dc) = 1 and max(0, dr) = 0
    ("kto_pair", {}, 0.5 * ((1 - sig(B * (DC - 0.0))) + (1 - sig(B * (1.0 - DR))))),
    ("simpo", {"simpo_gamma": 0.3}, -ls(B * (-3.0 / 2 - -8.0 / 4) - 0.3)),
])
def test_loss_matches_hand_computation(name, options, expected):
    value = preference_losses(name, logps(**ONE), LossOptions(beta=B, **options))
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_orpo_hand_computation():
    # ac = -0.5, ar = -2.0: log odds(y) = a - log(1 - e^a)
    ac, ar = -0.5, -2.0
    log_odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
    value = preference_losses("orpo", logps([-1.0], [-8.0], nc=[2.0], nr=[4.0]), LossOptions(beta=B))
    assert value.item() == pytest.approx(-ac - B * ls(log_odds), rel=1e-12)


def test_aot_sorts_margins_over_the_batch():
    # policy margins c - r = [3, -1], reference margins rc - rr = [0, 2]
    lp = logps([-1.0, -3.0], [-4.0, -2.0], [-2.0, -1.0], [-2.0, -3.0])
    got = preference_losses("aot", lp, LossOptions(beta=1.0))
    # sorted: policy [-1, 3], reference [0, 2] -> delta [-1, 1]
    assert got.tolist() == pytest.approx([-ls(-1.0), -ls(1.0)], rel=1e-12)
    # unpaired: dc = [1, -2], dr = [-2, 1]; sorted dc [-2, 1], sorted dr [-2, 1] -> delta [0, 0]
    got = preference_losses("aot_unpaired", lp, LossOptions(beta=1.0))
    assert got.tolist() == pytest.approx([math.log(2), math.log(2)], rel=1e-12)


def test_kto_pair_batch_kl_estimates():
    lp = logps([-1.0, -3.0], [-4.0, -2.0], [-2.0, -1.0], [-2.0, -3.0])  # dc = [1, -2], dr = [-2, 1]
    z_c, z_r = max(0.0, -0.5), max(0.0, -0.5)
    expected = [0.5 * ((1 - sig(dc - z_r)) + (1 - sig(z_c - dr))) for dc, dr in ((1, -2), (-2, 1))]
    assert preference_losses("kto_pair", lp, LossOptions(beta=1.0)).tolist() == pytest.approx(expected, rel=1e-12)


def test_sft_is_the_batch_token_mean():
    lp = logps([-2.0, -6.0], [-1.0, -1.0], nc=[1.0, 3.0])
    assert preference_losses("sft", lp, LossOptions()).tolist() == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_equal_logps_are_finite_and_symmetric_losses_at_known_points(name):
    lp = logps([-2.0, -2.0], [-2.0, -2.0], [-2.0, -2.0], [-2.0, -2.0], nc=[2.0, 2.0], nr=[2.0, 2.0])
    options = LossOptions(beta=0.1, label_smoothing=1e-3 if name == "exo_pair" else 0.0)
    value = preference_losses(name, lp, options)
    assert torch.isfinite(value).all()
    known = {"sigmoid": math.log(2), "sigmoid_norm": math.log(2), "hinge": 1.0, "apo_zero": 1.0, "apo_down": 1.0,
             "bco_pair": 2 * math.log(2), "aot": math.log(2), "aot_unpaired": math.log(2), "kto_pair": 0.5,
             "simpo": -ls(-0.5), "ipo": 25.0, "sppo_hard": 2 * 25.0}
    if name in known:
        assert value.tolist() == pytest.approx([known[name]] * 2, rel=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_huge_margins_do_not_overflow(name):
    lp = logps([0.0, -1e4], [-1e4, 0.0], [-1e4, 0.0], [0.0, -1e4], nc=[1e3, 1e3], nr=[1e3, 1e3])
    lp.chosen = lp.chosen.float()  # fp32 is what training runs in
    for key in ("rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens"):
        setattr(lp, key, getattr(lp, key).float())
    lp.chosen[0] = -1e-3  # keep log p < 0 for the odds-ratio loss
    value = preference_losses(name, lp, LossOptions(beta=1.0, label_smoothing=1e-3 if name == "exo_pair" else 0.0))
    assert torch.isfinite(value).all(), (name, value)


def test_losses_are_differentiable():
    for name in sorted(LOSSES):
        lp = logps(**ONE)
        lp.chosen.requires_grad_(True)
        options = LossOptions(beta=B, label_smoothing=1e-3 if name == "exo_pair" else 0.0)
        preference_losses(name, lp, options).sum().backward()
        assert lp.chosen.grad is not None and torch.isfinite(lp.chosen.grad).all(), name


def test_mixture_and_pref_ftx():
    spec = LossSpec.create(["sigmoid", "bco_pair"], [0.8, 0.2], pref_ftx=0.5, beta=B)
    out = compute_preference_loss(logps(**ONE), spec)
    expected = 0.8 * -ls(B * H) + 0.2 * (-ls(B * DC) - ls(-B * DR)) + 0.5 * (3.0 / 2)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(B * DC) and out.rejected_rewards.item() == pytest.approx(B * DR)


def test_reference_free_rewards_are_length_normalised():
    spec = LossSpec.create("simpo", beta=2.0)
    out = compute_preference_loss(logps([-3.0], [-8.0], nc=[2.0], nr=[4.0]), spec)
    assert out.chosen_rewards.item() == pytest.approx(2.0 * -1.5) and out.rejected_rewards.item() == pytest.approx(-4.0)
    assert not spec.needs_reference and LossSpec.create(["simpo", "sigmoid"]).needs_reference


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown algorithm.loss_type 'kto'"):
        LossSpec.create("kto")
    with pytest.raises(ValueError, match="unknown algorithm.loss_type 'kto'"):
        preference_losses("kto", logps(**ONE), LossOptions())
    with pytest.raises(ValueError, match="2 entries for 1 loss types"):
        LossSpec.create("sigmoid", [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one token"):
        preference_losses("sigmoid", logps(**{**ONE, "nr": [0.0]}), LossOptions())
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_losses("sigmoid", logps([-1.0], [-2.0]), LossOptions())
    with pytest.raises(ValueError, match="needs reference log-probs"):
        compute_preference_loss(logps([-1.0], [-2.0]), LossSpec.create(["simpo", "ipo"]))
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        preference_losses("exo_pair", logps(**ONE), LossOptions())


@pytest.mark.parametrize("divergence, coef, margin", [
    ("reverse_kl", 0.5, 2 * math.log(2)),  # log u: log 2 - log(1/2)
    ("forward_kl", 0.5, 1.5),  # 1 - 1/u: (1 - 1/2) - (1 - 2)
    ("js_divergence", 0.5, math.log(2)),  # log(2u / (1 + u)): log(4/3) - log(2/3)
    ("alpha_divergence", 0.5, math.sqrt(2)),  # (u^-1/2 - 1) / -1/2: (2 - sqrt 2) - (2 - 2 sqrt 2)
    ("alpha_divergence", 1.0, 2 * math.log(2)),  # the limit a -> 1 is log u
])
def test_f_divergences_replace_the_log_ratios_by_their_f_prime(divergence, coef, margin):
    """u = pi / pi_ref = 2 for the chosen and 1/2 for the rejected response; with beta 1, sigmoid = -log sigma(margin)
    and sigmoid_norm divides each side by its length first."""
    from dpo_rl.losses import f_divergence_scores

    lp = logps([math.log(2) - 5], [-math.log(2) - 7], [-5.0], [-7.0], nc=[2.0], nr=[4.0])
    options = LossOptions(beta=1.0, f_divergence_type=divergence, f_alpha_divergence_coef=coef)
    chosen, rejected = f_divergence_scores(lp, options)
    assert float(chosen - rejected) == pytest.approx(margin, rel=1e-12)
    assert preference_losses("sigmoid", lp, options).tolist() == pytest.approx([-ls(margin)], rel=1e-12)
    assert preference_losses("sigmoid_norm", lp, options).tolist() == pytest.approx(
        [-ls(float(chosen) / 2 - float(rejected) / 4)], rel=1e-12)


def test_an_f_divergence_needs_a_loss_with_an_f_divergence_form():
    with pytest.raises(ValueError, match="f_divergence_type='chi2' is unknown"):
        LossSpec.create("sigmoid", f_divergence_type="chi2")
    with pytest.raises(ValueError, match=r"does not apply to algorithm.loss_type \['nca_pair'\]"):
        LossSpec.create(["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    assert LossSpec.create(["sigmoid", "sft"], f_divergence_type="forward_kl").options.f_divergence_type == "forward_kl"
    with pytest.raises(ValueError, match="has no effect on algorithm.loss_type sft"):
        LossSpec.create("sft", f_divergence_type="forward_kl")


def test_wpo_multiplies_each_pairs_loss_by_its_weight_and_needs_the_wpo_logps():
    lp = logps([-3.0, -5.0], [-8.0, -4.0], [-4.0, -5.0], [-6.0, -4.5], nc=[2.0, 3.0], nr=[4.0, 2.0])
    plain = compute_preference_loss(lp, LossSpec.create("sigmoid", beta=B)).losses
    with pytest.raises(ValueError, match="WPO log-probs"):
        compute_preference_loss(lp, LossSpec.create("sigmoid", beta=B, use_weighting=True))
    lp.chosen_wpo, lp.rejected_wpo = t([-0.5, -2.0]), t([-1.0, -0.25])
    weighted = compute_preference_loss(lp, LossSpec.create("sigmoid", beta=B, use_weighting=True)).losses
    assert weighted.tolist() == pytest.approx((plain * t([math.exp(-1.5), math.exp(-2.25)])).tolist(), rel=1e-12)
    with pytest.raises(ValueError, match=r"loss_type \['kto_pair'\] couples"):
        LossSpec.create(["sigmoid", "kto_pair"], use_weighting=True)
