"""Every socket a real online run listens on is on loopback: the roles' rendezvous stores, the gloo
connections, the weight-sync store and groups, a vLLM engine's, and Ray's own (``ss -ltnp`` mid-run)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from dpo_rl.trainer.run import run
from tests.trainer.conftest import small_config

LOOPBACK = ("127.0.0.1", "::1", "[::1]", "[::ffff:127.0.0.1]")


def listeners(ss_output: str, pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of the listening TCP sockets of ``pids`` in ``ss -ltnpH`` output."""
    found = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        address, _, port = fields[3].rpartition(":")
        for pid in re.findall(r"pid=(\d+)", line):
            if int(pid) in pids:
                found.append((address, int(port), int(pid)))
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_a_split_actor_run_listens_on_loopback_only(world_dir, tmp_path, monkeypatch):
    import psutil

    from dpo_rl.trainer.online_dpo import OnlineDPOTrainer

    seen: dict = {}
    real = OnlineDPOTrainer.train_step

    def snapshot_after_step_2(self, step):
        metrics = real(self, step)
        if step == 2:  # every role, the sync groups and Ray's processes are up
            seen["pids"] = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
            seen["ss"] = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        return metrics

    monkeypatch.setattr(OnlineDPOTrainer, "train_step", snapshot_after_step_2)
    # the infer rank samples with vLLM where it is installed (its engine's sockets too)
    engine = "vllm" if importlib.util.find_spec("vllm") else "megatron"
    run(small_config(world_dir, tmp_path / "split", "resource_pool.actor_rollout=[3]",
                     "actor_rollout_ref.actor_rollout.num_gpus_for_train=2",
                     "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
                     f"actor_rollout_ref.actor_rollout.rollout_engine={engine}",
                     "actor_rollout_ref.actor_rollout.vllm_kv_cache_mb=64"))
    sockets = listeners(seen["ss"], seen["pids"])
    assert len({pid for _, _, pid in sockets}) >= 3, sockets  # it saw the run's processes listening
    exposed = [s for s in sockets if s[0] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
