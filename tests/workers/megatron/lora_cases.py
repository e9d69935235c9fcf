"""Functions the LoRA tests run on every rank of a gloo world (and in a world of one for TP=1)."""

from __future__ import annotations

import torch

from dpo_rl.config.model import ParallelConfig
from dpo_rl.config.schema import LoRASettings
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.forward import Microbatch, run_microbatches
from dpo_rl.workers.megatron.lora import (
    adapted_linears,
    adapted_rule,
    add_lora,
    gathered_adapters,
    init_factor_a,
)
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from dpo_rl.workers.megatron.parallel_state import current_ranks
from tests.workers.megatron.common import random_batch, tiny_config, tiny_hf_model

SETTINGS = LoRASettings(enabled=True, rank=4, alpha=8.0)


def lora_model(family: str, parallel: ParallelConfig, settings: LoRASettings = SETTINGS, *, seed: int = 3,
               random_b: bool = True):
    """The seeded tiny HF model loaded at the world's TP, with adapters; ``random_b`` gives every B seeded
    non-zero values (as training would), sharded like the base weight."""
    from dpo_rl.checkpoint.hf_weights import shard

    config = tiny_config(family)
    hf_model = tiny_hf_model(config, seed=7)
    model = build_gpt_model(config, parallel)
    ranks = current_ranks()
    add_lora(model, settings, seed=seed, tp_rank=ranks.tp_rank, tp_size=ranks.tp_size)
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    if random_b:
        with torch.no_grad():
            for a in adapted_linears(model):
                rule = adapted_rule(a.target, config, reward=False)
                out_full = a.module.adapter.lora_b.shape[0] * (ranks.tp_size if a.module.adapter.kind == "column" else 1)
                full = init_factor_a(seed + 1, f"B.{a.layer}.{a.target}", out_full, settings.rank) * 0.5
                split = rule.tp_split if a.module.adapter.kind == "column" else "replicated"
                a.module.adapter.lora_b.copy_(shard(full, split, ranks.tp_rank, ranks.tp_size))
    return config, hf_model, model


def _compute(output, micro: Microbatch):
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )

    from dpo_rl.workers.megatron.logprobs import sequence_logprobs

    lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"])
    return -lp.summed.sum(), {"logits": gather_from_tensor_model_parallel_region(output.detach())}


def forward_backward_case(family: str, parallel: ParallelConfig) -> dict:
    """Logits over two micro-batches, then every adapter's gradient by HF module (gathered over TP)."""
    config, _, model = lora_model(family, parallel)
    ids, attention, response = random_batch(4, 32, prompt_lens=[12, 20, 16, 8])
    micros = [Microbatch(ids[i:i + 2], attention[i:i + 2], {"response_mask": response[i:i + 2]}) for i in (0, 2)]
    model.train()
    outputs = run_microbatches(model, micros, _compute, forward_only=False)
    base_grads = [n for n, p in model.named_parameters() if p.grad is not None and ".adapter." not in n]
    ranks = current_ranks()
    with torch.no_grad():  # the gradients in the factors' places, so the adapter gather collects them
        for a in adapted_linears(model):
            for p in (a.module.adapter.lora_a, a.module.adapter.lora_b):
                p.copy_(p.grad)
    from megatron.core import parallel_state as mpu

    grads = {m: (ga, gb) for m, ga, gb in gathered_adapters(model, config, tp_group=mpu.get_tensor_model_parallel_group(),
                                                             tp_rank=ranks.tp_rank, tp_size=ranks.tp_size)}
    return {"ranks": ranks, "logits": torch.cat([o["logits"] for o in outputs]), "grads": grads,
            "base_grads": base_grads}
