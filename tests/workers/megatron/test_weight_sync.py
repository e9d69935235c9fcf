"""Trainer -> rollout weight sync over their own process groups (:mod:`dpo_rl.workers.megatron.weight_sync`).

Pure parts: bucket packing, the streaming loader, the order-independent digest. Distributed part:
training ranks and rollout ranks in two separate gloo worlds (as two Ray roles are) stream the
weights; the rollout model then holds exactly the trainer's weights (checksums on both sides, and
the rollout's own re-export), resharded TP 2 -> 1, 1 -> 2 and PP 2 -> TP 2.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dpo_rl.checkpoint.hf_stream import (
    StreamingLoader,
    WeightsDigest,
    buckets,
    weights_checksum,
)
from dpo_rl.checkpoint.hf_weights import export_hf_weights
from dpo_rl.config.model import ParallelConfig
from dpo_rl.errors import ConfigError
from tests.workers.megatron.common import free_port, tiny_config, tiny_hf_model


# --------------------------------------------------------------------------- pure parts
def test_buckets_keep_groups_whole_and_bounded():
    def group(name, numel):
        return [(f"{name}.{i}", torch.zeros(numel)) for i in range(2)]  # 2 pieces of numel fp32 each

    groups = [group("a", 10), group("b", 10), group("c", 40), group("d", 5)]
    packed = list(buckets(iter(groups), bucket_bytes=200))
    names = [[n for n, _ in b] for b in packed]
    # a+b = 160 bytes fit; c (320 bytes) is larger than a bucket and goes alone; d follows
    assert names == [["a.0", "a.1", "b.0", "b.1"], ["c.0", "c.1"], ["d.0", "d.1"]]
    assert sum(len(b) for b in packed) == 8  # nothing dropped


def test_digest_ignores_arrival_order_and_sees_every_byte():
    state = {"x": torch.arange(6.0), "y": torch.ones(2, 2, dtype=torch.bfloat16)}
    streamed = WeightsDigest()
    streamed.add("y", state["y"])
    streamed.add("x", state["x"])
    assert streamed.hexdigest() == weights_checksum(state)
    changed = dict(state, x=state["x"].clone().index_fill_(0, torch.tensor([5]), 5.000001))
    assert weights_checksum(changed) != weights_checksum(state)


def test_streaming_loader_fills_a_model_and_refuses_an_incomplete_stream(megatron_single_rank):
    from dpo_rl.workers.megatron.model_factory import build_gpt_model

    config = tiny_config("llama")
    hf_state = tiny_hf_model(config, seed=5).state_dict()
    model = build_gpt_model(config, ParallelConfig())
    loader = StreamingLoader(model, config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    names = sorted(hf_state)
    for name in reversed(names):  # any order, q/k/v arriving apart
        loader.add(name, hf_state[name].clone())
    assert loader.finish() == sum(torch.is_tensor(v) for v in model.state_dict().values())
    exported = export_hf_weights(model, config, tp_group=None, pp_group=None, tp_rank=0, tp_size=1, pp_rank=0,
                                 pp_size=1)
    assert weights_checksum(exported) == weights_checksum({k: hf_state[k] for k in exported})

    partial = StreamingLoader(build_gpt_model(config, ParallelConfig()), config, tp_rank=0, tp_size=1, pp_rank=0,
                              pp_size=1)
    for name in names:
        if name != "model.layers.1.self_attn.k_proj.weight":
            partial.add(name, hf_state[name])
    with pytest.raises(ConfigError, match="not filled"):
        partial.finish()
    with pytest.raises(ConfigError, match="is no tensor of the configured model"):  # another architecture
        partial.add("model.layers.99.mlp.up_proj.weight", hf_state["model.layers.0.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- two worlds
def _sync_process(index: int, trainer: ParallelConfig, rollout: ParallelConfig, n_train: int, n_roll: int,
                  ports: tuple[int, int], out_dir: str, bucket_mb: float, mix: float = 1.0,
                  channel: str = "rollout") -> None:
    """Process ``index``: ranks 0..n_train-1 train, the rest roll out (or hold a reference, ``channel`` ref, which
    keeps ``1 - mix`` of its weights); each side its own gloo world."""
    torch.set_num_threads(1)
    from dpo_rl.config.schema import RoleConfig
    from dpo_rl.workers.megatron import hf_interop
    from dpo_rl.workers.megatron.hf_interop import export_from_current_rank
    from dpo_rl.workers.megatron.parallel_state import (
        destroy_distributed,
        init_distributed,
    )
    from dpo_rl.workers.policy import ActorWorker, PolicyWorker

    is_trainer = index < n_train
    rank, world = (index, n_train) if is_trainer else (index - n_train, n_roll)
    parallel = trainer if is_trainer else rollout
    if parallel.device == "cuda":  # one GPU per process (the sync group spans both worlds)
        os.environ["LOCAL_RANK"] = str(index)
    config = tiny_config("llama")
    endpoint = Path(out_dir) / "endpoint.json"
    try:
        init_distributed(parallel, rank, world, master_port=ports[0 if is_trainer else 1])
        common = dict(rank=rank, world_size=world, model_config=config, parallel=parallel, seed=0,
                      role=RoleConfig(model="tiny"), eos_token_ids=(1,), pad_token_id=0)
        worker = ActorWorker(total_iters=1, **common) if is_trainer else PolicyWorker(**common)
        worker.init_distributed("127.0.0.1", 0)
        # the trainer holds trained-looking weights, the rollout others (its own random init)
        if is_trainer:
            hf_interop.load_into_current_rank(worker.model, tiny_hf_model(config, seed=21).state_dict(), config)
            address, port = worker.weight_sync_endpoint(channel)
            if port:
                endpoint.write_text(json.dumps([address, port]))
        while not endpoint.is_file():
            time.sleep(0.05)
        time.sleep(0.1)
        address, port = json.loads(endpoint.read_text())
        held = None
        if is_trainer:
            worker.join_weight_sync_as_sender(address, port, n_roll, channel)
            before = ""
            digest = worker.send_weights(bucket_mb, True, channel)
        else:
            before = worker.checksum()
            held = export_from_current_rank(worker.model, config) if mix != 1.0 else None
            worker.join_weight_sync_as_receiver(address, port, trainer.pipeline_model_parallel_size, channel)
            digest = worker.receive_weights(True, 1, mix)
        result = {"trainer": is_trainer, "output": worker.ranks.is_output_rank, "digest": digest,
                  "before": before, "after": worker.checksum(), "held": held,
                  "state": export_from_current_rank(worker.model, config) if mix != 1.0 else None}
        torch.save({"ok": result}, os.path.join(out_dir, f"{index}.pt"))
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{index}.pt"))
    finally:
        destroy_distributed()


def run_sync(trainer: ParallelConfig, n_train: int, rollout: ParallelConfig, n_roll: int, bucket_mb: float,
             mix: float = 1.0, channel: str = "rollout") -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_sync_process, args=(trainer, rollout, n_train, n_roll, (free_port(), free_port()),
                                                out_dir, bucket_mb, mix, channel),
                           nprocs=n_train + n_roll, start_method="spawn", join=True)
        results = [torch.load(Path(out_dir) / f"{i}.pt", weights_only=False) for i in range(n_train + n_roll)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise AssertionError("a sync process failed:\n" + errors[0])
    return [r["ok"] for r in results]


@pytest.mark.parametrize("trainer,n_train,rollout,n_roll", [
    (ParallelConfig(tensor_model_parallel_size=2), 2, ParallelConfig(), 1),
    (ParallelConfig(), 1, ParallelConfig(tensor_model_parallel_size=2), 2),
    (ParallelConfig(pipeline_model_parallel_size=2), 2, ParallelConfig(tensor_model_parallel_size=2), 2),
], ids=["tp2->tp1", "tp1->tp2", "pp2->tp2"])
def test_rollout_holds_the_trainers_weights_bit_for_bit(trainer, n_train, rollout, n_roll):
    # 0.05 MB buckets: the tiny model streams in dozens of buckets
    results = run_sync(trainer, n_train, rollout, n_roll, bucket_mb=0.05)
    sent = next(r for r in results if r["trainer"] and r["output"])
    rollout_results = [r for r in results if not r["trainer"]]
    trainer_weights = sent["after"]  # the trainer's own full export, gathered over its TP/PP
    assert sent["digest"] == trainer_weights  # what was streamed is the trainer's model
    for r in rollout_results:
        assert r["digest"] == trainer_weights  # every rollout rank received all of it
    loaded = next(r for r in rollout_results if r["output"])
    assert loaded["before"] != trainer_weights  # it did not hold them before
    assert loaded["after"] == trainer_weights  # re-exported from its own TP shards: bit-identical


def test_a_soft_reference_refresh_mixes_the_streamed_weights_into_the_held_ones():
    """TR-DPO's soft refresh over the ``ref`` channel, TP 2 -> 1: the reference ends with 0.6 x the trainer's
    weights + 0.4 x its own, every parameter (mixed in fp32 after the resharding load)."""
    results = run_sync(ParallelConfig(tensor_model_parallel_size=2), 2, ParallelConfig(), 1, bucket_mb=0.05,
                       mix=0.6, channel="ref")
    trainer = next(r for r in results if r["trainer"] and r["output"])
    reference = next(r for r in results if not r["trainer"])
    assert reference["digest"] == trainer["after"]  # the whole trainer model was streamed
    held, mixed, sent = reference["held"], reference["state"], trainer["state"]
    assert set(mixed) == set(sent) == set(held)
    for name in sent:
        expected = 0.6 * sent[name].float() + 0.4 * held[name].float()
        assert torch.allclose(mixed[name].float(), expected, rtol=1e-6, atol=1e-7), name
    assert any(not torch.equal(held[n], sent[n]) for n in sent)  # the two models differed before
