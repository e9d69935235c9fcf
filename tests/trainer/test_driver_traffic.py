"""The driver never holds the weights: in a split-actor run, every tensor that passes through it is
sample data, far smaller than one copy of the model (the weight sync streams between the roles)."""

from __future__ import annotations

import torch

from dpo_rl.batch import Batch
from dpo_rl.trainer.run import run
from tests.trainer.conftest import small_config


def tensor_bytes(value) -> int:
    """Bytes of tensor data inside a call's arguments or result (nested containers, Batches)."""
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, Batch):
        return tensor_bytes(value.tensors)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def test_split_actor_weights_never_pass_through_the_driver(world_dir, tmp_path, monkeypatch):
    import ray

    from dpo_rl.runtime.worker_group import RayWorkerGroup

    traffic: list[tuple[str, int]] = []
    real_call, real_get = RayWorkerGroup.call_async, ray.get

    def counted_call(self, method, *args, **kwargs):
        traffic.append((f"{self.worker_cls.__name__}.{method} args", tensor_bytes((args, kwargs))))
        return real_call(self, method, *args, **kwargs)

    def counted_get(refs, *args, **kwargs):
        result = real_get(refs, *args, **kwargs)
        traffic.append(("result", tensor_bytes(result)))
        return result

    monkeypatch.setattr(RayWorkerGroup, "call_async", counted_call)
    monkeypatch.setattr(ray, "get", counted_get)
    run(small_config(world_dir, tmp_path / "split", "resource_pool.actor_rollout=[2]",
                     "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
                     "+actor_rollout_ref.actor_rollout.verify_weight_sync=true"))
    from safetensors.torch import load_file

    model_bytes = sum(t.numel() * t.element_size() for t in load_file(str(world_dir / "sft" / "model.safetensors")).values())
    sync_calls = [b for what, b in traffic if "weight" in what or "checksum" in what]
    assert len(sync_calls) >= 3 and sum(sync_calls) == 0  # the syncs ran and sent no tensor through the driver
    assert max(b for _, b in traffic) < model_bytes / 10  # the largest message: samples, not weights
    assert sum(b for _, b in traffic) < model_bytes  # not even one copy of the model over the whole run
    assert any(b > 0 for _, b in traffic)  # (the counting sees the samples)
