"""The embedded demo, shortened: on the built tiny world, online DPO raises the RM score."""

from __future__ import annotations

import json

import pytest

from dpo_rl.config.compose import compose
from dpo_rl.trainer.run import run

pytestmark = pytest.mark.slow


def test_demo_raises_reward_and_beats_the_initial_actor(tmp_path):
    from examples.tiny_world.build import ARTIFACTS, build

    info = build()
    assert info["rm_heldout_pair_accuracy"] >= 0.9
    summary = run(compose("online_dpo_trainer_tiny", [
        "training.train_iters=120", "training.eval_interval=0", "training.log_interval=20",
        f"training.output_dir={tmp_path}", "training.eval_samples=48",
        f"training.tokenizer_name_or_path={ARTIFACTS / 'tokenizer'}",
        f"actor_rollout_ref.actor_rollout.load={ARTIFACTS / 'sft'}", f"actor_rollout_ref.ref.load={ARTIFACTS / 'sft'}",
        f"reward.load={ARTIFACTS / 'rm'}", f"data.train_path={ARTIFACTS / 'prompts_train.jsonl'}",
        f"data.eval_path={ARTIFACTS / 'prompts_eval.jsonl'}",
    ]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tenth = len(rows) // 10
    first = sum(r["objective/scores"] for r in rows[:tenth]) / tenth
    last = sum(r["objective/scores"] for r in rows[-tenth:]) / tenth
    assert last > first + 3.0, (first, last)
    assert summary["eval/win_rate"] >= 0.7
    assert rows[-1]["response/distinct_fraction"] > 0.5  # no collapse into one template
