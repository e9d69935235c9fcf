"""Offline-DPO step time on CPU: this project's dpo stage vs TRL's DPOTrainer, side by side.

All runs use the embedded tiny world (built if missing): the same SFT actor as policy and
reference (HF safetensors), the same preference pairs (``raw/pairs_train.jsonl``, 16 pairs per
step), sigmoid loss, beta 0.1, lr 5e-5, fp32, one optimizer step per batch. Rounds alternate
(ours on Ray, ours in-process, TRL) so machine noise hits all of them; the table gives
medians over every timed step after warm-up and the ratios to TRL.

* ours on Ray: ``configs/rlxf/dpo_trainer_tiny.yaml``: actor and reference are two Ray
  workers with 1 torch thread each, driven over RPC;
* ours in-process: the same workers without Ray (1 thread), i.e. the model path alone;
* TRL (``pip install -e ".[bench]"``): ``trl.DPOTrainer`` with ``use_cpu=True``, 1 torch thread, fp32 and no
  gradient checkpointing (set explicitly: a speed-minded user's settings for a model that fits).

    python benchmarks/offline_dpo_cpu.py [--steps 30] [--warmup 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ART = ROOT / "examples/tiny_world/artifacts"


def run_ours(steps: int, out: Path, use_ray: bool) -> list[float]:
    import torch

    from dpo_rl.config.compose import compose
    from dpo_rl.trainer.run import run

    torch.set_num_threads(1)
    cfg = compose("dpo_trainer_tiny", [
        f"training.train_iters={steps}", f"training.output_dir={out}", "training.eval_interval=0",
        "training.log_interval=1000", "+training.plot=false", "data.eval_path=null",
        f"training.tokenizer_name_or_path={ART / 'tokenizer'}", f"actor_rollout_ref.actor_rollout.load={ART / 'sft'}",
        f"data.train_path={ART / 'data' / 'pairs_train'}",
    ])
    run(cfg, use_ray=use_ray)
    return [json.loads(line)["timing/step"] for line in (out / "timing.jsonl").read_text().splitlines()]


def run_trl(steps: int) -> tuple[list[float], float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from benchmarks.trl_timing import step_timer
    from dpo_rl.data.prompts import encode_prompt

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(ART / "tokenizer")
    rows = [json.loads(line) for line in (ART / "raw" / "pairs_train.jsonl").read_text().splitlines()]
    rows = [{"prompt": tokenizer.decode(encode_prompt(tokenizer, r["instruction"])), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in rows[: steps * 16]]
    model = AutoModelForCausalLM.from_pretrained(ART / "sft", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ART / "sft", dtype=torch.float32)
    step_times: list[float] = []

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                         max_steps=steps, learning_rate=5e-5, lr_scheduler_type="constant", beta=0.1,
                         loss_type=["sigmoid"], max_length=None, logging_steps=1000, save_strategy="no",
                         report_to=[], seed=1234, dataloader_num_workers=0, disable_tqdm=True, bf16=False,
                         gradient_checkpointing=False, max_grad_norm=1.0)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[step_timer(step_times)])
        lengths = [len(trainer.train_dataset[i]["prompt_ids"]) + len(trainer.train_dataset[i]["chosen_ids"])
                   for i in range(16)]
        trainer.train()
    return step_times, sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="leading steps of each run left out of the medians")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from examples.tiny_world.build import build

    build()
    times: dict[str, list[float]] = {"ours on Ray (actor + ref workers)": [], "ours in-process": [],
                                     "TRL DPOTrainer": []}
    tokens = 0.0
    for _ in range(args.rounds):
        for name, use_ray in (("ours on Ray (actor + ref workers)", True), ("ours in-process", False)):
            with tempfile.TemporaryDirectory() as out:
                times[name] += run_ours(args.steps, Path(out), use_ray)[args.warmup:]
        trl_steps, tokens = run_trl(args.steps)
        times["TRL DPOTrainer"] += trl_steps[args.warmup:]
    trl = statistics.median(times["TRL DPOTrainer"])
    print(f"\noffline DPO step on CPU, tiny world, 16 pairs per step (chosen sequences ~{tokens:.0f} tokens), "
          f"sigmoid loss, 1 torch thread per process; medians of {len(times['TRL DPOTrainer'])} steps per row "
          f"({args.rounds} alternating rounds x {args.steps - args.warmup} steps)\n")
    print("| run                               | median step s | vs TRL |")
    print("|-----------------------------------|---------------|--------|")
    for name, values in times.items():
        value = statistics.median(values)
        print(f"| {name:<33} | {value:>13.4f} | {value / trl:>6.2f} |")


if __name__ == "__main__":
    main()
