"""Every documented key is settable as written on the command line (no Hydra '+')."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from dpo_rl.config.compose import compose
from dpo_rl.config.overrides import documented_keys, settable_as_written


def test_documented_keys_the_yaml_lacks_are_added_and_others_pass_through():
    assert settable_as_written(["training.save_interval=5", "ray.address=auto", "+data.extra=1", "~reward.load",
                                "training.sav_interval=5", "hydra.run.dir=x"]) == [
        "++training.save_interval=5", "++ray.address=auto", "+data.extra=1", "~reward.load",
        "training.sav_interval=5", "hydra.run.dir=x"]
    assert "actor_rollout_ref.actor_rollout.rollout_engine" in documented_keys()


def test_a_shipped_config_takes_keys_it_does_not_list():
    cfg = compose("online_dpo_trainer_tiny", ["training.save_interval=7", "ray.connect_timeout_s=5",
                                              "actor_rollout_ref.actor_rollout.rollout_engine=vllm",
                                              "actor_rollout_ref.actor_rollout.num_gpus_for_infer=0"])
    assert cfg.training.save_interval == 7 and cfg.ray.connect_timeout_s == 5
    assert cfg.actor_rollout_ref.actor_rollout.rollout_engine == "vllm"


def test_a_typo_still_fails_in_hydra():
    with pytest.raises(ConfigCompositionException, match="sav_interval"):
        compose("online_dpo_trainer_tiny", ["training.sav_interval=7"])
