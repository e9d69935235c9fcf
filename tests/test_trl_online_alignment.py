"""Online DPO step by step against TRL 1.16's ``OnlineDPOTrainer`` on the same fixed responses.

Both sides train the same random-init tiny policy against the same reference, pair with the same reward model
and missing-EOS penalty, and sample nothing: each step feeds both the same two completions per prompt
(:mod:`tests.trl_online` says what is fed and which settings are matched). Every step's loss, implicit rewards
and margins, the policy's summed log-probs and the gradient norm must agree, so the two trainings follow one
trajectory through six AdamW steps.
"""

from __future__ import annotations

import pytest

from tests.tolerance import assert_close, assert_differs, tolerance_ratio
from tests.trl_online import COMPARED, RTOL, FixedResponses, Setup, build_world, compare, run_ours, scales

SETUP = Setup(steps=6, prompts=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("trl_online_world"), SETUP)


@pytest.fixture(scope="module")
def both(world, tmp_path_factory):
    return compare(world, SETUP, tmp_path_factory.mktemp("trl_online_runs"))


def step_ratio(ours: dict, trl: dict, key: str, beta: float) -> float:
    """How far one step's ``key`` is from TRL's, in units of its tolerance."""
    return tolerance_ratio(ours[key], trl[key], **tolerance(trl, key, beta))


def tolerance(trl: dict, key: str, beta: float) -> dict:
    """``rtol``/``scale``/``derived`` for one step's ``key`` (:mod:`tests.tolerance`). The loss is
    ``mean softplus(-margin)`` per pair, whose derivative is below 1 in size: the margins' tolerance passes
    into it at most whole (``derived``)."""
    scale = scales(trl, beta)
    return {"rtol": RTOL, "scale": scale[key], "derived": RTOL * scale["rewards/margins"] if key == "loss" else 0.0}


def test_both_sides_pair_the_same_completions(both):
    fixed: FixedResponses = both["fixed"]
    assert both["trl"]["chosen"] == fixed.eos_slot  # TRL's scores, penalty included, chose the EOS completion
    assert both["ours"]["chosen"] == fixed.eos_slot  # and ours chose it, each step, each prompt
    assert {slot for step in fixed.eos_slot for slot in step.values()} == {0, 1}  # both orientations occur
    assert [s["pairs"] for s in both["ours"]["steps"]] == [SETUP.prompts] * SETUP.steps


def test_every_step_agrees_with_trl(both):
    ours, trl = both["ours"]["steps"], both["trl"]["steps"]
    assert len(ours) == len(trl) == SETUP.steps
    for step, (o, t) in enumerate(zip(ours, trl), start=1):
        for key in COMPARED:
            assert_close(o[key], t[key], **tolerance(t, key, SETUP.beta), what=f"step {step} {key}")


def test_the_steps_trained(both):
    """Not a comparison of two runs that stood still: the policy moved, and with the reference apart from it
    the rewards were not 0 from the start."""
    trl = both["trl"]["steps"]
    assert trl[-1]["loss"] < 0.7 * trl[0]["loss"]
    assert trl[-1]["rewards/margins"] > 10 * abs(trl[0]["rewards/margins"]) > 0
    assert len({round(s["logps/chosen"], 3) for s in trl}) == SETUP.steps  # a new policy every step


def worst_step(ours: list[dict], trl: list[dict], key: str, beta: float) -> int:
    return max(range(len(trl)), key=lambda i: step_ratio(ours[i], trl[i], key, beta))


def test_a_different_beta_is_caught(world, both, tmp_path):
    """Negative control: our run with twice TRL's beta misses the margins by far more than the tolerance."""
    other = run_ours(world, SETUP, both["fixed"], tmp_path / "beta", f"algorithm.beta={2 * SETUP.beta}")["steps"]
    trl = both["trl"]["steps"]
    for key in ("rewards/margins", "loss"):
        i = worst_step(other, trl, key, SETUP.beta)
        assert_differs(other[i][key], trl[i][key], **tolerance(trl[i], key, SETUP.beta),
                       what=f"beta {2 * SETUP.beta} against {SETUP.beta}: step {i + 1} {key}")


def test_a_different_learning_rate_is_caught(world, both, tmp_path):
    """Negative control: with twice the learning rate the first step (before any update) still agrees, and the
    later steps' log-probs miss by far more than the tolerance: the comparison sees the optimizer's steps."""
    other = run_ours(world, SETUP, both["fixed"], tmp_path / "lr", f"training.lr={2 * SETUP.lr}")["steps"]
    trl = both["trl"]["steps"]
    for key in COMPARED:
        assert_close(other[0][key], trl[0][key], **tolerance(trl[0], key, SETUP.beta), what=f"lr x2: step 1 {key}")
    i = worst_step(other, trl, "logps/chosen", SETUP.beta)
    assert_differs(other[i]["logps/chosen"], trl[i]["logps/chosen"], **tolerance(trl[i], "logps/chosen", SETUP.beta),
                   what=f"lr x2: step {i + 1} logps/chosen")
