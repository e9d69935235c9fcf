"""HF weights into and out of this worker's own place in the initialised Megatron grid.

:mod:`dpo_rl.checkpoint.hf_weights` holds the key maps and the sharding, given explicit ranks
and groups; these two helpers read the ranks and groups of the current process.
"""

from __future__ import annotations

from typing import Optional

import torch

from dpo_rl.checkpoint.hf_files import HFCheckpoint
from dpo_rl.checkpoint.hf_weights import export_hf_weights, load_hf_weights
from dpo_rl.config.model import ModelConfig
from dpo_rl.workers.megatron.parallel_state import current_ranks


def load_into_current_rank(
    model: torch.nn.Module,
    source: "HFCheckpoint | dict[str, torch.Tensor]",
    config: ModelConfig,
    *,
    reward: bool = False,
    keep_value_head: bool = False,
) -> dict[str, int]:
    """:func:`load_hf_weights` for this process's place in the initialised Megatron grid."""
    ranks = current_ranks()
    if isinstance(source, HFCheckpoint):
        get, names = source.get, source.names
    else:
        get, names = source.__getitem__, set(source)
    return load_hf_weights(
        model, get, names, config,
        tp_rank=ranks.tp_rank, tp_size=ranks.tp_size, pp_rank=ranks.pp_rank, pp_size=ranks.pp_size,
        reward=reward, keep_value_head=keep_value_head,
    )


def export_from_current_rank(
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    reward: bool = False,
    tensors: Optional[dict[str, torch.Tensor]] = None,
) -> Optional[dict[str, torch.Tensor]]:
    """:func:`export_hf_weights` over this process's TP and PP groups."""
    from megatron.core import (  # deferred: heavy (megatron-core)
        parallel_state as mpu,  # deferred: megatron-core is heavy to import
    )

    ranks = current_ranks()
    return export_hf_weights(
        model, config,
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        tp_rank=ranks.tp_rank, tp_size=ranks.tp_size, pp_rank=ranks.pp_rank, pp_size=ranks.pp_size,
        reward=reward, tensors=tensors,
    )
