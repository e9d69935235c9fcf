"""LoRA vs full fine-tuning: offline-DPO step time, peak memory and trainable parameters, side by side.

Both arms run this project's ``dpo`` stage in-process (``use_ray=False``: actor and reference in one
process, so its peak memory is the whole run's) on the embedded tiny world's preference pairs, each
round a fresh subprocess, alternating full / LoRA so machine noise hits both. The model is the tiny
architecture widened to ~53M parameters (hidden 640, 12 layers, 10 heads, 2 KV groups, FFN 1728),
random-initialised from the seed (policy and reference alike); sigmoid loss, beta 0.1, fp32 on CPU,
1 torch thread, 16 pairs per step in micro-batches of 4, AdamW, no activation recomputation.

* full: every weight trains; the reference is a second copy of the model (``ref`` group);
* LoRA: rank 8, alpha 16, every linear layer (``lora.enabled``); the reference is the actor's base
  with the adapters off, so no second copy exists.

    python benchmarks/lora_cpu.py [--steps 6] [--warmup 1] [--rounds 3]
    # GPU (when lent): the llama32-1b shape in bf16 (scripts/ready, not run here)
    python benchmarks/lora_cpu.py --model llama32-1b --device cuda --dtype bf16 --steps 10 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ART = ROOT / "examples/tiny_world/artifacts"
#: The tiny architecture widened to about 53M parameters.
WIDE_TINY = {"hidden_size": 640, "num_layers": 12, "num_attention_heads": 10, "num_query_groups": 2,
             "ffn_hidden_size": 1728}


def arm_overrides(arm: str, model: str, device: str, dtype: str, steps: int, out: Path) -> list[str]:
    shape = [f"model.tiny.{k}={v}" for k, v in WIDE_TINY.items()] if model == "tiny" else []
    placement = [] if device == "cpu" else [f"training.device={device}", "ray.device_resource=GPU"]
    lora = ["training.lora.enabled=true", "training.lora.rank=8", "training.lora.alpha=16"] if arm == "lora" else []
    return [
        *shape, *placement, *lora,
        f"training.train_iters={steps}", f"training.output_dir={out}", "training.eval_interval=0",
        "training.log_interval=1000", "training.plot=false", "data.eval_path=null", "data.eval_fraction=0",
        "training.save_interval=0", "training.export_hf=false", "training.lr_warmup_iters=0", "resource_pool.actor_rollout=[1]",
        "training.global_batch_size=16", "actor_rollout_ref.actor_rollout.micro_batch_size=4",
        "actor_rollout_ref.ref.micro_batch_size=4", f"training.params_dtype={dtype}",
        f"training.tokenizer_name_or_path={ART / 'tokenizer'}", f"data.train_path={ART / 'data' / 'pairs_train'}",
        f"training.model={model}", f"actor_rollout_ref.actor_rollout.model={model}",
        f"actor_rollout_ref.ref.model={model}", "actor_rollout_ref.actor_rollout.load=null",
        "actor_rollout_ref.ref.load=null",
    ]


def run_arm(arm: str, model: str, device: str, dtype: str, steps: int) -> dict:
    """One arm in this (fresh) process: its step times, peak memory and parameter counts."""
    import resource

    import torch

    from dpo_rl.config.compose import compose
    from dpo_rl.trainer import offline_stages
    from dpo_rl.trainer.run import run

    torch.set_num_threads(1)
    counts = {}
    real_create = offline_stages.GroupFactory.create

    def create(self, name, *args):  # the trained group's parameter counts, read as it is created
        group = real_create(self, name, *args)
        if name == "trained":
            counts.update(group.trainable_parameters())
        return group

    offline_stages.GroupFactory.create = create
    config = "dpo_trainer_tiny" if model == "tiny" else f"dpo_trainer_{model.replace('-', '_')}"
    with tempfile.TemporaryDirectory() as out:
        run(compose(config, arm_overrides(arm, model, device, dtype, steps, Path(out))), use_ray=False)
        times = [json.loads(line)["timing/step"] for line in (Path(out) / "timing.jsonl").read_text().splitlines()]
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"times": times, "peak_bytes": peak, **counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="tiny", help="tiny (widened to ~53M) or a shipped model name, e.g. llama32-1b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:  # a child process: one arm, its result as JSON on the last line
        print(json.dumps(run_arm(a.arm, a.model, a.device, a.dtype, a.steps + a.warmup)))
        return
    if not (ART / "data" / "pairs_train_meta.json").is_file():
        from examples.tiny_world.build import build

        build()
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(a.rounds):
        for arm in results:
            done = subprocess.run([sys.executable, __file__, "--arm", arm, "--steps", str(a.steps), "--warmup",
                                   str(a.warmup), "--model", a.model, "--device", a.device, "--dtype", a.dtype],
                                  capture_output=True, text=True, check=True)
            results[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"offline DPO, {a.model}{' widened to ~53M' if a.model == 'tiny' else ''}, {a.dtype} on {a.device}, "
          f"16 pairs/step (micro-batch 4), 1 torch thread; {a.rounds} alternating rounds x {a.steps} timed steps "
          f"after {a.warmup} warm-up; LoRA rank 8, alpha 16, all linear layers; full = every weight + a reference copy")
    print("| | trainable params | optimizer params | step s (median [min, max]) | peak memory GB (median) |")
    print("|---|---|---|---|---|")
    summary = {}
    for arm, runs in results.items():
        times = [t for r in runs for t in r["times"][a.warmup:]]
        peak = statistics.median(r["peak_bytes"] for r in runs) / 1e9
        summary[arm] = (statistics.median(times), peak)
        print(f"| {arm} | {runs[0]['trainable']:,} of {runs[0]['total']:,} | {runs[0]['optimized']:,} | "
              f"{statistics.median(times):.3f} [{min(times):.3f}, {max(times):.3f}] | {peak:.2f} |")
    (t_full, m_full), (t_lora, m_lora) = summary["full"], summary["lora"]
    print(f"LoRA / full: step time {t_lora / t_full:.2f}, peak memory {m_lora / m_full:.2f}")


if __name__ == "__main__":
    main()
