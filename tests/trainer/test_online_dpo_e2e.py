"""End-to-end online DPO through real Ray workers (CPU): metrics, determinism, layouts agree."""

from __future__ import annotations

import json
import math
import os

import pytest

from dpo_rl.config.compose import compose
from tests.tolerance import assert_close, assert_differs, logps_scale
from tests.trackers import assert_same_metrics, jsonl_metrics, tensorboard_scalars, wandb_offline_env, wandb_run

#: float32 rounding of a summed log-prob, as a fraction of its size (~13 float32 spacings).
RTOL_LOGPS = 1e-6

EXPECTED_KEYS = {
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
    "objective/scores", "objective/scores_margin", "objective/kl", "objective/entropy", "val/contain_eos_token",
    "response_length/mean", "pairs/tie_rate", "loss", "actor/grad_norm", "actor/lr",
    "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/seq_logprob_diff_mean", "rollout/policy_version",
}
TIMING_KEYS = {"timing/generate", "timing/reward", "timing/reference",
               "timing/update", "timing/step",
               "timing/orchestration", "throughput/tokens_per_s"}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ray_run_writes_metrics_timing_plot_and_summary(runs):
    out, summary = runs("colocated")
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert EXPECTED_KEYS <= set(m), EXPECTED_KEYS - set(m)
        # the native engine samples with the weights it trains: its log-probs are the trainer's to rounding
        assert m["rollout/logprob_diff_tokens"] > 0 and m["rollout/logprob_diff_mean"] < 1e-4, m
        assert m["rollout/policy_version"] == m["step"] - 1
    assert "eval/win_rate" in metrics[1]  # eval_interval=2
    timing = rows(out / "timing.jsonl")
    assert all(TIMING_KEYS <= set(t) for t in timing)
    assert (out / "curves.png").stat().st_size > 1000
    assert summary["report"] == str(out / "report.html")  # tests/test_run_report.py checks its contents
    assert 'data-key="objective/scores"' in (out / "report.html").read_text()
    assert 0.0 <= summary["eval/win_rate"] <= 1.0
    assert json.loads((out / "summary.json").read_text())["eval/win_rate"] == summary["eval/win_rate"]
    assert metrics[0]["actor/lr"] == pytest.approx(1e-3)
    # Step 1 has one mini-batch, computed before any update: policy == reference, so KL is 0
    # and the DPO loss is log 2, up to the rounding of the log-probs that cancel in them.
    # Later steps see the trained policy.
    first, beta = metrics[0], compose("online_dpo_trainer_tiny", []).algorithm.beta  # small_config keeps it
    assert_close(first["objective/kl"], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(first),
                 what="KL of the policy against itself")
    assert_close(first["loss"], math.log(2), rtol=RTOL_LOGPS, scale=logps_scale(first, beta=beta),
                 what="DPO loss at margin 0")
    assert_differs(metrics[-1]["objective/kl"], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(metrics[-1]),
                   what="KL after training")


def test_same_seed_gives_identical_metrics(runs):
    a, _ = runs("colocated")
    b, _ = runs("colocated_again")
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


@pytest.fixture
def other_seed(runs, tmp_path_factory, monkeypatch):
    """A run with another seed that also reports to TensorBoard and to W&B (offline, its files under a test
    directory)."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    for key, value in wandb_offline_env(tmp_path_factory.mktemp("wandb_home")).items():
        monkeypatch.setenv(key, value)
    return runs("other_seed", "training.seed=99", "training.report_to=[jsonl,tensorboard,wandb]")


def test_different_seed_gives_different_metrics(runs, other_seed):
    a, _ = runs("colocated")
    c, _ = other_seed
    assert (a / "metrics.jsonl").read_text() != (c / "metrics.jsonl").read_text()


def test_report_to_trackers_hold_the_jsonl_metrics_and_the_resolved_config(other_seed):
    import yaml

    out, _ = other_seed
    jsonl = jsonl_metrics(out)
    assert sorted(jsonl) == [1, 2, 3] and "eval/win_rate" in jsonl[2]
    assert_same_metrics(tensorboard_scalars(out), jsonl, "TensorBoard")
    run = wandb_run(out)
    assert_same_metrics(run.history, jsonl, "W&B")
    assert run.config == yaml.safe_load((out / "config.yaml").read_text())
    assert (run.name, run.project, run.exit_code) == (f"ray_online_dpo-{out.name}", "dpo_rl", 0)


def test_in_process_workers_match_ray_workers(runs):
    a, _ = runs("colocated")
    local, _ = runs("in_process", use_ray=False)
    assert (a / "metrics.jsonl").read_text() == (local / "metrics.jsonl").read_text()


def test_split_actor_matches_colocated(runs, split_actor_run):
    a, _ = runs("colocated")
    split, _, _ = split_actor_run  # (the run test_driver_traffic.py counts the driver's tensors in)
    assert (a / "metrics.jsonl").read_text() == (split / "metrics.jsonl").read_text()
    assert all("timing/sync" in t for t in rows(split / "timing.jsonl"))


def test_preprocessed_prompt_dataset_gives_the_jsonl_run(runs, world_dir, tmp_path_factory):
    from dpo_rl.data.preprocess import PreprocessOptions, preprocess

    out = tmp_path_factory.mktemp("prep")
    for name in ("train", "eval"):
        preprocess(PreprocessOptions(input=str(world_dir / f"{name}.jsonl"), tokenizer_name_or_path=str(world_dir / "tokenizer"),
                                     output_prefix=str(out / name), handler_name="PPOAlpacaStyleInstructionHandler",
                                     prompt_type="auto", map_keys={"prompt": "prompt"}), progress=False)
    local, _ = runs("in_process", use_ray=False)
    prep, _ = runs("preprocessed", f"data.train_path={out / 'train'}", f"data.eval_path={out / 'eval'}", use_ray=False)
    assert (local / "metrics.jsonl").read_text() == (prep / "metrics.jsonl").read_text()


def test_megatron_checkpoints_load_like_their_hf_sources(runs, world_dir, tmp_path_factory):
    from dpo_rl.checkpoint.convert import hf_to_megatron

    out = tmp_path_factory.mktemp("mg")
    hf_to_megatron(str(world_dir / "sft"), str(out / "sft"), tp=1, pp=1)
    hf_to_megatron(str(world_dir / "rm"), str(out / "rm"), tp=1, pp=1, reward=True)
    local, _ = runs("in_process", use_ray=False)
    mg, _ = runs("megatron_ckpt", f"actor_rollout_ref.actor_rollout.load={out / 'sft'}",
                 f"actor_rollout_ref.ref.load={out / 'sft'}", f"reward.load={out / 'rm'}", use_ray=False)
    assert (local / "metrics.jsonl").read_text() == (mg / "metrics.jsonl").read_text()


def test_win_rate_is_against_the_actors_initial_weights_whatever_the_reference(runs, world_dir, tmp_path_factory):
    """With ref.load naming another model, the evaluation still compares with the actor's initial weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_rl.checkpoint import hf_files
    from dpo_rl.config.model import shipped_model_config

    other = tmp_path_factory.mktemp("other_ref")
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(shipped_model_config("tiny"))).save_pretrained(other)
    same_dir, same = runs("in_process", use_ray=False)
    separate_dir, separate = runs("separate_reference", f"actor_rollout_ref.ref.load={other}", use_ray=False)
    # the baseline's samples and scores are the actor's own, so they do not depend on the reference
    assert separate["eval/initial_scores"] == same["eval/initial_scores"]
    assert [r["before"] for r in separate["samples"]] == [r["before"] for r in same["samples"]]
    assert separate["eval/baseline"] == same["eval/baseline"] == f"the actor's initial weights ({world_dir}/sft)"
    # ...while training did use the other reference: the implicit rewards start away from 0
    assert rows(separate_dir / "metrics.jsonl")[0]["rewards/margins"] != rows(same_dir / "metrics.jsonl")[0]["rewards/margins"]


def test_four_samples_per_prompt_pair_best_with_worst_and_the_reference_scores_only_those(runs):
    """n = 4, best-vs-worst, several prompts per micro-batch: the reference scores exactly the paired samples
    (two per kept pair, not all four per prompt), and its log-probs reach the right rows (step 1's KL is 0, with
    LD-DPO's sums on both sides). A length penalty is logged and the pairs' length metrics are there."""
    out, _ = runs("four_samples", "algorithm.num_responses_per_prompt=4", "algorithm.length_penalty=0.01",
                  "algorithm.length_penalty_target=2", "actor_rollout_ref.actor_rollout.micro_batch_size=2",
                  "+algorithm.ld_alpha=0.5", use_ray=False)
    metrics = rows(out / "metrics.jsonl")
    prompts = 4  # training.global_batch_size
    missing_eos = compose("online_dpo_trainer_tiny", []).actor_rollout_ref.actor_rollout.missing_eos_penalty
    for m in metrics:
        assert m["pairs/count"] + m["pairs/dropped"] == prompts, m
        assert m["reference/sequences"] == 2 * m["pairs/count"] < 4 * prompts, m
        assert 0.0 <= m["pairs/length_win_rate"] <= 1.0 and m["pairs/chosen_length"] >= 1, m
        assert m["objective/length_penalty"] > 0.0  # responses run past 2 tokens
        eos_penalty = missing_eos * (1 - m["val/contain_eos_token"])
        assert m["objective/scores"] == pytest.approx(m["objective/rm_scores"] - m["objective/length_penalty"]
                                                      - eos_penalty, rel=1e-5, abs=1e-5)
    first = metrics[0]
    assert first["pairs/chosen_length"] != first["pairs/rejected_length"], first  # LD's split matters at step 1
    assert_close(first["objective/kl"], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(first),
                 what="KL of the policy against itself, reference rows picked from the paired samples")


def test_ld_dpo_with_two_samples_sums_the_reference_like_the_policy(runs):
    """ld_alpha with n = 2 (the reference scores every sample before the scores; each one's pair is its prompt's
    other sample): step 1's KL is 0 and its loss log 2, as the policy's LD sums equal the reference's, with
    responses long enough that some pair's lengths differ (EOS sampled), so the shared-length split matters."""
    longer = "actor_rollout_ref.actor_rollout.max_new_tokens=40"
    out, _ = runs("ld_dpo", "+algorithm.ld_alpha=0.3", longer, use_ray=False)
    plain, _ = runs("ld_dpo_plain", longer, use_ray=False)
    first, beta = rows(out / "metrics.jsonl")[0], compose("online_dpo_trainer_tiny", []).algorithm.beta
    assert first["pairs/chosen_length"] != first["pairs/rejected_length"], first  # a pair of unequal lengths
    base = rows(plain / "metrics.jsonl")[0]  # the same samples at step 1, summed plainly: the longer tails count
    assert first["logps/chosen"] + first["logps/rejected"] > base["logps/chosen"] + base["logps/rejected"]
    assert_close(first["objective/kl"], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(first), what="KL, LD-DPO sums")
    assert_close(first["loss"], math.log(2), rtol=RTOL_LOGPS, scale=logps_scale(first, beta=beta),
                 what="DPO loss at margin 0, LD-DPO sums")


def test_a_hard_reference_refresh_every_step_keeps_the_reference_at_the_sampling_policy(runs):
    """TR-DPO hard, interval 1 (in-process: the actor's bucket stream into the reference): each step's one
    mini-batch starts with policy == reference, so every step has KL 0 and loss log 2; soft (alpha 0.5) keeps
    the reference between its old weights and the actor, so step 2's KL is smaller than a fixed reference's."""
    out, _ = runs("tr_dpo_hard", "+algorithm.ref_update.mode=hard", "+algorithm.ref_update.interval=1",
                  use_ray=False)
    beta = compose("online_dpo_trainer_tiny", []).algorithm.beta
    metrics = rows(out / "metrics.jsonl")
    for m in metrics:
        assert_close(m["objective/kl"], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(m), what=f"KL, step {m['step']}")
        assert_close(m["loss"], math.log(2), rtol=RTOL_LOGPS, scale=logps_scale(m, beta=beta), what="loss")
    assert [m["reference/version"] for m in metrics] == [1.0, 2.0, 3.0]
    fixed, _ = runs("in_process", use_ray=False)
    soft, _ = runs("tr_dpo_soft", "+algorithm.ref_update.mode=soft", "+algorithm.ref_update.interval=1",
                   "+algorithm.ref_update.alpha=0.5", use_ray=False)
    fixed_kl, soft_kl = rows(fixed / "metrics.jsonl")[1]["objective/kl"], rows(soft / "metrics.jsonl")[1]["objective/kl"]
    assert 0.0 < abs(soft_kl) < abs(fixed_kl), (soft_kl, fixed_kl)


def test_a_reference_refresh_on_ray_streams_over_its_own_sync_channel(runs):
    """TR-DPO hard every 2 steps on Ray: the actor streams to the reference's ranks over the ``ref`` channel
    after step 2, so step 3 starts at KL 0 again while step 2 (a fixed reference, one update on) does not."""
    out, _ = runs("tr_dpo_ray", "+algorithm.ref_update.mode=hard", "+algorithm.ref_update.interval=2",
                  "actor_rollout_ref.actor_rollout.verify_weight_sync=true")  # sent == received, checked
    metrics = rows(out / "metrics.jsonl")
    kl = [m["objective/kl"] for m in metrics]
    assert_close(kl[0], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(metrics[0]), what="KL, step 1")
    assert_differs(kl[1], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(metrics[1]), what="KL, step 2")
    assert_close(kl[2], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(metrics[2]), what="KL, step 3 (refreshed)")
    assert [m["reference/version"] for m in metrics] == [0.0, 2.0, 2.0]
    assert all("timing/ref_refresh" in t for t in rows(out / "timing.jsonl")[1::2])


def test_all_pairs_with_four_samples_has_the_reference_score_every_sample_beside_the_reward_model(runs):
    """all_pairs pairs nearly every sample: the reference scores them all while the reward model scores (no
    wait for the scores), and step 1's KL is 0 (its pairs in one mini-batch, so no update comes before them)."""
    out, _ = runs("four_all_pairs", "algorithm.num_responses_per_prompt=4", "algorithm.pairing_strategy=all_pairs",
                  "actor_rollout_ref.actor_rollout.ppo_mini_batch_size=24", use_ray=False)
    metrics = rows(out / "metrics.jsonl")
    assert all(m["reference/sequences"] == 16 for m in metrics)  # 4 prompts x 4 samples
    assert all(m["pairs/count"] + m["pairs/dropped"] == 4 * 6 for m in metrics)  # C(4, 2) per prompt
    assert_close(metrics[0]["objective/kl"], 0.0, rtol=RTOL_LOGPS, scale=logps_scale(metrics[0]), what="KL")
