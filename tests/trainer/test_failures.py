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


# -- the output directory, checked before Hydra or Ray start (dpo_rl.cli.preflight) --------------------
def test_an_unwritable_output_dir_fails_before_anything_starts(world_dir, tmp_path):
    from tests.cli_runs import assert_one_clear_message, run_cli
    from tests.trainer.conftest import small_run_overrides

    (tmp_path / "file").write_text("x")
    result = run_cli("--config-name", "online_dpo_trainer_tiny", *small_run_overrides(world_dir, tmp_path / "file/run"))
    message = assert_one_clear_message(result, f"training.output_dir='{tmp_path}/file/run' cannot be created",
                                       within_s=30)
    assert "Ray" not in message


def test_a_finished_run_is_kept_and_reported_as_done(world_dir, tmp_path):
    from tests.cli_runs import assert_one_clear_message, run_cli
    from tests.trainer.conftest import small_run_overrides
    from tests.trainer.test_run_directory import fake_checkpoint, finished_run

    out = tmp_path / "run"
    fake_checkpoint(out, 3)
    finished_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ("--config-name", "online_dpo_trainer_tiny", *small_run_overrides(world_dir, out))  # train_iters=3
    assert_one_clear_message(run_cli(*args), "finished at step 3", "nothing to do", returncode=0, within_s=30)
    assert_one_clear_message(run_cli(*args, "training.resume=none"), "holds a finished run (summary.json) and "
                             "checkpoints up to step 3", "training.overwrite_output_dir=true", within_s=30)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten
    assert not (out / ".hydra").exists()
