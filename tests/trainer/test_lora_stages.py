"""LoRA in every stage, end to end in-process on the small world: what trains, what is exported, resume.

* online DPO: no reference is placed, only the adapters move, the merged export and the PEFT adapter
  hold the same model, and resume equals the uninterrupted run (the checkpoint holds adapters alone);
* offline DPO, SFT and the reward stage (adapters + value head) train with LoRA and export;
* a LoRA checkpoint is refused by a run configured without LoRA, and by convert_ckpt, with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dpo_rl.checkpoint import training as ckpt
from dpo_rl.errors import ConfigError
from dpo_rl.trainer.run import run
from tests.trainer.conftest import offline_config, small_config

LORA = ("training.lora.enabled=true", "training.lora.rank=4", "training.lora.alpha=8")
COMMON = ("training.eval_interval=0", "training.export_hf=true", *LORA)


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_online_lora_resume_equals_uninterrupted_and_exports_match(world_dir, tmp_path, monkeypatch):
    from dpo_rl.trainer import online_dpo

    created = []
    real_create = online_dpo.GroupFactory.create

    def record(self, name, *args):
        created.append(name)
        return real_create(self, name, *args)

    monkeypatch.setattr(online_dpo.GroupFactory, "create", record)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(small_config(world_dir, straight, "training.train_iters=4", *COMMON), use_ray=False)
    assert created == ["actor", "reward"]  # the reference is the actor's base: no ref group
    run(small_config(world_dir, resumed, "training.train_iters=2", "training.save_interval=2", *COMMON),
        use_ray=False)
    rank_file = ckpt.rank_file(ckpt.iteration_dir(resumed / "checkpoints", 2), 0, 0, 1)
    saved = torch.load(rank_file, weights_only=True)["model"]
    assert saved and all(".adapter." in name for name in saved)  # the adapters alone, not the frozen base
    run(small_config(world_dir, resumed, "training.train_iters=4", *COMMON), use_ray=False)
    assert metrics(resumed) == metrics(straight)
    a, b = weights(straight / "hf_actor"), weights(resumed / "hf_actor")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    base = weights(world_dir / "sft")
    changed = {k for k in base if not torch.equal(base[k], a[k])}
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(k.split(".")[-2] in adapted for k in changed)  # only adapted layers move (merged)
    assert {k for k in base if "norm" in k or "embed" in k} & changed == set()
    config = json.loads((straight / "hf_actor_adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, "CAUSAL_LM")
    assert config["base_model_name_or_path"] == str(world_dir / "sft")
    assert history_has_reference_kl(metrics(straight))


def history_has_reference_kl(history) -> bool:
    """The adapters-off reference is live: the KL to it starts at 0 and grows as the adapters train."""
    return abs(history[0]["objective/kl"]) < 1e-4 and abs(history[-1]["objective/kl"]) > 1e-4


def test_a_lora_checkpoint_is_refused_by_a_full_run_and_by_convert_ckpt(world_dir, tmp_path):
    out = tmp_path / "run"
    run(small_config(world_dir, out, "training.train_iters=1", "training.save_interval=1", *COMMON), use_ray=False)
    with pytest.raises(ConfigError, match="holds LoRA adapters .* but the role is configured for full fine-tuning"):
        run(small_config(world_dir, out, "training.train_iters=2", "training.eval_interval=0"), use_ray=False)
    from dpo_rl.checkpoint.convert import megatron_to_hf

    with pytest.raises(ConfigError, match="is a LoRA training checkpoint: its rank files hold the adapters alone"):
        megatron_to_hf(str(out / "checkpoints"), str(tmp_path / "hf"))


@pytest.mark.parametrize("name", ["dpo_trainer_tiny", "sft_trainer_tiny"])
def test_offline_actor_stages_train_the_adapters_only(world_dir, offline_data, tmp_path, name):
    summary = run(offline_config(name, world_dir, tmp_path, f"actor_rollout_ref.actor_rollout.load={world_dir}/sft",
                                 *COMMON), use_ray=False)
    history = metrics(tmp_path)
    assert history[-1]["loss"] < history[0]["loss"]
    base, merged = weights(world_dir / "sft"), weights(tmp_path / "hf_actor")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and not any("norm" in k or "embed" in k or "lm_head" in k for k in changed)
    assert (tmp_path / "hf_actor_adapter" / "adapter_model.safetensors").is_file()
    assert summary["hf_model_adapter"] == str(tmp_path / "hf_actor_adapter")


def test_reward_stage_trains_adapters_and_the_value_head(world_dir, offline_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run(offline_config("rm_trainer_tiny", world_dir, tmp_path, "training.train_iters=6", f"reward.load={world_dir}/rm",
                       *COMMON), use_ray=False)
    base, merged = weights(world_dir / "rm"), weights(tmp_path / "hf_reward")
    assert not torch.equal(base["score.weight"], merged["score.weight"])  # the head trains
    assert not any(torch.equal(base[k], merged[k]) for k in base if k.endswith("q_proj.weight"))
    assert all(torch.equal(base[k], merged[k]) for k in base if "norm" in k or "embed" in k)
    # the PEFT export (adapters + the head as a module to save) on the HF base is the merged model
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        want = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_reward").eval()(input_ids=ids).logits
        peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(world_dir / "rm"),
                                         tmp_path / "hf_reward_adapter").eval()
        got = peft(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5


def test_split_tp2_lora_actor_on_ray_trains_like_one_rank_and_samples_with_the_merged_weights(world_dir, tmp_path):
    """TP=2 training ranks (replicated A factors kept in step by the TP region mappings) stream merged weights to
    a rollout rank: the metrics follow the one-rank in-process run, the sync checksums agree, and the rollout's
    log-probs equal the trainer's (with unmerged weights they would drift apart from the first update on)."""
    from tests.tolerance import assert_close

    one = tmp_path / "one"
    run(small_config(world_dir, one, *LORA), use_ray=False)
    split = tmp_path / "split"
    run(small_config(world_dir, split, *LORA, "resource_pool.actor_rollout=[3]",
                     "actor_rollout_ref.actor_rollout.num_gpus_for_train=2",
                     "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
                     "actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                     "actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size=1",
                     "actor_rollout_ref.actor_rollout.verify_weight_sync=true"))
    a, b = metrics(one), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss", "objective/scores", "logps/chosen", "actor/grad_norm"):
            assert_close(y[key], x[key], rtol=1e-4, what=f"step {x['step']} {key}")
        assert y["rollout/logprob_diff_mean"] < 1e-4


def test_tp2_pp2_lora_reward_stage_matches_one_rank_and_exports_the_same_adapter(world_dir, offline_data, tmp_path):
    """The reward stage with LoRA over TP=2 x PP=2 (4 Ray processes): same losses, and the PEFT export gathered
    over both (adapters from every stage, the value head from the last) holds the one-rank run's tensors."""
    from tests.tolerance import assert_close

    rm = ("training.train_iters=2", f"reward.load={world_dir}/rm", *COMMON)
    run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "one", *rm), use_ray=False)
    run(offline_config("rm_trainer_tiny", world_dir, tmp_path / "four", *rm, "resource_pool.reward=[4]",
                       "reward.tensor_model_parallel_size=2", "reward.pipeline_model_parallel_size=2"))
    for x, y in zip(metrics(tmp_path / "one"), metrics(tmp_path / "four")):
        assert_close(y["loss"], x["loss"], rtol=1e-4, what=f"step {x['step']} loss")
    one = load_file(str(tmp_path / "one" / "hf_reward_adapter" / "adapter_model.safetensors"))
    four = load_file(str(tmp_path / "four" / "hf_reward_adapter" / "adapter_model.safetensors"))
    assert set(one) == set(four) and "base_model.model.score.weight" in one
    for name in one:
        assert_close(four[name], one[name], rtol=1e-4, what=name)


def test_a_precomputed_reference_comes_from_the_lora_actors_base(world_dir, offline_data, tmp_path):
    """``reference: precomputed`` with LoRA: the actor's base scores the dataset once (no ref group), and training
    sees the same reference as the live adapters-off one."""
    from tests.tolerance import assert_close

    args = ("training.train_iters=3", *COMMON)
    run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "live", *args), use_ray=False)
    run(offline_config("dpo_trainer_tiny", world_dir, tmp_path / "pre", *args, "algorithm.reference=precomputed"),
        use_ray=False)
    assert list((tmp_path / "pre" / "ref_logps_cache").glob("*.pt"))
    for x, y in zip(metrics(tmp_path / "live"), metrics(tmp_path / "pre")):
        for key in ("loss", "rewards/margins", "objective/kl"):
            assert_close(y[key], x[key], rtol=1e-5, scale=abs(x["logps/chosen"]), what=f"step {x['step']} {key}")
