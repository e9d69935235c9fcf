"""Convert checkpoints between HF and Megatron-core, resharding TP/PP.

    # HF (safetensors) -> Megatron-core at TP=2, PP=2
    python tools/checkpoint/convert_ckpt.py --load-model-type hf --save-model-type mg \\
        --load-dir ./model_from_hf/llama32-1b-hf --save-dir ./ckpt/llama32-1b-tp2pp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2
    # reward model (HF *ForSequenceClassification, score head <-> value head)
    python tools/checkpoint/convert_ckpt.py --load-model-type hf --save-model-type mg --orm ...
    # Megatron-core -> HF (safetensors + config.json + tokenizer files)
    python tools/checkpoint/convert_ckpt.py --load-model-type mg --save-model-type hf \\
        --load-dir ./ckpt/llama32-1b-tp2pp2 --save-dir ./out-hf --tokenizer-dir ./model_from_hf/llama32-1b-hf
    # Megatron-core -> Megatron-core (reshard)
    python tools/checkpoint/convert_ckpt.py --load-model-type mg --save-model-type mg ... \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    # LoRA merge: a PEFT adapter (a LoRA run's <output_dir>/hf_actor_adapter, or one PEFT wrote) into its HF base
    python tools/checkpoint/convert_ckpt.py --load-model-type hf --save-model-type hf \\
        --load-dir ./model_from_hf/llama32-1b-hf --lora-adapter-dir ./runs/dpo/hf_actor_adapter --save-dir ./merged-hf

Families: Llama (incl. Llama 3.x rope scaling) and Qwen2/2.5, read from the HF config.json.
Errors (unknown family, missing file, a truncated or corrupted file, a TP size that does not divide
heads or vocabulary, shapes that disagree with the config) print one message naming the file or
option and exit with status 2.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dpo_rl.checkpoint.convert import hf_to_megatron, megatron_to_hf, megatron_to_megatron  # noqa: E402
from dpo_rl.checkpoint.peft_adapters import merge_peft_adapter  # noqa: E402
from dpo_rl.errors import ConfigError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-model-type", required=True, choices=["hf", "mg"])
    p.add_argument("--save-model-type", required=True, choices=["hf", "mg"])
    p.add_argument("--load-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--orm", action="store_true", help="the HF checkpoint is a reward model (score head)")
    p.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files into an HF output (default: --load-dir "
                   "for hf->hf is not supported; give the original HF directory)")
    p.add_argument("--lora-adapter-dir", default=None, help="hf -> hf only: merge this PEFT LoRA adapter "
                   "(adapter_config.json + adapter_model.safetensors) into the HF base in --load-dir")
    a = p.parse_args(argv)
    tp, pp = a.target_tensor_parallel_size, a.target_pipeline_parallel_size
    if a.lora_adapter_dir and (a.load_model_type, a.save_model_type) != ("hf", "hf"):
        p.error("--lora-adapter-dir merges into an HF base: use --load-model-type hf --save-model-type hf "
                "(convert the merged model to mg afterwards if needed)")
    try:
        if a.lora_adapter_dir:
            merge_peft_adapter(a.load_dir, a.lora_adapter_dir, a.save_dir)
        elif a.load_model_type == "hf" and a.save_model_type == "mg":
            hf_to_megatron(a.load_dir, a.save_dir, tp, pp, reward=a.orm)
        elif a.load_model_type == "mg" and a.save_model_type == "hf":
            megatron_to_hf(a.load_dir, a.save_dir, tokenizer_dir=a.tokenizer_dir)
        elif a.load_model_type == "mg" and a.save_model_type == "mg":
            megatron_to_megatron(a.load_dir, a.save_dir, tp, pp)
        else:
            p.error("hf -> hf is not a conversion (copy the directory), unless --lora-adapter-dir merges an adapter")
    except ConfigError as err:
        print(f"convert_ckpt.py: {err}", file=sys.stderr)
        return 2
    print(f"wrote {a.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
