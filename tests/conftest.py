"""Test-wide set-up: CPU by default, one Megatron world of size 1 for single-process tests."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_single_rank():
    """torch.distributed (gloo, world size 1) and Megatron TP=PP=1 for this pytest process."""
    from dpo_rl.config.model import ParallelConfig
    from dpo_rl.workers.megatron.parallel_state import init_distributed
    from tests.workers.megatron.common import free_port

    torch.set_num_threads(2)
    return init_distributed(ParallelConfig(), rank=0, world_size=1, master_port=free_port())
