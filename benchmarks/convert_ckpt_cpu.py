"""Checkpoint conversion time and peak RSS: a random llama32-1b-shaped HF checkpoint -> Megatron-core
TP=2 -> HF, each direction in a fresh process (peak RSS of that process, from getrusage).

    python benchmarks/convert_ckpt_cpu.py [--model llama32-1b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_random_hf(directory: Path, model: str, dtype: str) -> int:
    """Random weights with the model's HF names and shapes, in 2 GiB safetensors shards; returns bytes."""
    import torch
    from safetensors.torch import save_file

    from dpo_rl.config.model import shipped_model_config
    from dpo_rl.checkpoint import hf_files

    config = shipped_model_config(model)
    torch_dtype = getattr(torch, dtype)
    h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (config.num_attention_heads * d, h),
                       p + "self_attn.k_proj.weight": (config.num_query_groups * d, h),
                       p + "self_attn.v_proj.weight": (config.num_query_groups * d, h),
                       p + "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
                       p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                       p + "mlp.down_proj.weight": (h, ffn)})
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard, size, weight_map, total = {}, 0, {}, 0
    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size > 2 * 2**30:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, str(directory / file))
            weight_map.update({k: file for k in shard})
            total += size
            shard, size = {}, 0
    file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_file(shard, str(directory / file))
    weight_map.update({k: file for k in shard})
    total += size
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_files.hf_config_dict(config, torch_dtype=dtype)))
    return total


CHILD = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    if exit_.code:
        raise
finally:
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def timed_child(args: list[str]) -> tuple[float, float]:
    """Run tools/checkpoint/convert_ckpt.py in a fresh process; (seconds, its peak RSS in GiB)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "tools/checkpoint/convert_ckpt.py"), *args],
                          check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kib = int(proc.stderr.split("PEAK_RSS_KIB")[-1].split()[0])
    return seconds, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama32-1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = write_random_hf(tmp / "hf", args.model, args.dtype)
        to_mg = timed_child(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(tmp / "hf"),
                             "--save-dir", str(tmp / "mg"), "--target-tensor-parallel-size", "2"])
        to_hf = timed_child(["--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", str(tmp / "mg"),
                             "--save-dir", str(tmp / "back")])
    print(f"\n{args.model} shape, random {args.dtype} weights: {total / 2**30:.2f} GiB of tensors\n")
    print("| direction | seconds | peak RSS (GiB) |")
    print("|---|---|---|")
    print(f"| HF -> mcore TP=2 | {to_mg[0]:.1f} | {to_mg[1]:.2f} |")
    print(f"| mcore TP=2 -> HF | {to_hf[0]:.1f} | {to_hf[1]:.2f} |")


if __name__ == "__main__":
    main()
