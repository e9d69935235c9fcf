"""Asynchronous online DPO (a split actor with ``algorithm.max_staleness: 1``) on Ray: the rollout ranks sample the
next step during the update, no sample is more than one version old, and a run killed with sampling in flight
resumes without dropping or repeating a prompt. (``max_staleness: 0`` is the synchronous loop, byte for byte:
test_online_dpo_e2e.py's test_split_actor_matches_colocated.)"""

from __future__ import annotations

import json

import pytest

from dpo_rl.checkpoint.training import iteration_dir, latest_step, read_trainer_state
from dpo_rl.config.schema import DataConfig
from dpo_rl.data.prompts import PromptSampler
from dpo_rl.errors import Interrupted
from dpo_rl.trainer.online_dpo import OnlineDPOTrainer
from dpo_rl.trainer.run import run
from tests.trainer.conftest import SPLIT_ACTOR, small_config

ASYNC = (*SPLIT_ACTOR, "+algorithm.max_staleness=1", "training.train_iters=4", "+training.save_interval=2")


def record_steps(patch, killed_at=None) -> tuple[dict[int, list[int]], list[int]]:
    """(the prompts each step's sampling was started with, the steps that ran); ``killed_at``: that step is
    interrupted (Ctrl-C) as it starts, with its batch's sampling in flight."""
    prompts, ran = {}, []
    real_start, real_step = OnlineDPOTrainer.start_sampling, OnlineDPOTrainer.train_step

    def start_sampling(self, step):
        started = real_start(self, step)
        prompts[step] = list(started.prompts)
        return started

    def train_step(self, step):
        if step == killed_at:
            raise KeyboardInterrupt
        metrics = real_step(self, step)
        ran.append(step)
        return metrics

    patch.setattr(OnlineDPOTrainer, "start_sampling", start_sampling)
    patch.setattr(OnlineDPOTrainer, "train_step", train_step)
    return prompts, ran


def test_max_staleness_1_samples_a_step_ahead_and_a_killed_run_resumes_every_prompt_once(world_dir, tmp_path):
    out = tmp_path / "run"
    config = small_config(world_dir, out, *ASYNC)
    with pytest.MonkeyPatch.context() as patch:
        first_prompts, first_ran = record_steps(patch, killed_at=3)
        with pytest.raises(Interrupted, match="interrupted .* during step 3"):
            run(config)
    assert first_ran == [1, 2] and sorted(first_prompts) == [1, 2, 3]  # step 3's batch was sampling when killed
    checkpoint = out / "checkpoints"
    assert latest_step(checkpoint) == 2
    assert read_trainer_state(iteration_dir(checkpoint, 2))["in_flight_prompts"] == [first_prompts[3]]

    with pytest.MonkeyPatch.context() as patch:
        resumed_prompts, resumed_ran = record_steps(patch)
        run(small_config(world_dir, out, *ASYNC))  # training.resume: auto
    assert resumed_ran == [3, 4]

    sampler = PromptSampler(40, seed=config.training.seed,  # the world's 40 prompts, as the run draws them
                            shuffle=config.data.get("shuffle", DataConfig().shuffle))
    trained = {1: first_prompts[1], 2: first_prompts[2], 3: resumed_prompts[3], 4: resumed_prompts[4]}
    assert resumed_prompts[3] == first_prompts[3]  # the in-flight batch is sampled again, not skipped
    expected = {step: sampler.next(4) for step in (1, 2, 3, 4)}
    assert trained == expected  # every prompt once, in the uninterrupted run's order

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    staleness = [r["async/staleness_max"] for r in rows]
    # step 2 trains (at version 1) on samples drawn with version 0, during step 1's update; step 3's were drawn
    # again after the resume with the restored weights; step 4's during step 3's update
    assert staleness == [0.0, 1.0, 0.0, 1.0], staleness
    assert [r["rollout/policy_version"] for r in rows] == [0.0, 0.0, 2.0, 2.0]
    assert all(r["async/staleness_mean"] <= r["async/staleness_max"] <= 1 for r in rows)
    assert rows[1]["rollout/logprob_diff_mean"] > 1e-4  # the loss scored step 2's samples under the newer policy


def test_max_staleness_2_keeps_at_most_two_steps_in_flight_and_syncs_only_when_the_rollout_is_idle(world_dir, tmp_path):
    """With two steps in flight the rollout ranks get new weights only once their queue is empty (a sync behind
    queued sampling would stall the training ranks): step 1 starts steps 2 and 3 with version 0, step 3 syncs
    version 2 and starts steps 4 and 5 with it. Staleness [0, 1, 2, 1, 2], never above 2."""
    out = tmp_path / "run"
    syncs = []
    real_sync = OnlineDPOTrainer.sync_weights

    def counted_sync(self):
        syncs.append(self.policy_version)
        return real_sync(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnlineDPOTrainer, "sync_weights", counted_sync)
        run(small_config(world_dir, out, *SPLIT_ACTOR, "+algorithm.max_staleness=2", "training.train_iters=5",
                         "training.eval_interval=0"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 2.0, 1.0, 2.0]
    assert [r["rollout/policy_version"] for r in rows] == [0.0, 0.0, 0.0, 2.0, 2.0]
    assert syncs == [0, 2, 5]  # before training, at step 3, and before the final evaluation
