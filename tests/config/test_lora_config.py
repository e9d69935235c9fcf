"""The ``lora:`` section: where it may be set, its checks, and when the actor's base replaces the reference."""

from __future__ import annotations

import pytest

from dpo_rl.config.compose import compose
from dpo_rl.errors import ConfigError
from dpo_rl.trainer.run import resolve

ON = "training.lora.enabled=true"


def problems(name, overrides):
    with pytest.raises(ConfigError) as err:
        resolve(compose(name, overrides), check_paths=False)
    return err.value.problems


def test_training_lora_is_the_trained_roles_default_and_its_section_overrides():
    c = resolve(compose("online_dpo_trainer_tiny", [ON, "training.lora.rank=4",
                                                    "actor_rollout_ref.actor_rollout.lora.alpha=32"]), check_paths=False)
    lora = c.roles["actor_rollout"].lora
    assert (lora.enabled, lora.rank, lora.alpha, lora.target_modules) == (True, 4, 32.0, "all")
    assert not c.roles["reward"].lora.enabled  # training.lora is for the trained role only
    reward = resolve(compose("rm_trainer_tiny", ["reward.lora.enabled=true"]), check_paths=False)
    assert reward.roles["reward"].lora.enabled and reward.trained_role == "reward"


@pytest.mark.parametrize("name", ["online_dpo_trainer_tiny", "dpo_trainer_tiny"])
def test_the_lora_actors_base_is_the_reference_and_no_reference_is_placed(name):
    from dpo_rl.trainer.online_dpo import role_pools, worker_specs

    full = resolve(compose(name), check_paths=False)
    assert "ref" in full.roles and not full.reference_is_actor_base
    c = resolve(compose(name, [ON]), check_paths=False)
    assert c.reference_is_actor_base and "ref" not in c.roles and "ref" not in c.models
    assert any("the reference is the actor's base model with its LoRA adapters off" in m for m in c.notes)
    assert not any("ref" in m for m in c.unused)
    if name.startswith("online"):
        assert set(worker_specs(c, (1,), 0)) == {"actor", "reward"} and set(role_pools(c)) == {"actor", "reward"}
    else:
        from dpo_rl.trainer.offline_stages import offline_pools

        assert set(offline_pools(c)) == {"trained"}


def test_a_reference_with_its_own_load_or_precision_is_placed():
    other = resolve(compose("online_dpo_trainer_tiny", [ON, "actor_rollout_ref.ref.load=/elsewhere"]),
                    check_paths=False)
    assert "ref" in other.roles and not other.reference_is_actor_base
    bf16 = resolve(compose("dpo_trainer_tiny", [ON, "actor_rollout_ref.ref.params_dtype=bf16"]), check_paths=False)
    assert "ref" in bf16.roles


@pytest.mark.parametrize("overrides, message", [
    ([ON, "training.lora.rank=0"], "actor_rollout_ref.actor_rollout.lora.rank=0 must be >= 1"),
    ([ON, "training.lora.alpha=-1"], "actor_rollout_ref.actor_rollout.lora.alpha=-1.0 must be > 0"),
    ([ON, "training.lora.dropout=1.0"], "lora.dropout=1.0 must be in [0, 1)"),
    ([ON, "training.lora.target_modules=[linear_qkv,attn_out]"],
     "actor_rollout_ref.actor_rollout.lora.target_modules: 'attn_out' is no linear layer of the model; use all or "
     "a list of linear_qkv, linear_proj, linear_fc1, linear_fc2"),
    ([ON, "training.lora.target_modules=[q_proj]"],
     "q_proj is part of linear_qkv here (q/k/v are one fused linear_qkv, gate/up one linear_fc1)"),
    ([ON, "training.lora.target_modules=[]"], "lora.target_modules=[] must be all or a non-empty list"),
    (["actor_rollout_ref.ref.lora.enabled=true"],
     "actor_rollout_ref.ref.lora={'enabled': True} is not read by the ref role in stage 'ray_online_dpo' "
     "(AdapterSettings: Parameter-efficient training: read only by the role the stage trains); in stage "
     "'ray_online_dpo' it belongs in actor_rollout_ref.actor_rollout"),
    (["reward.lora.rank=4"], "reward.lora={'rank': 4} is not read by the reward role in stage 'ray_online_dpo'"),
])
def test_bad_lora_settings_are_named_before_anything_starts(overrides, message):
    found = problems("online_dpo_trainer_tiny", overrides)
    assert any(message in p for p in found), found


def test_every_spelling_of_all_is_accepted():
    for spelling in ("all", "ALL", "all-linear"):
        c = resolve(compose("sft_trainer_tiny", [ON, f"training.lora.target_modules={spelling}"]), check_paths=False)
        assert c.roles["actor_rollout"].lora.target_modules == spelling
