"""Failures a user meets before or while joining a run: each is one message naming what to fix, in bounded time."""

from __future__ import annotations

import pytest


def test_an_unreachable_cluster_fails_in_bounded_time_naming_the_address(world_dir, tmp_path):
    import time

    import ray

    from dpo_rl.errors import ConfigError
    from dpo_rl.trainer.run import run
    from tests.trainer.conftest import small_config

    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run(small_config(world_dir, tmp_path / "out", "++ray.address=127.0.0.1:1", "++ray.connect_timeout_s=2"))
    assert time.monotonic() - start < 30  # it used to retry forever
    assert "ray.address='127.0.0.1:1': no Ray cluster head answers there after 2 s" in str(err.value)
    assert "ray start --head" in str(err.value)
    assert not ray.is_initialized()


def test_an_actor_load_pointing_at_the_reward_model_is_one_message_before_ray(world_dir, tmp_path):
    from tests.cli_runs import assert_one_clear_message, run_cli
    from tests.trainer.conftest import small_run_overrides

    actor_load = "actor_rollout_ref.actor_rollout.load="
    overrides = [o if not o.startswith(actor_load) else f"{actor_load}{world_dir}/rm"
                 for o in small_run_overrides(world_dir, tmp_path / "out")]
    result = run_cli("--config-name", "online_dpo_trainer_tiny", *overrides)
    message = assert_one_clear_message(result, f"{actor_load}'{world_dir}/rm' is a reward-model checkpoint",
                                       within_s=30)
    assert "Ray" not in message and not (tmp_path / "out").exists()  # refused before Hydra and Ray started
