"""Online-DPO step on one GPU: ours (three roles in one process on the device) vs TRL's OnlineDPOTrainer.

Both sides start from the same seeded random weights of a shipped model shape (default ``llama32-1b``: actor and
reference as ``LlamaForCausalLM``, reward as ``LlamaForSequenceClassification``, safetensors written once) and see
the same prompts: random words of a word-level tokenizer as large as the model's vocabulary, so every sampled id
decodes to one word and TRL's re-tokenization for the reward model gives the ids back. Random weights rarely sample
EOS, so responses run to ``--max-new-tokens`` on both sides alike.

* **ours**: ``configs/rlxf/online_dpo_trainer_llama32_1b.yaml`` run in-process (actor with the rollout engine
  colocated, reference and reward on the same device), ``--dtype`` parameters with fp32 main parameters in the
  optimizer, rollout ``--engine`` ``vllm`` (``vllm_kv_cache_mb`` = ``--kv-cache-mb``) or ``megatron``;
* **TRL**: ``OnlineDPOTrainer`` as a speed-minded user runs it: policy weights in fp32 with ``bf16=True``
  autocast (the usual mixed precision, fp32 master weights as ours), reference and reward in ``--dtype``,
  ``gradient_checkpointing=False``, generation with vLLM in colocate mode (``--trl-generation vllm``,
  ``vllm_gpu_memory_utilization`` = ``--trl-vllm-memory``) or HF ``generate`` (``hf``).

Same batch on both sides: ``--prompts`` prompts x 2 responses per optimizer step, ``--micro-batch`` prompts (pairs)
per forward/backward (TRL: ``per_device_train_batch_size``, with gradient accumulation to ``--prompts``). Each side
runs in its own process (a clean device), ``--rounds`` alternating rounds of ``--steps`` steps, the first
``--warmup`` of each left out of the medians. Printed: per-phase medians, step min/median/max, ours / TRL, the
update's model FLOP utilisation (6 x parameters x tokens per update against ``--peak-tflops``) and decode tokens/s
as a fraction of the HBM bound (each decode step reads the weights once plus the KV cache so far, at
``--hbm-tbps``).

The device machine needs, beyond PyTorch and transformers: megatron-core, hydra-core, omegaconf, trl, datasets
(and vllm for the vLLM rows). A smoke run of the same code on CPU, in a minute:

    python benchmarks/gpu_online_dpo.py --device cpu --model tiny --dtype fp32 --prompts 4 --micro-batch 2 \\
        --prompt-tokens 16 --max-new-tokens 8 --steps 3 --warmup 1 --engine megatron --trl-generation hf
    python benchmarks/gpu_online_dpo.py                         # H100: llama32-1b, bf16, vLLM on both sides
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generate", "reward", "reference", "update", "sync")
SPECIALS = ("<pad>", "</s>", "<s>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %}{% endfor %}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="llama32-1b", help="a shipped model shape (configs/rlxf/model/<name>.yaml)")
    add("--device", default="cuda")
    add("--dtype", default="bf16", choices=("bf16", "fp32"))
    add("--prompts", type=int, default=64, help="prompts per optimizer step (2 responses each)")
    add("--micro-batch", type=int, default=16, help="prompts (pairs) per forward/backward on both sides")
    add("--prompt-tokens", type=int, default=128)
    add("--max-new-tokens", type=int, default=256)
    add("--steps", type=int, default=8)
    add("--warmup", type=int, default=2)
    add("--rounds", type=int, default=1)
    add("--engine", default="vllm", choices=("vllm", "megatron"), help="our rollout engine")
    add("--kv-cache-mb", type=float, default=16384.0, help="our vLLM engine's KV cache")
    add("--trl-generation", default="vllm", choices=("vllm", "hf"))
    add("--trl-vllm-memory", type=float, default=0.3, help="TRL's vllm_gpu_memory_utilization")
    add("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100/H200 SXM: 989)")
    add("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth (H100 SXM: 3.35, H200: 4.8)")
    add("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: run one side in this process
    add("--world", help=argparse.SUPPRESS)
    add("--records", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the shared inputs
def write_world(args: argparse.Namespace, out: Path) -> None:
    """Tokenizer, prompts (JSONL), seeded random HF weights for actor and reward, and the actor's parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    from dpo_rl.checkpoint.hf_files import hf_transformers_config
    from dpo_rl.config.model import shipped_model_config
    from dpo_rl.workers.megatron.model_factory import TORCH_DTYPES

    config = shipped_model_config(args.model)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), config.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out / "tokenizer")
    rng = random.Random(1234)
    words = [" ".join(f"w{rng.randrange(len(SPECIALS), config.vocab_size)}" for _ in range(args.prompt_tokens - 1))
             for _ in range(args.prompts * (args.steps + 1))]
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    torch.manual_seed(1234)
    for name, reward, auto in (("actor", False, AutoModelForCausalLM), ("rm", True, AutoModelForSequenceClassification)):
        model = auto.from_config(hf_transformers_config(config, reward=reward, **ids), dtype=TORCH_DTYPES[args.dtype])
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        if name == "actor":
            (out / "parameters").write_text(str(sum(p.numel() for p in model.parameters())))
        del model


# --------------------------------------------------------------------------- one side, in its own process
def run_ours(args: argparse.Namespace, world: Path) -> list[dict]:
    from dpo_rl.config.compose import compose
    from dpo_rl.trainer.run import run

    a, n = "actor_rollout_ref.actor_rollout", args.prompts
    with tempfile.TemporaryDirectory() as out:
        cfg = compose("online_dpo_trainer_llama32_1b", [
            f"model=[{args.model}]", f"{a}.model={args.model}", f"actor_rollout_ref.ref.model={args.model}",
            f"reward.model={args.model}", f"training.device={args.device}", f"training.params_dtype={args.dtype}",
            f"training.train_iters={args.steps}", f"training.output_dir={out}", "training.eval_interval=0",
            "training.log_interval=1000", "+training.plot=false", "data.eval_path=null", "training.report_to=[jsonl]",
            f"training.tokenizer_name_or_path={world / 'tokenizer'}", f"training.global_batch_size={n}",
            f"data.train_path={world / 'prompts.jsonl'}", f"{a}.load={world / 'actor'}",
            f"actor_rollout_ref.ref.load={world / 'actor'}", f"reward.load={world / 'rm'}",
            f"{a}.num_samples_per_step={n}", f"{a}.ppo_mini_batch_size={n}", f"{a}.micro_batch_size={args.micro_batch}",
            f"actor_rollout_ref.ref.micro_batch_size={2 * args.micro_batch}",
            f"reward.micro_batch_size={2 * args.micro_batch}", f"{a}.max_prompt_length={args.prompt_tokens + 1}",
            f"{a}.max_new_tokens={args.max_new_tokens}", f"{a}.num_gpus_for_infer=0", f"{a}.rollout_engine={args.engine}",
            f"{a}.vllm_kv_cache_mb={args.kv_cache_mb}", "resource_pool.actor_rollout=[1]",
            f"ray.device_resource={'CPU' if args.device == 'cpu' else 'GPU'}",
        ])
        run(cfg, use_ray=False)
        metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        timing = [json.loads(line) for line in (Path(out) / "timing.jsonl").read_text().splitlines()]
    # in-process the calls run as they are made: a phase's time is the worker's own compute
    return [{**{k.removeprefix("timing/compute/"): v for k, v in t.items() if k.startswith("timing/compute/")},
             "step": t["timing/step"], "response_tokens": 2 * n * m["response_length/mean"]}
            for t, m in zip(timing, metrics)]


def run_trl(args: argparse.Namespace, world: Path) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from benchmarks.trl_timing import PhaseTimes, step_timer
    from dpo_rl.data.prompts import encode_prompt
    from dpo_rl.workers.megatron.model_factory import TORCH_DTYPES

    dtype = TORCH_DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    tokenizer.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in (world / "prompts.jsonl").read_text().splitlines()]
    texts = [tokenizer.decode(encode_prompt(tokenizer, p)) for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(world / "actor", dtype=torch.float32)  # fp32 master weights
    ref = AutoModelForCausalLM.from_pretrained(world / "actor", dtype=dtype)
    rm = AutoModelForSequenceClassification.from_pretrained(world / "rm", dtype=dtype)
    phases, step_times = PhaseTimes(), []
    phases.wrap(ref, "forward", "reference")
    phases.wrap(rm, "forward", "reward")
    vllm = args.trl_generation == "vllm"
    with tempfile.TemporaryDirectory() as out:
        config = OnlineDPOConfig(
            output_dir=out, use_cpu=args.device == "cpu", bf16=args.dtype == "bf16", gradient_checkpointing=False,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.prompts // args.micro_batch,
            max_steps=args.steps, learning_rate=5e-7, beta=[0.1], max_new_tokens=args.max_new_tokens,
            max_length=args.prompt_tokens + args.max_new_tokens,
            temperature=0.9, missing_eos_penalty=1.0, logging_steps=1000, save_strategy="no", report_to=[],
            seed=1234, dataloader_num_workers=0, disable_tqdm=True, use_vllm=vllm,
            **({"vllm_mode": "colocate", "vllm_gpu_memory_utilization": args.trl_vllm_memory} if vllm else {}))
        trainer = OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=rm, args=config,
                                   train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                   reward_processing_classes=tokenizer, callbacks=[step_timer(step_times, phases)])
        if vllm:
            phases.wrap(trainer, "_generate_vllm", "generate")
            phases.wrap(trainer, "_move_model_to_vllm", "sync")
        else:
            phases.wrap(trainer.model, "generate", "generate")
        trainer.train()
    response_tokens = args.prompts * 2 * args.max_new_tokens  # upper bound: random weights rarely stop early
    for step in phases.steps:  # TRL syncs the weights inside its generate call: that time was counted twice
        step["generate"] -= step.get("sync", 0.0)
        step["update"] += step.get("sync", 0.0)
    return [{**step, "response_tokens": response_tokens} for step in phases.steps]


# --------------------------------------------------------------------------- the driver
def run_side(args: argparse.Namespace, side: str, world: Path) -> list[dict]:
    """One side's records, from a fresh process (vLLM and CUDA memory are freed only by exiting)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as records:
        argv = [a for a in sys.argv[1:] if not a.startswith("--side")]
        subprocess.run([sys.executable, __file__, *argv, f"--side={side}", f"--world={world}",
                        f"--records={records.name}"], check=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        return json.loads(Path(records.name).read_text())[args.warmup:]


def utilisation(args: argparse.Namespace, params: int, records: list[dict]) -> tuple[float, float]:
    """(update MFU, decode tokens/s over the HBM bound) of one side's median step; ``params``: the actor's."""
    from dpo_rl.config.model import shipped_model_config

    config = shipped_model_config(args.model)
    update = statistics.median(r["update"] for r in records)
    response = statistics.median(r["response_tokens"] for r in records)
    tokens = 2 * args.prompts * args.prompt_tokens + response
    mfu = 6 * params * tokens / update / (args.peak_tflops * 1e12)
    rows, context = 2 * args.prompts, args.prompt_tokens + response / (4 * args.prompts)
    kv_bytes = 2 * config.num_layers * config.num_query_groups * config.head_dim * 2  # K and V in bf16, per token
    step_bytes = 2 * params + rows * context * kv_bytes
    bound = rows * args.hbm_tbps * 1e12 / step_bytes
    decode = response / statistics.median(r["generate"] for r in records)
    return mfu, decode / bound


def main() -> None:
    args = parse_args()
    if args.side:
        records = (run_ours if args.side == "ours" else run_trl)(args, Path(args.world))
        Path(args.records).write_text(json.dumps(records))
        return
    if args.prompts % args.micro_batch:
        sys.exit(f"--prompts {args.prompts} must be a multiple of --micro-batch {args.micro_batch}")
    with tempfile.TemporaryDirectory() as world:
        write_world(args, Path(world))
        params = int((Path(world) / "parameters").read_text())
        sides: dict[str, list[dict]] = {"ours": [], "TRL": []}
        for _ in range(args.rounds):
            sides["ours"] += run_side(args, "ours", Path(world))
            sides["TRL"] += run_side(args, "trl", Path(world))
    device = "cpu"
    if args.device != "cpu":
        import torch
        device = torch.cuda.get_device_name()
    print(f"\nonline DPO step, {args.model} (random init, {args.dtype}), {device}; {args.prompts} prompts x 2, "
          f"{args.prompt_tokens} prompt + <= {args.max_new_tokens} new tokens, micro-batch {args.micro_batch} pairs; "
          f"medians of {args.rounds} x {args.steps - args.warmup} steps\n")
    print("| phase (median s) | ours (" + args.engine + ") | TRL (" + args.trl_generation + ") |\n|---|---|---|")
    for phase in (*PHASES, "step"):
        cells = [statistics.median(r.get(phase, 0.0) for r in records) for records in sides.values()]
        print(f"| {phase} | {cells[0]:.3f} | {cells[1]:.3f} |")
    print("\n| side | step min s | median s | max s | update MFU | decode / HBM bound |\n|---|---|---|---|---|---|")
    for name, records in sides.items():
        steps = [r["step"] for r in records]
        mfu, decode = utilisation(args, params, records)
        print(f"| {name} | {min(steps):.3f} | {statistics.median(steps):.3f} | {max(steps):.3f} | {mfu:.1%} | {decode:.1%} |")
    ratio = statistics.median(r["step"] for r in sides["ours"]) / statistics.median(r["step"] for r in sides["TRL"])
    precision = "policy fp32 + bf16 autocast" if args.dtype == "bf16" else "fp32"
    generation = f"vllm colocate (memory {args.trl_vllm_memory})" if args.trl_generation == "vllm" else "HF generate"
    print(f"\nours / TRL step time: {ratio:.2f}. TRL: {precision}, gradient_checkpointing=False, {generation}, "
          f"reference and reward {args.dtype}; ours: in-process, {args.dtype} + fp32 main parameters, "
          f"engine {args.engine}")


if __name__ == "__main__":
    main()
