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
