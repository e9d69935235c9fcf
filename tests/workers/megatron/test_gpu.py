"""GPU checks (skipped without CUDA): the same equivalences in bf16 with the GPU layer spec."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.forward import Microbatch, model_forward
from dpo_rl.workers.megatron.generation import SamplingParams, generate
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.workers.megatron.common import random_batch, tiny_config, tiny_hf_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_world():
    from dpo_rl.workers.megatron.parallel_state import init_distributed
    from tests.workers.megatron.common import free_port

    return init_distributed(ParallelConfig(device="cuda", params_dtype="bf16"), 0, 1, master_port=free_port())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_logits_close_to_hf_on_cuda(cuda_world, family):
    config = tiny_config(family)
    hf_model = tiny_hf_model(config).to("cuda", torch.bfloat16)
    model = build_gpt_model(config, ParallelConfig(device="cuda", params_dtype="bf16")).eval()
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    ids, attention, _ = random_batch(2, 64)
    ids, attention = ids.cuda(), attention.cuda()
    with torch.no_grad():
        ours = model_forward(model, Microbatch(ids, attention)).float()
        theirs = hf_model(ids, attention_mask=attention).logits.float()
    real = attention.bool()
    rel = (ours[real] - theirs[real]).norm() / theirs[real].norm()
    assert rel < 2e-2
    out = generate(model, [[5, 6, 7], [9, 10]], SamplingParams(max_new_tokens=8, do_sample=False), device="cuda")
    assert out.sequences.shape[1] <= 3 + 8
