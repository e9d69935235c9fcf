"""Running a GPTModel over padded batches, with or without pipeline parallelism.

Sequences are laid out as ``[prompt (left-padded) | response (right-padded)]`` with an
``attention_mask`` [b, s] of 1 for real tokens. Attention masks passed to megatron are
boolean [b, 1, sq, sk] with True where attention is *blocked* (causal or padding key).

:func:`run_microbatches` drives megatron-core's own pipeline schedule
(``get_forward_backward_func``) for every PP size, so forward-only evaluation and
training share one path: the caller gives a ``compute`` function that turns the last
stage's output into ``(loss, outputs)``; outputs are collected on the last stage.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dpo_rl.workers.megatron import head_positions, rope_positions
from dpo_rl.workers.megatron.packing import PackPlan, plan_packing

ComputeFn = Callable[[torch.Tensor, "Microbatch"], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def blocked_attention(attention_mask: torch.Tensor, query_len: Optional[int] = None) -> torch.Tensor:
    """Boolean [b, 1, sq, sk] mask (True = blocked) from a [b, sk] padding mask.

    The last ``query_len`` positions are the queries (all of them by default); each
    query sees earlier real tokens and always itself (so a padding query attends only to
    itself and no row is fully blocked); a real query never sees a padding key.
    """
    batch, key_len = attention_mask.shape
    query_len = key_len if query_len is None else query_len
    device = attention_mask.device
    query_pos = torch.arange(key_len - query_len, key_len, device=device)
    key_pos = torch.arange(key_len, device=device)
    future = key_pos[None, :] > query_pos[:, None]  # [sq, sk]
    itself = key_pos[None, :] == query_pos[:, None]  # [sq, sk]
    pad_key = attention_mask[:, None, None, :] == 0  # [b, 1, 1, sk]
    return future[None, None] | (pad_key & ~itself[None, None])


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Position ids 0..s-1 for every row (RoPE is relative, so left padding needs no shift)."""
    batch, seq = input_ids.shape
    return torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)


@dataclass
class Microbatch:
    """One micro-batch as every pipeline stage sees it.

    ``input_ids`` [b, s] long; ``attention_mask`` [b, s] (1 = real token); ``extras``
    holds per-row tensors the compute function needs (response masks, labels, ...).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    packing: Optional[PackPlan] = None
    """Set by :func:`run_microbatches` when the forward runs on packed rows (:mod:`.packing`)."""
    head_positions: Optional[torch.Tensor] = None
    """[T] flat positions (``row * s + column``) of the padded layout where the last stage computes the LM head
    (:mod:`.head_positions`): set by :func:`run_microbatches` with ``logits_at_responses``; the last stage's output
    is then [T, V/TP], those positions' logits in order."""

    def padded(self, output: torch.Tensor) -> torch.Tensor:
        """The last stage's ``output`` (:func:`model_forward`'s) in the padded [b, s, ...] layout (zeros on padding)."""
        return self.packing.unpack(output) if self.packing is not None else output

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def model_forward(model, micro: Microbatch) -> torch.Tensor:
    """One stage's forward. Returns [b, s, V/TP] logits (or values) on the last stage, hidden states [s, b, h]
    elsewhere. A packed micro-batch (one stage only) runs on its packed rows and returns the packed rows' output
    [R, W, ...]: read it with :meth:`Microbatch.padded` or ``sequence_logprobs(..., packing=micro.packing)``. With
    ``micro.head_positions`` the last stage returns [T, V/TP], the logits at those positions only."""
    plan = micro.packing
    if plan is not None:
        tokens, positions, blocked = plan.pack(micro.input_ids), plan.positions, plan.blocked_attention()
    else:
        tokens, positions = micro.input_ids, position_ids_for(micro.input_ids)
        blocked = blocked_attention(micro.attention_mask)
    with ExitStack() as scope:
        if plan is not None and plan.shares_prompts:
            scope.enter_context(rope_positions.at_positions(model, positions))
        if micro.head_positions is None:
            return model(tokens, positions, attention_mask=blocked)
        rows, width = tokens.shape
        flat = plan.packed_positions(micro.head_positions) if plan is not None else micro.head_positions
        hidden_index = (flat % width) * rows + flat // width  # [row, column] -> megatron's position-major [s, b]
        has_head = scope.enter_context(head_positions.selected(model, hidden_index))
        output = model(tokens, positions, attention_mask=blocked)
    return output[0] if has_head else output  # [1, T, V/TP] -> [T, V/TP]; hidden states before the last stage


def run_microbatches(
    model,
    microbatches: list[Microbatch],
    compute: ComputeFn,
    *,
    forward_only: bool,
    pack: bool = False,
    share_prompts: bool = False,
    logits_at_responses: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Forward (and backward unless ``forward_only``) over ``microbatches`` with megatron's
    pipeline schedule. All micro-batches must share one shape (pad them first).

    With ``pack`` and one pipeline stage, each micro-batch runs on packed rows where that saves positions
    (:mod:`.packing`; with ``share_prompts`` sequences with the same tokens before their ``extras["response_mask"]``
    share one copy of them); pipeline stages exchange fixed [s, b, h] shapes, so PP > 1 keeps the padded layout.

    ``compute(last_stage_output, microbatch) -> (loss, outputs)``. Gradients of ``loss``
    accumulate in ``.grad`` (megatron divides each micro-batch's loss by their number).
    Returns each micro-batch's ``outputs`` on the last stage, an empty list elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # deferred: heavy (megatron-core)

    if not microbatches:
        return []
    shapes = {tuple(m.input_ids.shape) for m in microbatches}
    if len(shapes) != 1:
        raise ValueError(f"all micro-batches must have one shape for the pipeline schedule; got {shapes}")
    batch, seq = microbatches[0].input_ids.shape
    if pack:
        from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

        if mpu.get_pipeline_model_parallel_world_size() == 1:
            for micro in microbatches:
                shared = share_prompts and "response_mask" in micro.extras
                micro.packing = plan_packing(micro.attention_mask, input_ids=micro.input_ids if shared else None,
                                             response_mask=micro.extras["response_mask"] if shared else None)
    if logits_at_responses and head_positions.can_select(model):
        for micro in microbatches:
            if "response_mask" not in micro.extras:
                raise ValueError("logits_at_responses needs each micro-batch's extras['response_mask']")
            micro.head_positions = head_positions.response_target_positions(micro.extras["response_mask"])

    def forward_step(data_iterator, stage_model):
        micro = next(data_iterator)
        output = model_forward(stage_model, micro)

        def loss_func(output_tensor):
            loss, outputs = compute(output_tensor, micro)
            return loss, outputs

        return output, loss_func

    forward_backward = get_forward_backward_func()
    collected = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=forward_only,
    )
    return list(collected)
