"""Shared helpers for the Megatron-layer tests: tiny HF models and a gloo multi-process runner."""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from dpo_rl.checkpoint import hf_files
from dpo_rl.config.model import (
    ModelConfig,
    ParallelConfig,
    replace,
    shipped_model_config,
)
from dpo_rl.workers.megatron.parallel_state import free_port

VOCAB = 1024


def tiny_config(family: str = "llama", **overrides: Any) -> ModelConfig:
    """The shipped tiny architecture, optionally as Qwen2 (qkv bias) or with overrides."""
    base = shipped_model_config("tiny")
    if family == "qwen2":
        overrides.setdefault("add_qkv_bias", True)
    return replace(base, family=family, **overrides)


def tiny_hf_model(config: ModelConfig, seed: int = 0, reward: bool = False):
    """A transformers model for ``config`` with seeded random weights (biases made non-zero)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if reward:
        hf_cfg = hf_files.hf_transformers_config(config, reward=True, pad_token_id=0)
        model = AutoModelForSequenceClassification.from_config(hf_cfg)
    else:
        model = AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.float().eval()


def random_batch(batch: int, seq: int, seed: int = 1, prompt_lens=None):
    """Left-padded prompt + response token ids with masks: (ids, attention_mask, response_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    attention = torch.ones(batch, seq, dtype=torch.long)
    response = torch.zeros(batch, seq, dtype=torch.long)
    prompt_lens = prompt_lens or [seq // 2] * batch
    for row, plen in enumerate(prompt_lens):
        pad = row % 3  # some rows left-padded
        ids[row, :pad] = 0
        attention[row, :pad] = 0
        response[row, plen:] = 1
        tail = row % 2  # some rows right-padded after the response
        if tail:
            ids[row, seq - tail :] = 0
            attention[row, seq - tail :] = 0
            response[row, seq - tail :] = 0
    return ids, attention, response


def _worker(rank: int, world_size: int, port: int, parallel: ParallelConfig, fn, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    from dpo_rl.workers.megatron.parallel_state import (
        destroy_distributed,
        init_distributed,
    )

    try:
        init_distributed(parallel, rank, world_size, master_port=port)
        result = fn(*args)
        torch.save({"ok": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report to the parent, which raises
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        destroy_distributed()


def run_distributed(fn: Callable, world_size: int, parallel: ParallelConfig, *args) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo processes with Megatron state for ``parallel``.

    ``fn`` must be importable (module level). Returns every rank's return value.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), parallel, fn, args, out_dir),
            nprocs=world_size,
            start_method="spawn",
            join=True,
        )
        results = [torch.load(Path(out_dir) / f"{r}.pt", weights_only=False) for r in range(world_size)]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise AssertionError("a distributed worker failed:\n" + errors[0])
    return [r["ok"] for r in results]
