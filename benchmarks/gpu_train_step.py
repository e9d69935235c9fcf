"""bf16 train-step MFU of a llama32-1b-shaped actor on one CUDA device (random weights, SFT loss).

Megatron-core's DDP + mixed-precision optimizer (fp32 main parameters), with and without the
distributed optimizer (with DP = 1 it only changes the buffer layout), alternating rounds; MFU
counts 6 x parameters x tokens per step (no attention FLOPs) against ``--peak-tflops`` (the
device's dense bf16 peak; H200: 989).

    python benchmarks/gpu_train_step.py [--steps 10] [--rounds 2] [--seq 2048] [--batch 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    import torch

    from dpo_rl.batch import Batch
    from dpo_rl.config.model import ParallelConfig, shipped_model_config
    from dpo_rl.config.schema import RoleConfig
    from dpo_rl.workers.megatron.parallel_state import free_port, init_distributed
    from dpo_rl.workers.policy import ActorWorker

    parallel = ParallelConfig(device="cuda", params_dtype="bf16")
    init_distributed(parallel, 0, 1, master_port=free_port("127.0.0.1"))
    model = shipped_model_config("llama32-1b")
    ids = torch.randint(0, model.vocab_size, (args.batch, args.seq))
    rows = Batch({"sequences": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones_like(ids),
                  "minibatch": torch.zeros(args.batch, dtype=torch.long),
                  "weight": torch.full((args.batch,), 1.0 / ids.numel())})
    results = {}
    workers = {}
    for distributed in (False, True):
        role = RoleConfig(model="llama32-1b", lr=5e-7, micro_batch_size=1, use_distributed_optimizer=distributed)
        worker = ActorWorker(rank=0, world_size=1, model_config=model, parallel=parallel, role=role, seed=0,
                             objective="sft", total_iters=10**6, eos_token_ids=(1,), pad_token_id=0)
        worker.init_distributed("127.0.0.1", 0)
        worker.update(rows)  # warm-up (allocates the Adam state)
        workers[distributed] = worker
    params = sum(p.numel() for p in workers[False].model.parameters())
    for _ in range(args.rounds):
        for distributed, worker in workers.items():
            for _ in range(args.steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                worker.update(rows)
                torch.cuda.synchronize()
                results.setdefault(distributed, []).append(time.perf_counter() - start)
    print(f"llama32-1b ({params / 1e9:.2f} B params), bf16 + fp32 main params, {args.batch} x {args.seq} tokens per "
          f"step, micro-batch 1, {torch.cuda.get_device_name()}, peak {args.peak_tflops:g} TFLOP/s")
    print("| distributed optimizer | step s (median) | min | max | MFU |")
    print("|---|---|---|---|---|")
    for distributed, times in results.items():
        median = statistics.median(times)
        mfu = 6 * params * ids.numel() / median / (args.peak_tflops * 1e12)
        print(f"| {distributed} | {median:.3f} | {min(times):.3f} | {max(times):.3f} | {mfu:.1%} |")


if __name__ == "__main__":
    main()
