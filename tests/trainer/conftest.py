"""A small world for end-to-end runs: the tiny tokenizer, random-init actor and reward model."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_rl.checkpoint import hf_files
from dpo_rl.config.compose import compose
from dpo_rl.config.model import shipped_model_config


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from examples.tiny_world import build, world

    root = tmp_path_factory.mktemp("world")
    tokenizer = build.build_tokenizer(root / "tokenizer")
    train, held_out = world.split_prompts(build.SEED)
    build.write_prompts(root / "train.jsonl", train[:40])
    build.write_prompts(root / "eval.jsonl", held_out[:8])
    torch.manual_seed(0)
    actor = AutoModelForCausalLM.from_config(hf_files.hf_transformers_config(shipped_model_config("tiny")))
    actor.save_pretrained(root / "sft")
    rm_cfg = hf_files.hf_transformers_config(shipped_model_config("tiny-rm"), reward=True,
                                              pad_token_id=tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(rm_cfg).save_pretrained(root / "rm")
    (root / "info.json").write_text(json.dumps({"tokens": len(tokenizer)}))
    return root


def small_run_overrides(world, output_dir, *extra: str) -> list[str]:
    """The tiny config shrunk to a few fast steps on ``world``."""
    return [
        f"training.tokenizer_name_or_path={world}/tokenizer",
        f"actor_rollout_ref.actor_rollout.load={world}/sft",
        f"actor_rollout_ref.ref.load={world}/sft",
        f"reward.load={world}/rm",
        f"data.train_path={world}/train.jsonl",
        f"data.eval_path={world}/eval.jsonl",
        f"training.output_dir={output_dir}",
        "training.train_iters=3",
        "training.global_batch_size=4",
        "training.eval_interval=2",
        "training.eval_samples=4",
        "training.log_interval=1",
        "training.lr=1e-3",
        "actor_rollout_ref.actor_rollout.num_samples_per_step=4",
        "actor_rollout_ref.actor_rollout.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor_rollout.micro_batch_size=1",
        "actor_rollout_ref.actor_rollout.max_new_tokens=8",
        "actor_rollout_ref.ref.micro_batch_size=4",
        "reward.micro_batch_size=4",
        *extra,
    ]


def small_config(world, output_dir, *extra: str):
    return compose("online_dpo_trainer_tiny", small_run_overrides(world, output_dir, *extra))


@pytest.fixture(scope="module")
def runs(world_dir, tmp_path_factory):
    """Small online runs executed lazily, each once per module: ``runs(name, *overrides)`` -> (out, summary)."""
    from dpo_rl.trainer.run import run

    cache = {}

    def get(name, *overrides, use_ray=True):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            summary = run(small_config(world_dir, out, *overrides), use_ray=use_ray)
            cache[name] = (out, summary)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def offline_data(world_dir):
    """The world's SFT examples and preference pairs, preprocessed as the offline stages read them."""
    from examples.tiny_world import build, world

    train, held_out = world.split_prompts(build.SEED)
    raw = build.write_datasets(world_dir / "raw", train, held_out, sft_examples=64, pair_examples=64,
                               held_out_pairs=32)
    build.preprocess_datasets(raw, world_dir / "tokenizer", world_dir / "data")
    return world_dir / "data"


def offline_config(name: str, world, output_dir, *extra: str):
    """A shipped tiny offline config (dpo/rm/sft_trainer_tiny) pointed at ``world`` and shrunk to a few steps."""
    data = world / "data"
    train, held_out = ("sft_train", "sft_eval") if name.startswith("sft") else ("pairs_train", "pairs_eval")
    overrides = [
        f"training.tokenizer_name_or_path={world}/tokenizer",
        f"data.train_path={data}/{train}",
        f"data.eval_path={data}/{held_out}",
        f"training.output_dir={output_dir}",
        "training.train_iters=4",
        "training.global_batch_size=8",
        "training.eval_interval=2",
        "training.eval_samples=16",
        "training.log_interval=1",
        "training.num_threads=1",
        "training.lr=1e-3",
    ]
    if name.startswith("dpo"):
        overrides += [f"actor_rollout_ref.actor_rollout.load={world}/sft", "actor_rollout_ref.actor_rollout.micro_batch_size=4",
                      "actor_rollout_ref.ref.micro_batch_size=8"]
    elif name.startswith("sft"):
        overrides += ["actor_rollout_ref.actor_rollout.micro_batch_size=4"]
    else:
        overrides += ["reward.micro_batch_size=4"]
    return compose(name, overrides + list(extra))
