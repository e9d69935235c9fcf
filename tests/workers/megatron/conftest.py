"""Fixtures of the Megatron-layer tests."""

from __future__ import annotations

import pytest

from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.workers.megatron.common import tiny_config, tiny_hf_model


@pytest.fixture(scope="module")
def model(megatron_single_rank):
    """The tiny Llama GPTModel (TP = PP = 1) with seeded HF weights, one per test module."""
    config = tiny_config("llama")
    built = build_gpt_model(config, ParallelConfig())
    hf_interop.load_into_current_rank(built, tiny_hf_model(config, seed=5).state_dict(), config)
    return built
