"""Split-actor weight sync on CPU: the old path through the driver vs the direct stream, side by side.

A llama32-1b-shaped model (``configs/rlxf/model/llama32-1b.yaml``, 1.24 B parameters) in bf16 with
random weights, trainer at TP 1 or 2 (Ray workers, gloo), one rollout rank at TP 1, on this machine.

* **driver** (the path before issue 12): the trainer's TP ranks gather the full model onto one
  rank (CPU copy), the driver ``ray.get``s it and passes it to the rollout rank's load call.
* **direct** (now): ``send_weights`` / ``receive_weights``: each pipeline stage's TP rank 0
  streams HF tensors in buckets of ``--bucket-mb`` over a gloo group it shares with the rollout
  ranks; the rollout rank shards and loads each bucket on arrival. The driver starts both calls.

Rounds alternate (driver, direct, driver, ...); the table gives the median, min and max sync time
and the peak resident memory (VmHWM, reset before each round) of the trainer ranks, the rollout
rank and the driver, above what each held before the round. The trainer ranks are built without an
optimizer (only the sync is measured).

    python benchmarks/weight_sync_cpu.py [--rounds 3] [--layouts 1,2] [--bucket-mb 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_rl.dispatch import Dispatch, register  # noqa: E402
from dpo_rl.workers.base import MegatronWorker  # noqa: E402
from dpo_rl.workers.megatron.hf_interop import (  # noqa: E402
    export_from_current_rank,
    load_into_current_rank,
)
from dpo_rl.workers.policy import ActorWorker, PolicyWorker  # noqa: E402


def reset_peak_rss() -> int:
    """Reset this process's VmHWM to its current RSS; returns the RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class MemoryProbe:
    @register(Dispatch.ALL)
    def reset_peak(self) -> int:
        import gc

        gc.collect()
        return reset_peak_rss()

    @register(Dispatch.ALL)
    def peak(self) -> list[int]:
        """(peak, rank) of every rank, gathered so the driver sees the largest."""
        import torch.distributed as dist

        mine = [peak_rss()]
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return [p[0] for p in everyone]


class SyncSender(MemoryProbe, ActorWorker):
    """The actor's training ranks without an optimizer: only the sync is measured."""

    def init_distributed(self, address: str, port: int):
        return MegatronWorker.init_distributed(self, address, port)

    @register(Dispatch.ALL)
    def export_full(self):
        """The old path's first half: the full model on the output rank (CPU), returned to the driver."""
        return export_from_current_rank(self.model, self.model_config)


class SyncReceiver(MemoryProbe, PolicyWorker):
    @register(Dispatch.ALL)
    def load_full(self, state) -> bool:
        """The old path's second half: full HF weights passed in by the driver."""
        load_into_current_rank(self.model, state, self.model_config)
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", default="1,2", help="trainer TP sizes (the rollout rank is TP 1)")
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--model", default="llama32-1b")
    args = parser.parse_args()

    import torch

    from dpo_rl.config.model import ParallelConfig, shipped_model_config
    from dpo_rl.config.schema import RoleConfig
    from dpo_rl.runtime.cluster import start_ray, stop_ray
    from dpo_rl.runtime.resource_pool import RolePool, create_pools, remove_pools
    from dpo_rl.runtime.worker_group import RayWorkerGroup, wait_for

    model = shipped_model_config(args.model)
    role = RoleConfig(model=args.model, num_threads=1)
    rows = []
    for tp in [int(t) for t in args.layouts.split(",")]:
        start_ray(num_cpus=tp + 2)
        pools = [RolePool("actor", [tp]), RolePool("rollout", [1])]
        create_pools(pools, timeout_s=120)
        common = dict(model_config=model, role=role, seed=0, eos_token_ids=(1,), pad_token_id=0)
        t0 = time.perf_counter()
        sender = RayWorkerGroup(SyncSender, pools[0], dict(common, total_iters=1,
                                parallel=ParallelConfig(tp, 1, "bf16", "cpu")))
        receiver = RayWorkerGroup(SyncReceiver, pools[1], dict(common, parallel=ParallelConfig(1, 1, "bf16", "cpu")))
        build_s = time.perf_counter() - t0
        address, port = sender.weight_sync_endpoint()
        for pending in [sender.call_async("join_weight_sync_as_sender", address, port, 1),  # together: a rendezvous
                        receiver.call_async("join_weight_sync_as_receiver", address, port, 1)]:
            wait_for(pending)
        results = {"driver": [], "direct": []}
        for round_ in range(args.rounds):
            for path in ("driver", "direct"):
                base = {"trainer": sender.reset_peak(), "rollout": receiver.reset_peak(), "driver": reset_peak_rss()}
                start = time.perf_counter()
                if path == "driver":
                    state = sender.export_full()
                    receiver.load_full(state)
                    del state
                else:
                    sent, received = (wait_for(p) for p in (
                        sender.call_async("send_weights", args.bucket_mb, False),
                        receiver.call_async("receive_weights", False, 1)))
                seconds = time.perf_counter() - start
                results[path].append({"s": seconds, "trainer": max(sender.peak()) - base["trainer"],
                                      "rollout": max(receiver.peak()) - base["rollout"],
                                      "driver": peak_rss() - base["driver"]})
        check = sender.checksum() == receiver.checksum()
        for path, runs in results.items():
            times = [r["s"] for r in runs]
            rows.append((f"{tp} -> 1", path, statistics.median(times), min(times), max(times),
                         max(r["trainer"] for r in runs), max(r["rollout"] for r in runs),
                         max(r["driver"] for r in runs), check))
        for group in (sender, receiver):
            group.shutdown()
        remove_pools(pools)
        stop_ray()
        print(f"TP {tp}: workers built in {build_s:.0f} s", flush=True)

    gib = 2**30
    bf16_bytes = _parameter_count(model) * 2
    print(f"\nweight sync, {args.model} ({_parameter_count(model) / 1e9:.2f} B params, bf16 = {bf16_bytes / gib:.2f} GiB), "
          f"rollout TP 1, bucket {args.bucket_mb:g} MB, {args.rounds} alternating rounds, torch "
          f"{torch.__version__}, gloo on loopback")
    print("| trainer TP -> rollout | path | sync s (median) | min | max | trainer peak +GiB | rollout peak +GiB "
          "| driver peak +GiB | weights equal after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout, path, med, lo, hi, tr, ro, dr, ok in rows:
        print(f"| {layout} | {path} | {med:.2f} | {lo:.2f} | {hi:.2f} | {tr / gib:.2f} | {ro / gib:.2f} | "
              f"{dr / gib:.2f} | {ok} |")
    by = {(r[0], r[1]): r[2] for r in rows}
    for layout in sorted({r[0] for r in rows}):
        print(f"{layout}: direct / driver time = {by[(layout, 'direct')] / by[(layout, 'driver')]:.2f}")


def _parameter_count(model) -> int:
    h, f, v, layers = model.hidden_size, model.ffn_hidden_size, model.vocab_size, model.num_layers
    kv = model.num_query_groups * model.head_dim
    per_layer = h * (model.num_attention_heads * model.head_dim) * 2 + 2 * h * kv + 3 * h * f + 2 * h
    return layers * per_layer + v * h * (1 if model.tie_word_embeddings else 2) + h


if __name__ == "__main__":
    main()
