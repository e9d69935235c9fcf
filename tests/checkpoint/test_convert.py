"""tools/checkpoint/convert_ckpt.py: HF <-> Megatron-core with TP/PP resharding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_rl.checkpoint import hf_files
from dpo_rl.checkpoint.convert import (
    MegatronCheckpoint,
    hf_to_megatron,
    megatron_to_hf,
    megatron_to_megatron,
)
from dpo_rl.config.model import ParallelConfig
from dpo_rl.errors import ConfigError
from tests.tolerance import assert_close, assert_differs
from tests.workers.megatron import dist_cases_ckpt
from tests.workers.megatron.common import run_distributed, tiny_config, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
#: Logits of a converted checkpoint against the HF source, relative to the largest logit (float32).
RTOL = 1e-5


def save_hf(tmp_path, family="qwen2", reward=False, **overrides):
    config = tiny_config(family, **overrides)
    model = tiny_hf_model(config, seed=5, reward=reward)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return config, model, tmp_path / "hf"


def safetensors_state(directory):
    source = hf_files.HFCheckpoint(directory)
    return {k: source.get(k) for k in source.names}


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("llama", {"rope_scaling_type": "llama3",
                                                                      "rope_scaling_factor": 8.0})])
def test_hf_to_tp2_pp2_and_back_is_byte_identical(tmp_path, family, overrides):
    config, _, hf_dir = save_hf(tmp_path, family, **overrides)
    ckpt = hf_to_megatron(str(hf_dir), str(tmp_path / "mg"), tp=2, pp=2)
    assert sorted(p.parent.name for p in (tmp_path / "mg" / "release").glob("*/model_optim_rng.pt")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert MegatronCheckpoint.open(tmp_path / "mg").config == ckpt.config == config
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"))
    original, back = safetensors_state(hf_dir), safetensors_state(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        assert original[name].dtype == back[name].dtype and torch.equal(original[name], back[name]), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_key_value_heads"] == config.num_query_groups


def test_exported_hf_loads_in_transformers_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM

    config, hf_model, hf_dir = save_hf(tmp_path, "llama")
    hf_to_megatron(str(hf_dir), str(tmp_path / "mg"), tp=2, pp=1)
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(3, 1024, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


def test_converted_checkpoints_give_hf_logits_and_scores_under_tp2(tmp_path):
    config, _, hf_dir = save_hf(tmp_path, "qwen2")
    hf_to_megatron(str(hf_dir), str(tmp_path / "mg2"), tp=2, pp=1)
    _, _, rm_dir = save_hf(tmp_path / "rm", "llama", reward=True)
    hf_to_megatron(str(rm_dir), str(tmp_path / "rm2"), tp=2, pp=1, reward=True)
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    results = run_distributed(dist_cases_ckpt.logits_from_checkpoints, 2, tp2, tp2, str(tmp_path / "mg2"),
                              str(hf_dir), str(tmp_path / "rm2"), str(rm_dir))
    out = results[0]
    assert_close(out["logits"], out["hf_logits"], rtol=RTOL, what="logits from the TP=2 checkpoint")
    assert_close(out["values"], out["hf_scores"], rtol=RTOL, what="scores from the TP=2 reward checkpoint")
    assert_differs(out["wrong_logits"], out["hf_logits"], rtol=RTOL, what="TP-1 shard loaded into TP rank 0")


def test_tp2_to_tp1_resharding_preserves_logits(tmp_path, megatron_single_rank):
    from dpo_rl.checkpoint.convert import load_into_model, load_model_shard
    from dpo_rl.workers.megatron.forward import Microbatch, model_forward
    from dpo_rl.workers.megatron.model_factory import build_gpt_model

    config, hf_model, hf_dir = save_hf(tmp_path, "llama")
    hf_to_megatron(str(hf_dir), str(tmp_path / "tp2"), tp=2, pp=2)
    megatron_to_megatron(str(tmp_path / "tp2"), str(tmp_path / "tp1"), tp=1, pp=1)
    model = build_gpt_model(config, ParallelConfig()).eval()
    load_into_model(model, load_model_shard(tmp_path / "tp1", config, 0, 1, 0, 1, reward=False))
    ids = torch.randint(3, 1024, (2, 20))
    with torch.no_grad():
        ours = model_forward(model, Microbatch(ids, torch.ones_like(ids)))
        theirs = hf_model(ids).logits
    assert_close(ours, theirs, rtol=RTOL, what="logits after TP2xPP2 -> TP1 resharding")


def test_errors_are_clear(tmp_path):
    config, _, hf_dir = save_hf(tmp_path, "qwen2")
    with pytest.raises(ConfigError, match=r"--target-tensor-parallel-size 3 does not divide num_attention_heads \(4\)"):
        hf_to_megatron(str(hf_dir), str(tmp_path / "x"), tp=3, pp=1)
    with pytest.raises(ConfigError, match="does not exist"):
        hf_to_megatron(str(tmp_path / "missing"), str(tmp_path / "x"), tp=1, pp=1)
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type='gpt2' is not supported"):
        hf_to_megatron(str(hf_dir), str(tmp_path / "x"), tp=1, pp=1)
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(ConfigError, match="linear_fc1.weight: checkpoint tensor has shape .* the checkpoint's shapes "
                                          "disagree with its config"):
        hf_to_megatron(str(hf_dir), str(tmp_path / "x"), tp=1, pp=1)
    with pytest.raises(ConfigError, match="not a checkpoint written by tools/checkpoint"):
        megatron_to_hf(str(tmp_path), str(tmp_path / "y"))


def test_cli(tmp_path):
    _, _, hf_dir = save_hf(tmp_path, "llama")
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "tools/checkpoint/convert_ckpt.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    ok = run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf_dir), "--save-dir",
             str(tmp_path / "mg"), "--target-tensor-parallel-size", "2")
    assert ok.returncode == 0, ok.stderr
    bad = run("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf_dir), "--save-dir",
              str(tmp_path / "mg3"), "--target-tensor-parallel-size", "3")
    assert bad.returncode == 2 and "does not divide" in bad.stderr


def test_pytorch_bin_checkpoints_convert_too(tmp_path):
    config = tiny_config("llama")
    model = tiny_hf_model(config, seed=5)
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the pre-safetensors format
    hf_to_megatron(str(tmp_path / "bin"), str(tmp_path / "mg"), tp=2, pp=1)
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"))
    back = safetensors_state(tmp_path / "back")
    original = {k: v for k, v in model.state_dict().items() if k in back}
    assert set(original) == set(back) and all(torch.equal(original[k], back[k]) for k in back)


class _Planted:
    """An object whose unpickling would run code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_training_checkpoint_is_refused_without_running_it(tmp_path):
    import torch

    from dpo_rl.checkpoint.training import load_training_state
    from dpo_rl.errors import ConfigError

    marker = tmp_path / "ran"
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"model": {}, "evil": _Planted(marker)}, path)
    with pytest.raises(ConfigError, match="holds more than tensors and plain data"):
        load_training_state(path, torch.nn.Linear(2, 2))
    assert not marker.exists()
