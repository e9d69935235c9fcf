"""Online-DPO step time on CPU: this project's three Ray roles vs TRL's OnlineDPOTrainer.

Both run on the embedded tiny world (built if missing) with the same SFT actor (exported to
HF format), reward model, prompts, batch (16 prompts x 2 completions), 32 max new tokens,
temperature 0.9, beta 0.1 and missing-EOS penalty 1.0, in alternating rounds in this run (ours, then
TRL, ``--rounds`` times). Prints per-phase medians (generate, reward, reference, update, sync) for
ours, orchestration overhead (step wall time minus the workers' own compute), the step medians with
min/max of every run kind, and the ratio.

TRL (``pip install -e ".[bench]"``) is configured as a speed-minded user would: fp32 (``bf16=False``:
CPU), **no gradient checkpointing** (its CPU default is on, which drops the KV cache in generation
and recomputes activations in the backward pass: nobody who times a 1M-parameter model runs it that
way), ``--trl-threads`` torch threads (default 1, as each of our workers has), in this process.
``--engines`` runs ours once per entry in each round: a rollout engine (``megatron``, ``vllm``), optionally
with Hydra overrides after colons, to measure one lever side by side (``megatron:training.pack_sequences=false``).

    python benchmarks/online_dpo_cpu.py [--steps 30] [--warmup 5] [--rounds 2] [--engines megatron,vllm]
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

PHASES = ("generate", "reward", "reference", "update", "sync")
#: TRL as a speed-minded user runs it on CPU (its defaults turn gradient checkpointing on); printed with the table.
TRL_FAIR_SETTINGS = {"gradient_checkpointing": False, "bf16": False}


def run_ours(steps: int, out: Path, variant: str = "megatron") -> list[dict]:
    """Our run's timing records; ``variant`` is a rollout engine, optionally followed by ``:override`` entries."""
    from dpo_rl.config.compose import compose
    from dpo_rl.trainer.run import run

    engine, *overrides = variant.split(":")

    art = "examples/tiny_world/artifacts"
    cfg = compose("online_dpo_trainer_tiny", [
        f"training.train_iters={steps}", f"training.output_dir={out}", "training.eval_interval=0",
        "training.log_interval=1000", "+training.plot=false", "data.eval_path=null",
        f"training.tokenizer_name_or_path={ROOT / art / 'tokenizer'}",
        f"actor_rollout_ref.actor_rollout.load={ROOT / art / 'sft'}", f"actor_rollout_ref.ref.load={ROOT / art / 'sft'}",
        f"reward.load={ROOT / art / 'rm'}", f"data.train_path={ROOT / art / 'prompts_train.jsonl'}",
        f"actor_rollout_ref.actor_rollout.rollout_engine={engine}", *overrides,
    ])
    run(cfg)
    return [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]


def run_trl(steps: int, threads: int) -> list[dict[str, float]]:
    """TRL's steps: ``step`` seconds and its phases (``generate``: the policy's ``generate``; ``reference`` and
    ``reward``: those models' forwards; ``update``: the rest of the step)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from benchmarks.trl_timing import PhaseTimes, step_timer
    from dpo_rl.data.prompts import encode_prompt

    torch.set_num_threads(threads)
    art = ROOT / "examples/tiny_world/artifacts"
    tokenizer = AutoTokenizer.from_pretrained(art / "tokenizer")
    tokenizer.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in (art / "prompts_train.jsonl").read_text().splitlines()]
    # The same token ids our loader gives (chat template), passed as text TRL re-tokenizes.
    texts = [tokenizer.decode(encode_prompt(tokenizer, p)) for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(art / "sft", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(art / "sft", dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(art / "rm", dtype=torch.float32)
    for m in (model, ref):
        m.generation_config.eos_token_id = tokenizer.eos_token_id
        m.generation_config.pad_token_id = tokenizer.pad_token_id
    step_times: list[float] = []
    phases = PhaseTimes()
    phases.wrap(model, "generate", "generate")
    phases.wrap(ref, "forward", "reference")
    phases.wrap(rm, "forward", "reward")

    with tempfile.TemporaryDirectory() as out:
        args = OnlineDPOConfig(
            output_dir=out, use_cpu=True, per_device_train_batch_size=16, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=5e-5, beta=[0.1], max_new_tokens=32, temperature=0.9,
            missing_eos_penalty=1.0, logging_steps=1000, save_strategy="no", report_to=[], seed=1234,
            dataloader_num_workers=0, disable_tqdm=True, **TRL_FAIR_SETTINGS,
        )
        trainer = OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=rm, args=args,
                                   train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                   reward_processing_classes=tokenizer, callbacks=[step_timer(step_times, phases)])
        trainer.train()
    return phases.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the medians")
    parser.add_argument("--trl-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and TRL")
    parser.add_argument("--engines", default="megatron", help="comma-separated rollout engines of ours to run")
    args = parser.parse_args()

    from examples.tiny_world.build import build

    build()
    timings: dict[str, list[dict]] = {engine: [] for engine in args.engines.split(",")}
    trl: list[dict[str, float]] = []
    for _ in range(args.rounds):  # alternating, so a machine that gets busier slows both sides alike
        for engine in timings:
            with tempfile.TemporaryDirectory() as out:
                timings[engine] += run_ours(args.steps, Path(out), engine)[args.warmup:]
        trl += run_trl(args.steps, args.trl_threads)[args.warmup:]
    trl_steps = [t["step"] for t in trl]
    trl_step = statistics.median(trl_steps)

    print(f"\nonline DPO step on CPU, tiny world, 16 prompts x 2 completions, 32 new tokens; medians of "
          f"{args.rounds} alternating rounds x {args.steps - args.warmup} steps after {args.warmup} warm-up each\n")
    print("| phase (median s)      | " + " | ".join(f"{'ours ' + e:>14}" for e in timings) + " |            TRL |")
    print("|-----------------------|" + "|".join("-" * 16 for _ in timings) + "|----------------|")

    def med(timing, key):
        values = [t[key] for t in timing if key in t]
        return statistics.median(values) if values else None

    for phase in (*PHASES, "orchestration", "step"):
        cells = [med(timing, f"timing/{phase}") for timing in timings.values()] + [med(trl, phase)]
        print(f"| {phase:<21} | " + " | ".join(f"{'-' if v is None else f'{v:.3f}':>14}" for v in cells) + " |")
    print("(TRL's update is its step less the timed generate, reference and reward calls: the policy's forward,\n"
          " backward and optimizer step with the trainer's own bookkeeping; ours lists orchestration apart)")
    print("\n| step time            | min s | median s | max s |\n|----------------------|-------|----------|-------|")
    steps_of = {f"ours ({e})": [t["timing/step"] for t in timing] for e, timing in timings.items()}
    for name, values in {**steps_of, "TRL OnlineDPOTrainer": trl_steps}.items():
        print(f"| {name:<20} | {min(values):.3f} | {statistics.median(values):>8.3f} | {max(values):.3f} |")
    print(f"\nTRL OnlineDPOTrainer: {args.trl_threads} torch thread(s), HF generate with its KV cache, "
          f"{', '.join(f'{k}={v}' for k, v in TRL_FAIR_SETTINGS.items())}")
    for engine, timing in timings.items():
        overhead = statistics.median(t["timing/orchestration"] / t["timing/step"] for t in timing)
        ratio = med(timing, "timing/step") / trl_step
        print(f"ours ({engine}) / TRL step time: {ratio:.2f} (goal <= 1.0): {'MET' if ratio <= 1.0 else 'MISSED'}; "
              f"orchestration {overhead:.1%} of the step")


if __name__ == "__main__":
    main()
