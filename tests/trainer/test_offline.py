"""Offline stages (dpo, reward, sft) on the online loop's workers: learning, references, resume, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpo_rl.checkpoint import training as ckpt
from dpo_rl.config.compose import compose
from dpo_rl.errors import ConfigError
from dpo_rl.trainer.run import resolve, run
from tests.tolerance import assert_close, assert_differs, logps_scale
from tests.trainer.conftest import offline_config

#: float32 rounding of a summed log-prob, as a fraction of its size (~13 float32 spacings).
RTOL_LOGPS = 1e-6
#: Runs that differ in layout (TP, DP) sum in another order and drift apart over steps.
RTOL_LAYOUT = 1e-4


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def dpo_beta() -> float:
    """The shipped dpo_trainer_tiny's beta, which these runs keep."""
    return compose("dpo_trainer_tiny", []).algorithm.beta


def margin_scale(summary, suffix=""):
    """beta x the held-out log-probs that cancel in a margin: the size its rounding is measured against."""
    return logps_scale(summary, beta=dpo_beta(), prefix="eval/", suffix=suffix)


@pytest.fixture(scope="module")
def dpo_run(world_dir, offline_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    summary = run(offline_config("dpo_trainer_tiny", world_dir, out, "++training.export_hf=true",
                                 "training.train_iters=6"), use_ray=False)
    return out, summary


def test_offline_dpo_learns_the_preference_and_changes_every_parameter(world_dir, dpo_run):
    out, summary = dpo_run
    history = rows(out / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 7))
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "objective/kl", "actor/grad_norm",
            "epoch", "pairs/chosen_length", "pairs/rejected_length", "pairs/length_win_rate"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"]
    # held-out pairs: the policy's implicit reward now ranks chosen above rejected
    assert_close(summary["eval/rewards/margins_initial"], 0.0, rtol=RTOL_LOGPS, scale=margin_scale(summary, "_initial"),
                 what="initial margin (policy == reference)")
    assert summary["eval/rewards/margins"] > 0.05
    assert summary["eval/rewards/accuracies"] >= 0.75
    assert summary["eval/logps_accuracy"] > summary["eval/logps_accuracy_initial"]
    before, after = weights(world_dir / "sft"), weights(out / "hf_actor")
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"


def test_wpo_weighs_the_training_and_the_held_out_loss(world_dir, offline_data, tmp_path, dpo_run):
    """use_weighting (WPO) with an f-divergence: at step 1 (policy == reference) js_divergence's scores are
    log 2 + log sigma(0) = 0 for both sides, so each pair's sigmoid loss is log 2 times its WPO weight (< 1
    here): the training and the held-out loss fall below log 2 by the mean weight."""
    summary = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path, "training.train_iters=2",
                                 "+algorithm.use_weighting=true", "+algorithm.f_divergence_type=js_divergence"),
                  use_ray=False)
    history = rows(tmp_path / "metrics.jsonl")
    assert 0.0 < history[0]["loss"] < 0.95 * math.log(2)
    assert 0.0 < summary["eval/loss_initial"] < 0.95 * math.log(2)
    assert dpo_run[1]["eval/loss_initial"] == pytest.approx(math.log(2), rel=1e-5)  # unweighted: log 2


def test_ld_dpo_sums_policy_and_reference_alike_live_and_precomputed(world_dir, offline_data, tmp_path, dpo_run):
    """ld_alpha (LD-DPO): at step 1 (policy == reference) the policy's LD sums in the update and the reference's
    (live, then precomputed and cached under its own key) cancel, so the loss is log 2 as without it; the held-out
    log-probs are LD's (the longer side's tail down-weighted: higher than the plain sums)."""
    extra = ("training.train_iters=2", "+algorithm.ld_alpha=0.5")
    live = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "live", *extra), use_ray=False)
    history = rows(tmp_path / "live" / "metrics.jsonl")
    assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert live["eval/loss_initial"] == pytest.approx(math.log(2), rel=1e-5)
    plain = dpo_run[1]
    assert live["eval/logps/chosen_initial"] + live["eval/logps/rejected_initial"] > (
        plain["eval/logps/chosen_initial"] + plain["eval/logps/rejected_initial"] + 0.5)
    cached = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "cached", *extra,
                                "algorithm.reference=precomputed",
                                f"data.ref_logps_cache_dir={tmp_path / 'cache'}"), use_ray=False)
    assert cached["eval/loss_initial"] == pytest.approx(math.log(2), rel=1e-5)
    assert rows(tmp_path / "cached" / "metrics.jsonl")[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)


def test_tr_dpo_offline_refreshes_before_the_next_reference_forward_and_resumes_with_its_reference(
        world_dir, offline_data, tmp_path):
    """TR-DPO hard, interval 1, offline: the next step's reference forward waits for the refresh (no prefetch on a
    refresh step), so every step starts at policy == reference: loss log 2. A run resumed from step 2's
    checkpoint, which holds the refreshed reference, goes on at log 2 (the initial reference would not)."""
    extra = ("+algorithm.ref_update.mode=hard", "+algorithm.ref_update.interval=1", "training.save_interval=2")
    summary = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path, "training.train_iters=3", *extra),
                  use_ray=False)
    history = rows(tmp_path / "metrics.jsonl")
    assert [h["loss"] for h in history] == pytest.approx([math.log(2)] * 3, rel=1e-5)
    # the final evaluation scores against the reference refreshed after the last step: the final policy itself
    assert summary["eval/loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert [h["reference/version"] for h in history] == [1.0, 2.0, 3.0]
    run(offline_config("dpo_trainer_tiny", world_dir, tmp_path, *extra, "training.resume=auto",
                       "training.train_iters=4"), use_ray=False)
    resumed = rows(tmp_path / "metrics.jsonl")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed[2:]] == pytest.approx([math.log(2)] * 2, rel=1e-5)
    assert [h["reference/version"] for h in resumed] == [1.0, 2.0, 3.0, 4.0]


def test_reward_stage_learns_and_exports_a_loadable_reward_model(world_dir, offline_data, tmp_path):
    summary = run(offline_config("rm_trainer_tiny", world_dir, tmp_path, "training.train_iters=30",
                                 "training.global_batch_size=16", "training.lr=3e-3", "training.eval_interval=0",
                                 "training.eval_samples=32"), use_ray=False)
    assert summary["eval/accuracy_initial"] < 0.8
    assert summary["eval/accuracy"] >= 0.9, summary  # the stated accuracy on the held-out split
    assert summary["eval/loss"] < summary["eval/loss_initial"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_reward")
    assert model.config.num_labels == 1
    history = rows(tmp_path / "metrics.jsonl")
    assert {"loss", "accuracy", "margin", "scores/chosen", "reward/grad_norm"} <= set(history[0])


def test_sft_stage_lowers_held_out_loss(world_dir, offline_data, tmp_path):
    summary = run(offline_config("sft_trainer_tiny", world_dir, tmp_path, "training.train_iters=8"), use_ray=False)
    assert summary["eval/loss"] < summary["eval/loss_initial"] - 0.5
    assert (tmp_path / "hf_actor" / "model.safetensors").is_file()
    assert summary["report"] == str(tmp_path / "report.html")
    assert 'data-key="eval/loss"' in (tmp_path / "report.html").read_text()


def test_offline_dpo_resume_gives_the_uninterrupted_run(world_dir, offline_data, tmp_path, dpo_run):
    straight_out, _ = dpo_run
    common = ("++training.export_hf=true", "++training.save_interval=3")
    resumed = tmp_path / "resumed"
    run(offline_config("dpo_trainer_tiny", world_dir, resumed, "training.train_iters=3", *common), use_ray=False)
    assert ckpt.latest_step(resumed / "checkpoints") == 3
    assert json.loads((resumed / "checkpoints" / "iter_0000003" / "trainer_state.json").read_text()) == {
        "step": 3, "consumed_samples": 24, "reference_version": 0}  # (0: a reference never refreshed)
    run(offline_config("dpo_trainer_tiny", world_dir, resumed, "training.train_iters=6", *common), use_ray=False)
    # straight_out ran 6 steps without saving; the data order and the metrics are the same
    assert (resumed / "metrics.jsonl").read_text() == (straight_out / "metrics.jsonl").read_text()
    a, b = weights(straight_out / "hf_actor"), weights(resumed / "hf_actor")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_matches_the_live_one_and_is_cached(world_dir, offline_data, tmp_path, dpo_run):
    _, live = dpo_run
    cache = tmp_path / "cache"
    extra = ("algorithm.reference=precomputed", f"++data.ref_logps_cache_dir={cache}", "training.train_iters=6")
    first = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "a", *extra), use_ray=False)
    files = sorted(cache.glob("*.pt"))
    assert [f.name.split("-")[0] for f in files] == ["pairs_eval", "pairs_train"]
    # the cached reference log-probs were computed in other batches: each key moves by at most its
    # derivative (<= beta for the loss and the margin) times the log-probs' rounding
    for key in ("eval/loss", "eval/rewards/margins", "eval/loss_initial"):
        assert_close(first[key], live[key], rtol=RTOL_LOGPS, scale=margin_scale(live), what=key)
    stamps = [f.stat().st_mtime_ns for f in files]
    import dpo_rl.trainer.offline_stages as run_offline

    created = []
    real = run_offline.GroupFactory.create

    def spy(self, name, *args):
        created.append(name)
        return real(self, name, *args)

    run_offline.GroupFactory.create = spy
    try:
        second = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "b", *extra), use_ray=False)
    finally:
        run_offline.GroupFactory.create = real
    assert created == ["trained"]  # the cache was reused: no reference model was built
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert second["eval/loss"] == first["eval/loss"]


def test_reference_free_and_separate_reference_models(world_dir, offline_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_rl.checkpoint import hf_files
    from dpo_rl.config.model import shipped_model_config

    simpo = offline_config("dpo_trainer_tiny", world_dir, tmp_path / "simpo", "algorithm.loss_type=simpo",
                           "algorithm.beta=2.0", "training.train_iters=2")
    assert "ref" not in resolve(simpo, check_paths=True).roles
    summary = run(simpo, use_ray=False)
    assert summary["eval/loss"] < summary["eval/loss_initial"]
    # seed 003: a reference other than the actor's initial weights
    torch.manual_seed(5)
    other = AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(shipped_model_config("tiny")))
    other.save_pretrained(tmp_path / "other_ref")
    cfg = offline_config("dpo_trainer_tiny", world_dir, tmp_path / "other", f"++actor_rollout_ref.ref.load={tmp_path}/other_ref",
                         "training.train_iters=1")
    assert resolve(cfg).roles["ref"].load == f"{tmp_path}/other_ref"
    summary = run(cfg, use_ray=False)
    assert_differs(summary["eval/rewards/margins_initial"], 0.0, rtol=RTOL_LOGPS, scale=margin_scale(summary, "_initial"),
                   what="initial margin against another reference")


@pytest.fixture(scope="module")
def ray_precomputed_run(world_dir, offline_data, tmp_path_factory):
    """Offline DPO on Ray with a precomputed reference (a loss mixture and ``pref_ftx``) on a cluster of one CPU:
    the reference's pool is released before the actor's is placed. One run for the two tests below."""
    out = tmp_path_factory.mktemp("ray_precomputed")
    summary = run(offline_config("dpo_trainer_tiny", world_dir, out, "++ray.num_cpus=1",
                                 "algorithm.reference=precomputed", "training.train_iters=2",
                                 "algorithm.loss_type=[sigmoid,sft]",
                                 "++algorithm.loss_weights=[1.0,0.5]", "algorithm.pref_ftx=0.1"))
    return out, summary


def test_offline_dpo_through_ray_with_a_precomputed_reference(ray_precomputed_run):
    out, summary = ray_precomputed_run
    assert [h["step"] for h in rows(out / "metrics.jsonl")] == [1, 2]
    assert summary["eval/loss"] < summary["eval/loss_initial"]


def problems(cfg, check_paths=True):
    with pytest.raises(ConfigError) as err:
        resolve(cfg, check_paths=check_paths)
    return err.value.problems


def test_bad_inputs_fail_before_training(world_dir, offline_data, tmp_path):
    data = offline_data
    wrong_kind = problems(offline_config("dpo_trainer_tiny", world_dir, tmp_path, f"data.train_path={data}/sft_train"))
    assert any(f"data.train_path='{data}/sft_train' holds 'sft' data, but stage 'dpo' trains on pairwise or reward "
               "data; preprocess it with --handler-name AlpacaStylePairwiseHandler" in p for p in wrong_kind)
    wrong_kind = problems(offline_config("sft_trainer_tiny", world_dir, tmp_path, f"data.eval_path={data}/pairs_eval"))
    assert any("holds 'pairwise' data, but stage 'sft' trains on sft data" in p for p in wrong_kind)
    not_prefix = problems(offline_config("rm_trainer_tiny", world_dir, tmp_path, f"data.train_path={tmp_path}/x.jsonl"))
    assert any("is not a preprocess_data.py output prefix" in p for p in not_prefix)
    no_ref = problems(offline_config("dpo_trainer_tiny", world_dir, tmp_path, "algorithm.reference=none"))
    assert any("algorithm.loss_type ['sigmoid'] needs a reference model but algorithm.reference=none" in p
               for p in no_ref)
    unknown = problems(offline_config("dpo_trainer_tiny", world_dir, tmp_path, "algorithm.loss_type=dpo"))
    assert any("algorithm.loss_type='dpo' is unknown" in p for p in unknown)
    layout = problems(offline_config("dpo_trainer_tiny", world_dir, tmp_path, "training.global_batch_size=6"))
    assert any("training.global_batch_size (6) must be a multiple of data-parallel size x "
               "actor_rollout_ref.actor_rollout.micro_batch_size (1 x 4 = 4)" in p for p in layout)
    # run() refuses before any worker or output directory exists
    with pytest.raises(ConfigError):
        run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "never", "algorithm.reference=none"), use_ray=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("stage", ["sft_trainer_tiny", "rm_trainer_tiny"])
def test_data_parallel_training_matches_one_rank(world_dir, offline_data, tmp_path, stage):
    """Two DP ranks on Ray give the one-rank run: the SFT token mean and the pair mean span both ranks."""
    role = "actor_rollout" if stage.startswith("sft") else "reward"
    one = run(offline_config(stage, world_dir, tmp_path / "one", "training.train_iters=3"), use_ray=False)
    two = run(offline_config(stage, world_dir, tmp_path / "two", "training.train_iters=3",
                             f"resource_pool.{role}=[2]"))
    a, b = rows(tmp_path / "one" / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    for x, y in zip(a, b):
        for key in ("loss", "actor/grad_norm" if role == "actor_rollout" else "reward/grad_norm"):
            assert_close(y[key], x[key], rtol=RTOL_LAYOUT, what=f"step {x['step']} {key}")
    assert_close(two["eval/loss"], one["eval/loss"], rtol=RTOL_LAYOUT, what="eval/loss")


def test_pools_are_checked_against_the_cluster_as_they_are_held(world_dir, tmp_path, ray_precomputed_run):
    """A live reference is held beside the actor; a precomputed one is released first, so one CPU suffices."""
    live = offline_config("dpo_trainer_tiny", world_dir, tmp_path / "live", "++ray.num_cpus=1", "training.train_iters=1")
    with pytest.raises(ConfigError, match=r"CPU: need 2, cluster has 1"):
        run(live)
    out, summary = ray_precomputed_run  # ray.num_cpus=1 too
    assert [h["step"] for h in rows(out / "metrics.jsonl")] == [1, 2]
    assert summary["eval/loss"] < summary["eval/loss_initial"]


def test_eval_fraction_holds_out_seeded_rows_never_trained_on(offline_data):
    from dpo_rl.data.indexed import TokenizedDataset
    from dpo_rl.trainer.offline import make_splits

    data = TokenizedDataset(offline_data / "pairs_train")
    train, held_out = make_splits(data, None, eval_fraction=0.25, eval_samples=100, seed=7)
    assert len(held_out) == 16 and len(train) == 48
    assert not set(train.rows) & set(held_out.rows) and sorted(train.rows + held_out.rows) == list(range(64))
    again, _ = make_splits(data, None, eval_fraction=0.25, eval_samples=100, seed=7)
    assert again.rows == train.rows
    assert make_splits(data, None, eval_fraction=0.25, eval_samples=100, seed=8)[0].rows != train.rows
    _, capped = make_splits(data, None, eval_fraction=0.25, eval_samples=5, seed=7)
    assert capped.rows == held_out.rows[:5]
    with pytest.raises(ValueError, match="leaves no training rows"):
        make_splits(data, None, eval_fraction=0.999, eval_samples=5, seed=7)


def test_tensor_parallel_offline_dpo_matches_one_rank(world_dir, offline_data, tmp_path, dpo_run):
    """The actor sharded TP=2 on Ray trains like the unsharded in-process actor (same data, same losses)."""
    straight_out, _ = dpo_run
    run(offline_config("dpo_trainer_tiny", world_dir, tmp_path, "training.train_iters=2",
                       "++actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                       "resource_pool.actor_rollout=[2]"))
    sharded, single = rows(tmp_path / "metrics.jsonl"), rows(straight_out / "metrics.jsonl")[:2]
    for a, b in zip(sharded, single):
        for key in ("loss", "rewards/margins", "logps/chosen", "actor/grad_norm"):
            # the margin starts at 0 (policy == reference): it is judged against the log-probs it is made of
            scale = logps_scale(b, beta=dpo_beta()) if key == "rewards/margins" else 0.0
            assert_close(a[key], b[key], rtol=RTOL_LAYOUT, scale=scale, what=f"step {b['step']} {key}")


def test_reward_stage_starts_from_a_causal_lm(world_dir, offline_data, tmp_path):
    """The usual recipe: the RM's trunk from the SFT model, a fresh value head (same on every TP rank)."""
    with pytest.raises(ConfigError, match=r"has num_layers 4, hidden_size 128.*reward.model 'tiny-rm' says"):  # tiny-rm is smaller
        run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "bad", f"++reward.load={world_dir}/sft"),
            use_ray=False)
    extra = ("training.train_iters=2", f"++reward.load={world_dir}/sft", "training.eval_interval=0",
             "model=[tiny-rm,tiny]", "reward.model=tiny")
    one = run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "one", *extra), use_ray=False)
    two = run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "two", *extra,
                             "++reward.tensor_model_parallel_size=2", "resource_pool.reward=[2]"))
    a, b = rows(tmp_path / "one" / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    for x, y in zip(a, b):
        assert_close(y["loss"], x["loss"], rtol=RTOL_LAYOUT, what=f"step {x['step']} loss")
    assert_close(two["eval/loss_initial"], one["eval/loss_initial"], rtol=RTOL_LAYOUT, what="eval/loss_initial")
    # scoring (online DPO's reward role) still refuses a checkpoint without a score head
    from dpo_rl.config.model import ParallelConfig, shipped_model_config
    from dpo_rl.config.schema import RoleConfig
    from dpo_rl.runtime.worker_group import LocalWorkerGroup
    from dpo_rl.workers.reward import RewardWorker

    with pytest.raises(ConfigError, match="HF checkpoint has no tensor 'score.weight'"):
        LocalWorkerGroup(RewardWorker, dict(model_config=shipped_model_config("tiny"), parallel=ParallelConfig(),
                                            role=RoleConfig(model="tiny", load=str(world_dir / "sft")), seed=0))
