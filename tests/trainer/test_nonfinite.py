"""A diverging run stops at the step it diverges (or skips it, if asked), names the step, the metric and the
last checkpoint, never applies a non-finite update, and keeps metrics.jsonl valid JSON."""

from __future__ import annotations

import json
import math

import pytest

from dpo_rl.errors import TrainingStopped
from dpo_rl.trainer.loop import nonfinite_keys
from dpo_rl.trainer.run import run
from tests.trainer.conftest import offline_config, small_config

#: Adam moves every weight by about the LR: 1e15 makes the logits overflow at the next forward.
DIVERGING_LR = "++actor_rollout_ref.actor_rollout.lr=1e15"


def strict_rows(path) -> list[dict]:
    """metrics.jsonl rows, refusing bare NaN/Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nonfinite_keys_names_nan_inf_and_counted_steps():
    metrics = {"loss": float("nan"), "actor/grad_norm": float("inf"), "rewards/margins": 1.0,
               "actor/nonfinite_steps": 1.0, "reward/nonfinite_steps": 0.0, "timing/step": float("nan")}
    assert nonfinite_keys(metrics) == ["actor/grad_norm", "actor/nonfinite_steps", "loss"]
    assert nonfinite_keys({"loss": 0.5, "actor/nonfinite_steps": 0.0}) == []


def test_offline_dpo_stops_at_the_diverging_step_without_applying_it(world_dir, offline_data, tmp_path):
    out = tmp_path / "stop"
    with pytest.raises(TrainingStopped) as err:
        run(offline_config("dpo_trainer_tiny", world_dir, out, "training.eval_interval=0", DIVERGING_LR,
                           "++training.save_interval=1"), use_ray=False)
    message = str(err.value)
    # step 1's update is finite (the weights become huge), step 2's gradients are not: never applied
    assert message.startswith("step 2: non-finite ")
    assert "actor/nonfinite_steps=1.0" in message and "its non-finite update was not applied" in message
    assert f"the last checkpoint is step 1 in {out / 'checkpoints'}" in message
    assert "actor_rollout_ref.actor_rollout.lr" in message and "training.on_nonfinite: skip" in message
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert math.isfinite(rows[0]["loss"]) and rows[1]["loss"] is None  # NaN written as null


def test_skip_counts_the_nonfinite_steps_and_finishes(world_dir, offline_data, tmp_path):
    out = tmp_path / "skip"
    run(offline_config("dpo_trainer_tiny", world_dir, out, "training.eval_interval=0", "training.train_iters=3",
                       DIVERGING_LR, "++training.on_nonfinite=skip"), use_ray=False)
    rows = strict_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "train/nonfinite_steps" not in rows[0]
    assert [r["train/nonfinite_steps"] for r in rows[1:]] == [1.0, 2.0]


def test_online_dpo_stops_when_sampling_meets_diverged_weights(world_dir, tmp_path):
    with pytest.raises(TrainingStopped, match=r"^step 1: the policy's logits are NaN or inf while sampling"):
        run(small_config(world_dir, tmp_path / "online", DIVERGING_LR), use_ray=False)


def test_unknown_policy_is_refused(world_dir, tmp_path):
    from dpo_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="training.on_nonfinite='ignore' is unknown; use stop or skip"):
        run(small_config(world_dir, tmp_path / "bad", "++training.on_nonfinite=ignore"), use_ray=False)
