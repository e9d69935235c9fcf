"""Online-DPO step time on CPU: this project's three Ray roles vs TRL's OnlineDPOTrainer.

Both run on the embedded tiny world (built if missing) with the same SFT actor (exported to
HF format), reward model, prompts, batch (16 prompts x 2 completions), 32 max new tokens,
temperature 0.9, beta 0.1 and missing-EOS penalty 1.0, in alternating rounds in this run (ours, then
TRL, ``--rounds`` times). Prints per-phase medians (generate, reward, reference, update, sync) for
ours and TRL, orchestration overhead (step wall time minus the workers' own compute), the step
medians with min/max of every run kind, and the ratios.

TRL (``pip install -e ".[bench]"``) is configured as a speed-minded user would: fp32 (``bf16=False``:
CPU), **no gradient checkpointing** (its CPU default is on, which drops the KV cache in generation
and recomputes activations in the backward pass: nobody who times a 1M-parameter model runs it that
way), in this process, with each of ``--trl-threads`` torch thread counts (default ``1,2``: one
thread, as each of our workers has, and both cores, as our three workers use between them).
``--engines`` runs ours once per entry in each round: a rollout engine (``megatron``, ``vllm``), optionally
with Hydra overrides after colons, to measure one lever side by side (``megatron:training.pack_sequences=false``).

``--scaling`` instead times ours and TRL (one thread) at 16, 32, 64 and 128 prompts per step (32 new
tokens) and at 64 and 128 new tokens (16 prompts), one micro-batch per phase on both sides; those runs
sample at ``--scaling-temperature`` (default 5.0) so responses run towards the cap (the trained tiny
policy stops after ~8-18 tokens at 0.9, and still at 2.0, which would leave a longer cap unused); the
table gives the mean response length.

    python benchmarks/online_dpo_cpu.py [--steps 30] [--warmup 5] [--rounds 2] [--engines megatron,vllm]
    python benchmarks/online_dpo_cpu.py --scaling [--steps 6] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generate", "reward", "reference", "update", "sync")


@dataclass(frozen=True)
class Shape:
    """What one online step samples: the tiny recipe's 16 prompts x 2 responses of <= 32 tokens at 0.9."""

    prompts: int = 16
    max_new_tokens: int = 32
    temperature: float = 0.9

    @property
    def label(self) -> str:
        return f"{self.prompts} prompts x 2, <= {self.max_new_tokens} tokens, T {self.temperature}"
#: TRL as a speed-minded user runs it on CPU (its defaults turn gradient checkpointing on); printed with the table.
TRL_FAIR_SETTINGS = {"gradient_checkpointing": False, "bf16": False}


def run_ours(steps: int, out: Path, variant: str = "megatron", shape: Shape = Shape()) -> list[dict]:
    """Our run's timing records (with ``response_length/mean`` from its metrics); ``variant`` is a rollout
    engine, optionally followed by ``:override`` entries."""
    from dpo_rl.config.compose import compose
    from dpo_rl.trainer.run import run

    engine, *overrides = variant.split(":")
    if shape != Shape():  # one generate call and one micro-batch per phase, as TRL runs the batch
        a, n = "actor_rollout_ref.actor_rollout", shape.prompts
        overrides = [f"training.global_batch_size={n}", f"{a}.num_samples_per_step={n}", f"{a}.ppo_mini_batch_size={n}",
                     f"{a}.micro_batch_size={n}", f"actor_rollout_ref.ref.micro_batch_size={2 * n}",
                     f"reward.micro_batch_size={2 * n}", f"{a}.max_new_tokens={shape.max_new_tokens}",
                     f"{a}.temperature={shape.temperature}", *overrides]
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
    lengths = [json.loads(line)["response_length/mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    timing = [json.loads(line) for line in (out / "timing.jsonl").read_text().splitlines()]
    return [{**t, "response_length": length} for t, length in zip(timing, lengths)]


def run_trl(steps: int, threads: int, shape: Shape = Shape()) -> list[dict[str, float]]:
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
    phases, lengths = PhaseTimes(), []
    sample = model.generate

    def generate_and_count(*args, **kwargs):  # mean response length (tokens up to EOS; padding after it)
        out = sample(*args, **kwargs)
        width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        lengths.append(float((out[:, width:] != tokenizer.pad_token_id).sum(-1).float().mean()))
        return out

    model.generate = generate_and_count
    phases.wrap(model, "generate", "generate")
    phases.wrap(ref, "forward", "reference")
    phases.wrap(rm, "forward", "reward")

    with tempfile.TemporaryDirectory() as out:
        args = OnlineDPOConfig(
            output_dir=out, use_cpu=True, per_device_train_batch_size=shape.prompts, gradient_accumulation_steps=1,
            max_steps=steps, learning_rate=5e-5, beta=[0.1], max_new_tokens=shape.max_new_tokens,
            temperature=shape.temperature,
            missing_eos_penalty=1.0, logging_steps=1000, save_strategy="no", report_to=[], seed=1234,
            dataloader_num_workers=0, disable_tqdm=True, **TRL_FAIR_SETTINGS,
        )
        trainer = OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=rm, args=args,
                                   train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                   reward_processing_classes=tokenizer, callbacks=[step_timer(step_times, phases)])
        trainer.train()
    return [{**step, "response_length": length} for step, length in zip(phases.steps, lengths)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of the medians")
    parser.add_argument("--trl-threads", default="1,2", help="comma-separated torch thread counts for TRL runs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and TRL")
    parser.add_argument("--engines", default="megatron", help="comma-separated rollout engines of ours to run")
    parser.add_argument("--scaling", action="store_true", help="time the prompts-per-step and length grid instead")
    parser.add_argument("--scaling-temperature", type=float, default=5.0,
                        help="sampling temperature of the --scaling runs (high: responses run towards the cap)")
    return parser.parse_args()


def median_of(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


def compare(args: argparse.Namespace) -> None:
    """Ours (each ``--engines`` entry) and TRL (each thread count) in alternating rounds; the phase and step tables."""
    ours: dict[str, list[dict]] = {variant: [] for variant in args.engines.split(",")}
    trl: dict[str, list[dict]] = {f"TRL {t} thr": [] for t in args.trl_threads.split(",")}
    for _ in range(args.rounds):  # alternating, so a machine that gets busier slows every side alike
        for variant in ours:
            with tempfile.TemporaryDirectory() as out:
                ours[variant] += run_ours(args.steps, Path(out), variant)[args.warmup:]
        for name in trl:
            trl[name] += run_trl(args.steps, int(name.split()[1]))[args.warmup:]
    print(f"\nonline DPO step on CPU, tiny world, {Shape().label}; medians of {args.rounds} alternating rounds x "
          f"{args.steps - args.warmup} steps after {args.warmup} warm-up each\n")
    columns = {**{f"ours {v}": [{k.removeprefix('timing/'): x for k, x in t.items()} for t in timing]
                  for v, timing in ours.items()}, **trl}
    width = max(14, *(len(name) for name in columns))
    print(f"| {'phase (median s)':<21} | " + " | ".join(f"{name:>{width}}" for name in columns) + " |")
    print("|-----------------------|" + "|".join("-" * (width + 2) for _ in columns) + "|")
    for phase in (*PHASES, "orchestration", "step"):
        cells = [median_of(records, phase) for records in columns.values()]
        print(f"| {phase:<21} | " + " | ".join(f"{'-' if v is None else f'{v:.3f}':>{width}}" for v in cells) + " |")
    print("(ours: generate and update are the driver's wall time for them, reward and reference the workers' own\n"
          " compute; reward and reference run beside the update's forward (two responses per prompt: the update\n"
          " starts before the scores), so their compute shares the cores with it. TRL's update is its step less the timed\n"
          " generate, reference and reward calls: the policy's forward, backward and optimizer step with the trainer's\n"
          " own bookkeeping, its prompt tokenization included)")
    print(f"\n| {'step time':<{width}} | min s | median s | max s |\n|{'-' * (width + 2)}|-------|----------|-------|")
    for name, records in columns.items():
        values = [r["step"] for r in records]
        print(f"| {name:<{width}} | {min(values):.3f} | {statistics.median(values):>8.3f} | {max(values):.3f} |")
    print(f"\nTRL OnlineDPOTrainer: HF generate with its KV cache, "
          f"{', '.join(f'{k}={v}' for k, v in TRL_FAIR_SETTINGS.items())}; ours: 3 Ray workers, 1 torch thread each")
    for variant, timing in ours.items():
        step = median_of(timing, "timing/step")
        overhead = statistics.median(t["timing/orchestration"] / t["timing/step"] for t in timing)
        ratios = ", ".join(f"{step / median_of(records, 'step'):.2f} vs {name}" for name, records in trl.items())
        print(f"ours ({variant}) / TRL step time: {ratios} (goal <= 1.0); orchestration {overhead:.1%} of the step")


def scaling(args: argparse.Namespace) -> None:
    """Step time of ours and TRL (one thread) over prompts per step and the response-length cap."""
    t = args.scaling_temperature
    shapes = [Shape(prompts=n, temperature=t) for n in (16, 32, 64, 128)] + [
        Shape(max_new_tokens=n, temperature=t) for n in (64, 128)]
    print(f"\n| {'prompts x 2, cap':<17} | resp. len ours / TRL | ours s | TRL s | ours/TRL | ours s per 1k tokens |")
    print(f"|{'-' * 19}|----------------------|--------|-------|----------|----------------------|")
    for shape in shapes:
        with tempfile.TemporaryDirectory() as out:
            ours = run_ours(args.steps, Path(out), "megatron", shape)[args.warmup:]
        trl = run_trl(args.steps, 1, shape)[args.warmup:]
        ours_step, trl_step = median_of(ours, "timing/step"), median_of(trl, "step")
        length = median_of(ours, "response_length")
        tokens = 2 * shape.prompts * length
        print(f"| {f'{shape.prompts} x 2, {shape.max_new_tokens}':<17} | {length:>8.1f} / {median_of(trl, 'response_length'):<9.1f} "
              f"| {ours_step:>6.3f} | {trl_step:>5.3f} | {ours_step / trl_step:>8.2f} | {1000 * ours_step / tokens:>20.3f} |")
    print(f"\n(temperature {t}; medians of {args.steps - args.warmup} steps after {args.warmup}; TRL one thread, "
          f"{', '.join(f'{k}={v}' for k, v in TRL_FAIR_SETTINGS.items())}; one micro-batch per phase on both sides)")


def main() -> None:
    args = parse_args()
    from examples.tiny_world.build import build

    build()
    scaling(args) if args.scaling else compare(args)


if __name__ == "__main__":
    main()
