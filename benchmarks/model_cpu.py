"""Side-by-side speed of the megatron-core model layer and HF transformers on the same weights.

Measures, in one run and interleaved (median of --repeats timings each):
  * forward+backward tokens/s (batch 8, seq 128, next-token loss over all positions);
  * generation new-tokens/s (batch 8, 64 new tokens): ours with and without the KV cache,
    HF ``generate`` with and without its cache.
Prints a table and the ratios; the target is our cached generation within 1.5x of HF's
cached time. Defaults: a ~5M-parameter Llama-shaped model on CPU in fp32. On a GPU,
``--device cuda --dtype bf16 --model llama32-1b`` uses that architecture with random weights
and also reports the train step's MFU against ``--peak-tflops``.

    python benchmarks/model_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_rl.config.model import ModelConfig, ParallelConfig, shipped_model_config  # noqa: E402
from dpo_rl.checkpoint import hf_files
from dpo_rl.workers.megatron import hf_interop  # noqa: E402
from dpo_rl.workers.megatron.forward import Microbatch, model_forward  # noqa: E402
from dpo_rl.workers.megatron.generation import SamplingParams, generate  # noqa: E402
from dpo_rl.workers.megatron.logprobs import vocab_parallel_token_logprobs  # noqa: E402
from dpo_rl.workers.megatron.model_factory import TORCH_DTYPES, build_gpt_model  # noqa: E402
from dpo_rl.workers.megatron.parallel_state import free_port, init_distributed  # noqa: E402

FIVE_M = ModelConfig(
    family="llama", num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8,
    num_query_groups=4, vocab_size=4096, max_position_embeddings=512,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_times(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Run each fn once to warm up, then ``repeats`` rounds interleaved; median per fn."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return {name: statistics.median(times) for name, times in samples.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="5m", help="'5m' (built in) or a configs/rlxf/model name")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM)")
    return parser.parse_args()


def train_times(ours, hf_model, ids: torch.Tensor, args) -> dict[str, float]:
    """Median forward+backward time of a next-token loss over ``ids``, ours and HF's."""
    mask = torch.ones_like(ids)

    def ours_train_step():
        logits = model_forward(ours, Microbatch(ids, mask))
        loss = -vocab_parallel_token_logprobs(logits[:, :-1], ids[:, 1:]).mean()
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def hf_train_step():
        logits = hf_model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        hf_model.zero_grad(set_to_none=True)

    ours.train()
    hf_model.train()
    return median_times({"ours": ours_train_step, "hf": hf_train_step}, args.repeats, args.device)


def generation_times(ours, hf_model, ids: torch.Tensor, args) -> dict[str, float]:
    """Median greedy generation time with and without a KV cache, ours and HF's."""
    prompt_ids = ids[:, : args.prompt_len]
    prompts = prompt_ids.tolist()
    sampling = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False, eos_token_ids=(), pad_token_id=0)
    hf_model.eval()

    def hf_generate(use_cache):
        return lambda: hf_model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0,
        )

    fns = {
        "ours_kv_cache": lambda: generate(ours, prompts, sampling, use_kv_cache=True, device=args.device),
        "ours_no_cache": lambda: generate(ours, prompts, sampling, use_kv_cache=False, device=args.device),
        "hf_cache": hf_generate(True),
        "hf_no_cache": hf_generate(False),
    }
    with torch.no_grad():
        return median_times(fns, args.repeats, args.device)


def report(args, config: ModelConfig, params: int, train: dict[str, float], gen: dict[str, float]) -> None:
    tokens = args.batch * args.seq
    new_tokens = args.batch * args.new_tokens
    print(f"\nmodel: {args.model} ({params / 1e6:.2f}M params), device {args.device}, dtype {args.dtype}, "
          f"threads {args.threads}, median of {args.repeats}\n")
    print(f"| {'measurement':<38} | {'ours':>12} | {'HF':>12} | {'ours/HF time':>12} |")
    print(f"|{'-' * 40}|{'-' * 14}|{'-' * 14}|{'-' * 14}|")
    rows = [
        (f"fwd+bwd tokens/s (b{args.batch}, s{args.seq})", tokens, train["ours"], train["hf"]),
        ("generate new tok/s, KV cache", new_tokens, gen["ours_kv_cache"], gen["hf_cache"]),
        ("generate new tok/s, no cache", new_tokens, gen["ours_no_cache"], gen["hf_no_cache"]),
    ]
    for label, count, ours_s, hf_s in rows:
        print(f"| {label:<38} | {count / ours_s:>12.0f} | {count / hf_s:>12.0f} | {ours_s / hf_s:>12.2f} |")
    ratio = gen["ours_kv_cache"] / gen["hf_cache"]
    print(f"\nKV cache speed-up (ours): {gen['ours_no_cache'] / gen['ours_kv_cache']:.2f}x; "
          f"cached generation vs HF: {ratio:.2f}x HF's time (target <= 1.5): {'MET' if ratio <= 1.5 else 'MISSED'}")
    if args.device == "cuda":
        flops = 6 * params * tokens + 12 * config.num_layers * config.hidden_size * args.seq * tokens
        print(f"train-step MFU: {flops / train['ours'] / (args.peak_tflops * 1e12):.1%} "
              f"(6N + attention FLOPs per token, peak {args.peak_tflops} TFLOP/s)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = FIVE_M if args.model == "5m" else shipped_model_config(args.model)
    parallel = ParallelConfig(device=args.device, params_dtype=args.dtype)
    init_distributed(parallel, rank=0, world_size=1, master_port=free_port())

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(config),
                                                dtype=TORCH_DTYPES[args.dtype]).to(args.device)
    ours = build_gpt_model(config, parallel)
    hf_interop.load_into_current_rank(ours, hf_model.state_dict(), config)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    train = train_times(ours, hf_model, ids, args)
    gen = generation_times(ours, hf_model, ids, args)
    report(args, config, sum(p.numel() for p in ours.parameters()), train, gen)


if __name__ == "__main__":
    main()
