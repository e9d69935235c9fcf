"""PEFT-format adapters (:mod:`dpo_rl.checkpoint.peft_adapters`) and convert_ckpt's LoRA merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_rl.checkpoint.peft_adapters import merge_peft_adapter
from dpo_rl.errors import ConfigError
from tests.workers.megatron.common import tiny_config, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]


def peft_adapter(base, directory, **lora):
    """A LoRA adapter trained nowhere but made non-zero, written by peft itself."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(directory)
    return model.merge_and_unload()


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                                  dict(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True)])
def test_the_cli_merge_equals_peft_merge_and_unload(tmp_path, lora):
    from transformers import AutoModelForCausalLM

    base = tiny_hf_model(tiny_config("llama"), seed=5)
    base.save_pretrained(tmp_path / "base")
    expected = peft_adapter(base, tmp_path / "adapter", **lora).state_dict()
    done = subprocess.run([sys.executable, str(ROOT / "tools/checkpoint/convert_ckpt.py"), "--load-model-type", "hf",
                           "--save-model-type", "hf", "--load-dir", str(tmp_path / "base"), "--lora-adapter-dir",
                           str(tmp_path / "adapter"), "--save-dir", str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).state_dict()
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert float((merged[name] - tensor).abs().max()) < 1e-6, name
    from safetensors.torch import load_file

    original = load_file(str(tmp_path / "base" / "model.safetensors"))  # peft merged into `base` in place
    changed = [n for n in original if not torch.equal(original[n], merged[n])]
    assert changed  # the adapter did something to merge


def test_a_merge_names_what_does_not_fit(tmp_path):
    base = tiny_hf_model(tiny_config("llama"), seed=5)
    base.save_pretrained(tmp_path / "base")
    peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    last = tiny_config("llama").num_layers - 1
    tiny_hf_model(tiny_config("llama", num_layers=last), seed=5).save_pretrained(tmp_path / "fewer_layers")
    with pytest.raises(ConfigError, match=f"adapts 'model.layers.{last}.self_attn.q_proj', which .* does not have"):
        merge_peft_adapter(tmp_path / "fewer_layers", tmp_path / "adapter", tmp_path / "out")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora=True is not plain LoRA"):
        merge_peft_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(ConfigError, match="no adapter_config.json; not a PEFT adapter directory"):
        merge_peft_adapter(tmp_path / "base", tmp_path / "base", tmp_path / "out")
