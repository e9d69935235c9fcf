"""megatron-core's parallel linear layers with a direct forward when the layer has one tensor-parallel rank.

At TP = 1 ``ColumnParallelLinear`` and ``RowParallelLinear`` still route every call through their
tensor-parallel regions (identity ``autograd.Function`` s that look up the TP group) and through
``LinearWithGradAccumulationAndAsyncCommunication`` (a custom ``autograd.Function`` for fused weight-grad
accumulation and overlapped all-reduce). None of that does anything with one rank, but on a small model its
Python cost is a fifth of a decode step (tiny world, 32 rows: 0.255 -> 0.202 s per rollout, training step
0.91x, forward 0.93x; measured side by side).

The subclasses below keep everything else of megatron's layers (parameters, their TP attributes, sharded
checkpoint layout, LoRA forward hooks) and compute ``input @ weight.T`` (then ``+ bias``) with PyTorch's own
autograd when the layer is on a single rank and uses no feature that needs megatron's path (fused gradient
accumulation, deferred embedding weight-grads, expert communication, sequence parallelism, activation
offloading); otherwise they call megatron's forward. The forward equals megatron's bit for bit (one GEMM over
every position, then the bias add); gradients agree to float rounding
(tests/workers/megatron/test_single_rank_linear.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size


def _direct(layer) -> bool:
    """True when ``layer``'s megatron forward reduces to ``input @ weight.T`` (+ bias)."""
    config = layer.config
    return (get_pg_size(layer.tp_group) == 1 and not layer.gradient_accumulation_fusion
            and not layer.sequence_parallel and not layer.explicit_expert_comm
            and not config.defer_embedding_wgrad_compute)


def _matmul(input_: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``input_ @ weight.T`` as one 2-D GEMM over every position, whatever the input's strides and grad mode.
    A 3-D ``torch.matmul`` here (megatron's call, which runs inside an ``autograd.Function``) rounded
    differently in some calls: a LoRA actor's base (adapters off) and a separate reference with the same
    weights then differed in the last bits (tests/workers/megatron/test_lora.py)."""
    return torch.mm(input_.reshape(-1, input_.shape[-1]), weight.t()).view(*input_.shape[:-1], weight.shape[0])


def _offloading(layer) -> bool:
    context = layer.config._cpu_offloading_context
    return context is not None and context.inside_context


class _DecidesOnce:
    """Decides at construction whether the layer's forward may be direct (``direct_forward``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.direct_forward = _direct(self)


class SingleRankColumnLinear(_DecidesOnce, ColumnParallelLinear):
    """``ColumnParallelLinear`` with a direct forward on one TP rank."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if not self.direct_forward or _offloading(self) or (weight is None and self.weight is None):
            return super().forward(input_, weight, runtime_gather_output)
        if weight is None:
            weight = self.weight
        elif weight.shape != (self.output_size_per_partition, self.input_size):
            return super().forward(input_, weight, runtime_gather_output)  # megatron's error message
        output = _matmul(input_, weight)
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, (self.bias if self.skip_bias_add else None)


class SingleRankRowLinear(_DecidesOnce, RowParallelLinear):
    """``RowParallelLinear`` with a direct forward on one TP rank."""

    def forward(self, input_: torch.Tensor):
        if not self.direct_forward or _offloading(self):
            return super().forward(input_)
        output = _matmul(input_, self.weight)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


def use_direct_output_layer(gpt) -> None:
    """Give a ``GPTModel``'s LM head (a ``ColumnParallelLinear`` the model builds itself, outside the layer
    spec) the direct forward: its class becomes the subclass above, with nothing else changed."""
    head = getattr(gpt, "output_layer", None)
    if type(head) is ColumnParallelLinear:
        head.__class__ = SingleRankColumnLinear
        head.direct_forward = _direct(head)
