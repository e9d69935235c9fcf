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


def test_bf16_training_moves_fp32_main_weights_on_cuda(cuda_world):
    """megatron's mixed-precision optimizer on CUDA at the shipped LR: every update lands in the main weights."""
    from tests.workers.megatron.test_optimizer import (
        SHIPPED_LR,
        changed_fraction,
        main_weights,
        sft_actor,
        train_steps,
    )

    fp32 = sft_actor(ParallelConfig(device="cuda", params_dtype="fp32"), lr=SHIPPED_LR)
    bf16 = sft_actor(ParallelConfig(device="cuda", params_dtype="bf16"), lr=SHIPPED_LR)
    f0, b0 = main_weights(fp32), main_weights(bf16)
    train_steps(fp32, 5)
    train_steps(bf16, 5)
    assert changed_fraction(b0, main_weights(bf16)) >= 0.99 * changed_fraction(f0, main_weights(fp32))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank of the sync group")
def test_weight_sync_over_nccl_is_bit_identical():
    from tests.workers.megatron.test_weight_sync import run_sync

    cuda = ParallelConfig(device="cuda", params_dtype="bf16")
    results = run_sync(cuda, 1, cuda, 1, bucket_mb=0.05)
    sent = next(r for r in results if r["trainer"])
    received = next(r for r in results if not r["trainer"])
    assert sent["digest"] == sent["after"] == received["digest"] == received["after"]
