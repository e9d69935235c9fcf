"""A role's ``load`` is checked before Ray starts (:mod:`dpo_rl.config.load_inspection`): the kind of model it
holds, that it holds weights at all, and that its architecture is the role's ``model`` -- from config.json,
indexes, safetensors headers and dpo_rl_checkpoint.json alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dpo_rl.checkpoint import hf_files
from dpo_rl.checkpoint.convert import hf_to_megatron
from dpo_rl.config.compose import compose
from dpo_rl.config.load_inspection import check_load, role_needs
from dpo_rl.config.model import shipped_model_config
from dpo_rl.errors import ConfigError
from dpo_rl.trainer.run import resolve
from tests.trainer.conftest import small_run_overrides

ACTOR, REF, REWARD = "actor_rollout_ref.actor_rollout.load", "actor_rollout_ref.ref.load", "reward.load"
TINY, TINY_RM = shipped_model_config("tiny"), shipped_model_config("tiny-rm")
#: role -> (key, what it needs); the reward role as online DPO's scorer and as the reward stage's trained role
NEEDS = {"actor": (ACTOR, role_needs("actor_rollout", trained=True)), "ref": (REF, role_needs("ref", trained=False)),
         "scorer": (REWARD, role_needs("reward", trained=False)), "reward stage": (REWARD, role_needs("reward", True))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world: the tokenizer and prompts, a causal LM (``tiny``) and a reward model (``tiny-rm``), each
    also as a Megatron checkpoint."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from examples.tiny_world import build
    from examples.tiny_world import world as prompts

    root = tmp_path_factory.mktemp("world")
    tokenizer = build.build_tokenizer(root / "tokenizer")
    train, held_out = prompts.split_prompts(build.SEED)
    build.write_prompts(root / "train.jsonl", train[:8])
    build.write_prompts(root / "eval.jsonl", held_out[:4])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(TINY)).save_pretrained(root / "sft")
    rm_cfg = hf_files.hf_transformers_config(TINY_RM, reward=True, pad_token_id=tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(rm_cfg).save_pretrained(root / "rm")
    hf_to_megatron(str(root / "sft"), str(root / "mg_sft"), tp=1, pp=1)
    hf_to_megatron(str(root / "rm"), str(root / "mg_rm"), tp=1, pp=1, reward=True)
    return root


def problems(need: str, path, model=TINY, model_name="tiny", tp=1, pp=1) -> list[str]:
    key, wants = NEEDS[need]
    return check_load(key, str(path), wants, model, model_name, tp, pp)


def copy(world, name, tmp_path):
    shutil.copytree(world / name, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("kind", ["", "mg_"])
def test_checkpoints_of_the_right_kind_and_architecture_pass(world, kind):
    assert problems("actor", world / f"{kind}sft") == []
    assert problems("ref", world / f"{kind}sft") == []
    assert problems("scorer", world / f"{kind}rm", TINY_RM, "tiny-rm") == []
    assert problems("reward stage", world / f"{kind}rm", TINY_RM, "tiny-rm") == []


def test_the_reward_stage_starts_from_an_hf_causal_lm(world):
    assert problems("reward stage", world / "sft") == []  # its trunk; the value head starts fresh
    (found,) = problems("reward stage", world / "mg_sft")  # the Megatron loader has no trunk-only path
    assert "causal-LM Megatron checkpoint" in found and "--load-model-type mg --save-model-type hf" in found


@pytest.mark.parametrize("kind", ["", "mg_"])
def test_a_reward_model_where_a_causal_lm_is_needed(world, kind):
    (found,) = problems("actor", world / f"{kind}rm", TINY_RM, "tiny-rm")
    assert found.startswith(f"{ACTOR}='{world / f'{kind}rm'}' is a reward-model checkpoint")
    assert "the actor needs a causal LM" in found
    assert "(LlamaForSequenceClassification)" in found if not kind else "reward: true" in found
    (found,) = problems("ref", world / f"{kind}rm", TINY_RM, "tiny-rm")
    assert found.startswith(REF) and "the reference needs a causal LM" in found


@pytest.mark.parametrize("kind", ["", "mg_"])
def test_a_causal_lm_where_the_reward_role_scores(world, kind):
    (found,) = problems("scorer", world / f"{kind}sft")
    assert found.startswith(REWARD) and "is a causal-LM checkpoint" in found and "needs a reward model" in found


def test_without_architectures_the_head_is_read_from_the_safetensors_header(world, tmp_path):
    rm = copy(world, "rm", tmp_path)
    config = json.loads((rm / "config.json").read_text())
    del config["architectures"]
    (rm / "config.json").write_text(json.dumps(config))
    (found,) = problems("actor", rm, TINY_RM, "tiny-rm")
    assert "is a reward-model checkpoint (a score.weight head)" in found


def test_an_architecture_other_than_the_models_names_each_field(world):
    (found,) = problems("reward stage", world / "sft", TINY_RM, "tiny-rm")
    assert found.startswith(f"{REWARD}='{world / 'sft'}' has num_layers 4, hidden_size 128, ffn_hidden_size 352, "
                            "num_query_groups 2, head_dim 32 but reward.model 'tiny-rm' says num_layers 2, "
                            "hidden_size 64, ffn_hidden_size 172, num_query_groups 4, head_dim 16")
    assert "set reward.model to the checkpoint's architecture" in found
    (found,) = problems("actor", world / "mg_sft", TINY_RM, "tiny-rm")
    assert "has num_layers 4, hidden_size 128" in found and "actor_rollout_ref.actor_rollout.model 'tiny-rm'" in found


def test_a_directory_without_weights(world, tmp_path):
    (tmp_path / "config_only").mkdir()
    shutil.copy(world / "sft" / "config.json", tmp_path / "config_only")
    (found,) = problems("actor", tmp_path / "config_only")
    assert "holds no weights (no model.safetensors, model.safetensors.index.json" in found
    (tmp_path / "empty").mkdir()
    (found,) = problems("actor", tmp_path / "empty")
    assert "holds no config.json and no weights" in found and "dpo_rl_checkpoint.json" in found
    mg = copy(world, "mg_sft", tmp_path)
    (mg / "release" / "mp_rank_00" / "model_optim_rng.pt").unlink()
    (found,) = problems("actor", mg)
    assert "holds no weights for 1 of its 1 ranks (release/mp_rank_00/model_optim_rng.pt missing)" in found


def test_damaged_or_incomplete_weights(world, tmp_path):
    sft = copy(world, "sft", tmp_path)
    weights = sft / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    (found,) = problems("actor", sft)
    assert f"{weights} is truncated or corrupted (safetensors:" in found
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    weights.rename(sft / "model-00001-of-00002.safetensors")
    (sft / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any("names 1 file(s) that are missing (model-00002-of-00002.safetensors)" in p
               for p in problems("actor", sft))


def test_megatron_layout_and_lora_checkpoints(world, tmp_path):
    (found,) = problems("actor", world / "mg_sft", tp=2)
    assert "is sharded TP=1, PP=1 but actor_rollout_ref.actor_rollout runs TP=2, PP=1; reshard it" in found
    mg = copy(world, "mg_sft", tmp_path)
    meta = json.loads((mg / "dpo_rl_checkpoint.json").read_text())
    (mg / "dpo_rl_checkpoint.json").write_text(json.dumps({**meta, "lora": {"rank": 8}}))
    (found,) = problems("actor", mg)
    assert "is a LoRA training checkpoint" in found
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "trainer_state.json").write_text("{}")
    shutil.copy(mg / "dpo_rl_checkpoint.json", tmp_path)
    (found,) = problems("actor", tmp_path / "step")
    assert "is one step of a training checkpoint" in found and f"{ACTOR}={str(tmp_path)!r}" in found


def test_a_peft_adapter_is_named(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (found,) = problems("actor", tmp_path / "adapter")
    assert "is a PEFT (LoRA) adapter, not a model" in found and "--lora-adapter-dir" in found


def test_no_tensor_is_read(world, monkeypatch):
    """Only JSON and safetensors headers: it runs on the driver before Ray, for an 8B model too."""
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor loader was called")

    for module, name in ((torch, "load"), (safetensors, "safe_open"), (safetensors.torch, "load_file")):
        monkeypatch.setattr(module, name, refuse)
    assert problems("actor", world / "sft") == problems("actor", world / "mg_sft") == []
    assert len(problems("actor", world / "rm", TINY_RM, "tiny-rm")) == 1


def test_resolution_names_the_actor_load_that_is_a_reward_model(world, tmp_path):
    overrides = small_run_overrides(world, tmp_path / "out")
    resolve(compose("online_dpo_trainer_tiny", overrides))  # the world is complete: this resolves
    with pytest.raises(ConfigError) as err:
        resolve(compose("online_dpo_trainer_tiny", overrides + [f"{ACTOR}={world}/rm"]))
    (found,) = err.value.problems
    assert found.startswith(f"{ACTOR}='{world}/rm' is a reward-model checkpoint") and "causal LM" in found
