"""Pipeline parallelism through Ray worker groups: every RPC's result comes from the rank that owns it."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from dpo_rl.trainer.run import run
from tests.tolerance import assert_close
from tests.trainer.conftest import offline_config

#: PP=2 runs the same sums split over two stages (float32): the TP/DP layout tolerance.
RTOL_LAYOUT = 1e-4
PP2 = ("++actor_rollout_ref.actor_rollout.pipeline_model_parallel_size=2", "resource_pool.actor_rollout=[2]")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_with_two_pipeline_stages_trains_and_exports_like_one(world_dir, offline_data, tmp_path):
    # from the world's actor (a random init would differ by layout: each stage draws its own layers)
    common = ("training.train_iters=2", "++training.export_hf=true", "training.eval_interval=0",
              f"++actor_rollout_ref.actor_rollout.load={world_dir}/sft")
    one = run(offline_config("sft_trainer_tiny", world_dir, tmp_path / "one", *common), use_ray=False)
    two = run(offline_config("sft_trainer_tiny", world_dir, tmp_path / "two", *common, *PP2))
    for a, b in zip(rows(tmp_path / "one" / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")):
        for key in ("loss", "actor/grad_norm"):
            assert_close(b[key], a[key], rtol=RTOL_LAYOUT, what=f"step {a['step']} {key}")
    assert_close(two["eval/loss"], one["eval/loss"], rtol=RTOL_LAYOUT, what="eval/loss")
    # the export holds both stages' layers (it was None on the collected rank before)
    a, b = load_file(str(tmp_path / "one" / "hf_actor" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "hf_actor" / "model.safetensors"))
    assert set(a) == set(b) and any(k.startswith("model.layers.3.") for k in b)
    for name in a:
        assert_close(b[name], a[name], rtol=RTOL_LAYOUT, what=name)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           load_file(str(world_dir / "sft" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"])


def test_split_actor_with_two_pipeline_stages_syncs_and_trains_like_one(world_dir, tmp_path):
    """PP=2 training ranks push their weights to a TP=1 rollout rank (checksums compared on both sides)."""
    from tests.trainer.conftest import small_config

    one = run(small_config(world_dir, tmp_path / "one"), use_ray=False)
    two = run(small_config(world_dir, tmp_path / "two", "resource_pool.actor_rollout=[3]",
                           "actor_rollout_ref.actor_rollout.num_gpus_for_train=2",
                           "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
                           "++actor_rollout_ref.actor_rollout.pipeline_model_parallel_size=2",
                           "+actor_rollout_ref.actor_rollout.verify_weight_sync=true"))
    a, b = rows(tmp_path / "one" / "metrics.jsonl"), rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss", "objective/scores", "actor/grad_norm"):
            assert_close(y[key], x[key], rtol=RTOL_LAYOUT, what=f"step {x['step']} {key}")
    assert all("timing/sync" in t for t in rows(tmp_path / "two" / "timing.jsonl"))
    assert_close(two["eval/win_rate"], one["eval/win_rate"], rtol=RTOL_LAYOUT, what="eval/win_rate")


def test_offline_dpo_and_the_reward_stage_with_pipeline_stages_match_one_rank(world_dir, offline_data, tmp_path):
    """Offline DPO with a TP=2 x PP=2 actor (the reference stays TP=PP=1) and the reward stage with TP=2 x PP=2."""
    dpo = ("training.train_iters=2", "training.eval_interval=0")
    one = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "dpo1", *dpo), use_ray=False)
    two = run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "dpo2", *dpo,
                             "++actor_rollout_ref.actor_rollout.pipeline_model_parallel_size=2",
                             "++actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                             "resource_pool.actor_rollout=[4]"))
    for x, y in zip(rows(tmp_path / "dpo1" / "metrics.jsonl"), rows(tmp_path / "dpo2" / "metrics.jsonl")):
        for key in ("loss", "logps/chosen", "actor/grad_norm"):
            assert_close(y[key], x[key], rtol=RTOL_LAYOUT, what=f"dpo step {x['step']} {key}")
    assert_close(two["eval/loss"], one["eval/loss"], rtol=RTOL_LAYOUT, what="dpo eval/loss")
    # the reward model is trained from the world's RM; TP=2 x PP=2 over 4 processes
    rm = ("training.train_iters=2", "training.eval_interval=0", f"++reward.load={world_dir}/rm")
    one = run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "rm1", *rm), use_ray=False)
    four = run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "rm4", *rm, "resource_pool.reward=[4]",
                              "++reward.tensor_model_parallel_size=2", "++reward.pipeline_model_parallel_size=2"))
    for x, y in zip(rows(tmp_path / "rm1" / "metrics.jsonl"), rows(tmp_path / "rm4" / "metrics.jsonl")):
        assert_close(y["loss"], x["loss"], rtol=RTOL_LAYOUT, what=f"reward step {x['step']} loss")
    assert_close(four["eval/loss"], one["eval/loss"], rtol=RTOL_LAYOUT, what="reward eval/loss")


def test_resume_with_the_distributed_optimizer_sharded_over_two_dp_ranks(world_dir, offline_data, tmp_path):
    """DP=2 on Ray: each DP rank writes its shard of the main parameters and Adam moments; resume equals straight."""
    from dpo_rl.checkpoint import training as ckpt

    dp2 = ("resource_pool.actor_rollout=[2]", "training.eval_interval=0", "++training.save_interval=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(offline_config("dpo_trainer_tiny", world_dir, straight, "training.train_iters=4", *dp2))
    run(offline_config("dpo_trainer_tiny", world_dir, resumed, "training.train_iters=2", *dp2))
    shards = sorted(p.name for p in (resumed / "checkpoints" / "iter_0000002").rglob("distrib_optim_dp*.pt"))
    assert shards == ["distrib_optim_dp000.pt", "distrib_optim_dp001.pt"]
    assert ckpt.latest_step(resumed / "checkpoints") == 2
    run(offline_config("dpo_trainer_tiny", world_dir, resumed, "training.train_iters=4", *dp2))  # resume: auto
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
