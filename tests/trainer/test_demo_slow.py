"""The embedded demo, shortened: the world's SFT and reward stages, then online DPO raises the RM score
and offline DPO raises the held-out pair accuracy."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dpo_rl.config.compose import compose
from dpo_rl.trainer.run import run

pytestmark = pytest.mark.slow


HAS_VLLM = importlib.util.find_spec("vllm") is not None


#: LoRA's recipe: rank 8, alpha 16 on every linear layer, at 10x the full fine-tuning LR (LoRA's usual ratio).
LORA = ("training.lora.enabled=true", "training.lr=5e-4")


#: Asynchronous online DPO: a split actor (one training rank, one rollout rank) sampling a step ahead.
ASYNC = ("resource_pool.actor_rollout=[2]", "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
         "+algorithm.max_staleness=1")

#: Full fine-tuning with the native engine, LoRA with vLLM (its engine refreshed with the merged weights after
#: every update; LoRA with the native engine where vllm is not installed), and full fine-tuning sampling a step
#: ahead on Ray (max_staleness 1): one demo run per recipe.
DEMO_RUNS = [("megatron", False, False), ("vllm", True, False) if HAS_VLLM else ("megatron", True, False),
             ("megatron", False, True)]


#: Measured on the locked CPU build (final win rate; mean score of the last tenth of the steps minus the first's):
#: full fine-tuning 0.875 and +7.4 at 80 steps, 0.91 and +10.8 at 120; LoRA with vLLM 0.84 and +10.3 at 80,
#: the same 0.84 at 120 (level from step 70 on). 80 keeps both well clear of 0.7 and +3.
DEMO_STEPS = 80


@pytest.mark.parametrize("engine, lora, ahead", DEMO_RUNS)
def test_demo_raises_reward_and_beats_the_initial_actor(tmp_path, engine, lora, ahead):
    """The recipe reaches the same quality with either rollout engine, with LoRA (whose reference is the
    actor's base, adapters off), and sampling one step ahead of the update."""
    from examples.tiny_world.build import ARTIFACTS, build

    info = build()
    assert info["rm_heldout_pair_accuracy"] >= 0.95  # the reward stage's stated held-out accuracy
    assert info["rm_heldout_pair_accuracy_initial"] < 0.7
    # The native engine's run keeps its workers in this process, without the cluster's start-up (~30 s): its
    # metrics are a Ray run's (test_online_dpo_e2e.py's test_in_process_workers_match_ray_workers; this run's
    # metrics.jsonl measured byte-identical both ways). The vLLM run is the demo's whole path on Ray.
    summary = run(compose("online_dpo_trainer_tiny", [
        f"training.train_iters={DEMO_STEPS}", "training.eval_interval=0", "training.log_interval=20",
        f"training.output_dir={tmp_path}", "training.eval_samples=48",
        f"training.tokenizer_name_or_path={ARTIFACTS / 'tokenizer'}",
        f"actor_rollout_ref.actor_rollout.load={ARTIFACTS / 'sft'}", f"actor_rollout_ref.ref.load={ARTIFACTS / 'sft'}",
        f"reward.load={ARTIFACTS / 'rm'}", f"data.train_path={ARTIFACTS / 'prompts_train.jsonl'}",
        f"data.eval_path={ARTIFACTS / 'prompts_eval.jsonl'}", f"actor_rollout_ref.actor_rollout.rollout_engine={engine}",
        *(LORA if lora else ()), *(ASYNC if ahead else ()),
    ]), use_ray=engine == "vllm" or ahead)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tenth = len(rows) // 10
    first = sum(r["objective/scores"] for r in rows[:tenth]) / tenth
    last = sum(r["objective/scores"] for r in rows[-tenth:]) / tenth
    assert last > first + 3.0, (first, last)
    assert summary["eval/win_rate"] >= 0.7
    assert rows[-1]["response/distinct_fraction"] > 0.5  # no collapse into one template
    if ahead:  # never more than one update old; one update old after every step that applied one
        staleness = [r["async/staleness_max"] for r in rows]
        assert max(staleness) == 1.0
        assert staleness[1:] == [float(r["pairs/count"] > 0) for r in rows[:-1]]
    else:
        assert max(r["rollout/logprob_diff_mean"] for r in rows) < 1e-4  # every step sampled on-policy


#: Offline DPO's held-out pair accuracy climbs to a plateau near 0.85 and leaves it at a step that depends on the
#: SFT model, and the tiny world's SFT model differs from machine to machine (400 steps amplify float-order noise:
#: CI's build reached 0.83 at 80 full steps where this machine's reached 0.86). Measured on three SFT builds (the
#: ones before and after prefix sharing, and one without it): full fine-tuning 0.92 / 0.94 / 0.98 at 120 steps,
#: LoRA 0.97-1.0 at 200 (it leaves the plateau between steps 120 and 200).
OFFLINE_STEPS = {False: 120, True: 200}


@pytest.mark.parametrize("lora", [False, True])
def test_offline_dpo_on_the_demo_raises_held_out_pair_accuracy(tmp_path, lora):
    from examples.tiny_world.build import ARTIFACTS, build

    build()
    data = ARTIFACTS / "data"
    summary = run(compose("dpo_trainer_tiny", [
        f"training.train_iters={OFFLINE_STEPS[lora]}", "training.eval_interval=0", "training.log_interval=20",
        f"training.output_dir={tmp_path}", f"training.tokenizer_name_or_path={ARTIFACTS / 'tokenizer'}",
        f"actor_rollout_ref.actor_rollout.load={ARTIFACTS / 'sft'}", f"data.train_path={data / 'pairs_train'}",
        f"data.eval_path={data / 'pairs_eval'}", *(LORA if lora else ()),
    ]), use_ray=False)  # in-process: the same metrics.jsonl as on Ray (measured, full and LoRA), ~18 s sooner
    # the SFT actor prefers the plain answers; after DPO its implicit reward ranks the held-out pairs
    assert summary["eval/rewards/accuracies"] >= 0.85, summary
    assert summary["eval/logps_accuracy"] > summary["eval/logps_accuracy_initial"] + 0.2
    assert summary["eval/loss"] < summary["eval/loss_initial"] - 0.05
