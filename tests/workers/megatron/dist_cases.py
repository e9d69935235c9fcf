"""Functions run on every rank of a gloo world by the parallel-equivalence tests.

Each builds the same seeded HF model, loads it at the world's TP/PP layout and returns
what the tests compare against TP=1 (computed by the same function in a world of one).
"""

from __future__ import annotations

import torch

from dpo_rl.checkpoint import hf_weights
from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.forward import Microbatch, run_microbatches
from dpo_rl.workers.megatron.generation import SamplingParams, generate
from dpo_rl.workers.megatron.logprobs import sequence_logprobs
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from dpo_rl.workers.megatron.parallel_state import current_ranks
from tests.workers.megatron.common import random_batch, tiny_config, tiny_hf_model


def _model(family: str, parallel: ParallelConfig):
    config = tiny_config(family)
    hf_model = tiny_hf_model(config, seed=7)
    model = build_gpt_model(config, parallel)
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    return config, hf_model, model


def _compute(output, micro: Microbatch):
    from megatron.core.tensor_parallel.mappings import (
        gather_from_tensor_model_parallel_region,
    )

    lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"], with_entropy=True)
    loss = -lp.summed.sum() - 0.1 * lp.mean_entropy().sum()
    return loss, {
        "summed": lp.summed.detach(),
        "token_logprobs": lp.token_logprobs.detach(),
        "entropy": (lp.entropy * lp.mask).detach(),  # at response positions (TP = 1 computes it there only)
        "logits": gather_from_tensor_model_parallel_region(output.detach()),
    }


def forward_backward_case(family: str, parallel: ParallelConfig) -> dict:
    """Logits, log-probs, entropy and HF-named gradients over two micro-batches, plus the
    HF export of the loaded weights (round trip)."""
    config, hf_model, model = _model(family, parallel)
    ids, attention, response = random_batch(4, 40, prompt_lens=[12, 20, 16, 8])
    micros = [
        Microbatch(ids[i : i + 2], attention[i : i + 2], {"response_mask": response[i : i + 2]})
        for i in (0, 2)
    ]
    model.train()
    outputs = run_microbatches(model, micros, _compute, forward_only=False)
    grads = {name: p.grad for name, p in model.named_parameters()}
    ranks = current_ranks()
    result = {
        "ranks": ranks,
        "outputs": outputs,
        "grads": hf_interop.export_from_current_rank(model, config, tensors=grads),
        "export": hf_interop.export_from_current_rank(model, config),
    }
    if ranks.is_output_rank:  # the export is owned by the output rank
        result["source"] = {k: v for k, v in hf_model.state_dict().items() if k in result["export"]}
    return result


def generation_case(family: str, parallel: ParallelConfig) -> dict:
    """Greedy and seeded sampled generation."""
    _, _, model = _model(family, parallel)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (4, 9, 6)]
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=12, do_sample=False))
    sampled = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3))
    return {"greedy": greedy.sequences, "sampled": sampled.sequences, "logprobs": sampled.rollout_logprobs}


def wrong_gate_up_split_case(family: str, parallel: ParallelConfig) -> dict:
    """Negative control: split linear_fc1 as a plain column (not gate and up separately)."""
    original = hf_weights.shard

    def plain_column(full, tp_split, tp_rank, tp_size):
        return original(full, "column" if tp_split == "gate_up" else tp_split, tp_rank, tp_size)

    hf_weights.shard = plain_column
    try:
        return forward_backward_case(family, parallel)
    finally:
        hf_weights.shard = original
