"""Per-rank functions for checkpoint tests: load converted Megatron checkpoints at TP=2."""

from __future__ import annotations

import torch

from dpo_rl.checkpoint.convert import (
    MegatronCheckpoint,
    load_into_model,
    load_model_shard,
)
from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron.forward import Microbatch, model_forward
from dpo_rl.workers.megatron.model_factory import build_gpt_model, build_reward_model
from dpo_rl.workers.megatron.parallel_state import current_ranks


def _gathered(logits):
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )

    return gather_from_tensor_model_parallel_region(logits)


def logits_from_checkpoints(parallel: ParallelConfig, mg_dir: str, hf_dir: str, rm_mg: str, rm_hf: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    r = current_ranks()
    ckpt = MegatronCheckpoint.open(mg_dir)
    model = build_gpt_model(ckpt.config, parallel).eval()
    load_into_model(model, load_model_shard(mg_dir, ckpt.config, r.tp_rank, r.tp_size, 0, 1, reward=False))
    ids = torch.randint(3, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = _gathered(model_forward(model, Microbatch(ids, mask)))
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(ids).logits
    wrong = build_gpt_model(ckpt.config, parallel).eval()
    load_into_model(wrong, load_model_shard(mg_dir, ckpt.config, 1 - r.tp_rank, r.tp_size, 0, 1, reward=False))
    with torch.no_grad():
        wrong_logits = _gathered(model_forward(wrong, Microbatch(ids, mask)))
    rm = MegatronCheckpoint.open(rm_mg)
    reward = build_reward_model(rm.config, parallel).eval()
    load_into_model(reward, load_model_shard(rm_mg, rm.config, r.tp_rank, r.tp_size, 0, 1, reward=True))
    with torch.no_grad():
        values = model_forward(reward, Microbatch(ids, mask))[:, -1, 0]
        scores = AutoModelForSequenceClassification.from_pretrained(rm_hf).eval()(ids).logits[:, 0]
    return {"logits": ours, "hf_logits": theirs, "values": values, "hf_scores": scores, "wrong_logits": wrong_logits}
