"""Per-token log-probs, entropy and WPO's log sum p^2 from vocab-parallel logits, never gathering the vocabulary.

Under tensor parallelism each rank holds logits for a slice of the vocabulary
([b, s, V/TP]). Log-probs use megatron-core's ``vocab_parallel_cross_entropy`` (which
all-reduces only a max, a sum and the target logit per token); entropy all-reduces the
same three kinds of per-token scalars. Both are differentiable. With the whole vocabulary
on one rank (TP = 1) both come from one ``log_softmax`` instead (half the time of megatron's
in-place passes and our fp32 copy for them, forward and backward).

Alignment: ``token_logprobs[:, t]`` is log p(input_ids[:, t+1] | input_ids[:, :t+1]),
so it lines up with ``input_ids[:, 1:]`` and with ``response_mask[:, 1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from dpo_rl.workers.megatron.packing import PackPlan

if TYPE_CHECKING:
    from dpo_rl.workers.megatron.forward import Microbatch


def _tp_group():
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    return mpu.get_tensor_model_parallel_group()


def _whole_vocabulary_here() -> bool:
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    return mpu.get_tensor_model_parallel_world_size() == 1


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [..] of softmax(logits) where ``logits`` [.., V/TP] is this rank's vocab slice.

    H = log Z - sum_v p_v (z_v - m), with m the global max, Z = sum_v exp(z_v - m).
    Differentiable (the max is a constant shift and carries no gradient).
    """
    from megatron.core.tensor_parallel.mappings import (  # deferred: heavy (megatron-core)
        reduce_from_tensor_model_parallel_region,
    )

    logits = logits.float()
    local_max = logits.detach().amax(dim=-1, keepdim=True)
    torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=_tp_group())
    shifted = logits - local_max
    exp = shifted.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(dim=-1))
    weighted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(dim=-1))
    return sum_exp.log() - weighted / sum_exp


def vocab_parallel_log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 [..] of softmax(logits) (no gradient), ``logits`` [.., V/TP] this rank's vocab slice.

    With m the global max: log sum_v exp(2 (z_v - m)) - 2 log sum_v exp(z_v - m).
    """
    with torch.no_grad():
        logits = logits.float()
        local_max = logits.amax(dim=-1, keepdim=True)
        torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=_tp_group())
        shifted = logits - local_max
        sums = torch.stack([shifted.exp().sum(dim=-1), (2 * shifted).exp().sum(dim=-1)])
        torch.distributed.all_reduce(sums, group=_tp_group())
        return sums[1].log() - 2 * sums[0].log()


def vocab_parallel_token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) [b, t] from this rank's vocab slice of ``logits`` [b, t, V/TP].

    megatron's cross entropy works in place on its input, so it is given its own fp32
    copy in the [s, b, V/TP] layout it expects; ``logits`` is left untouched.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # deferred: heavy (megatron-core)

    seq_first = logits.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    loss = vocab_parallel_cross_entropy(seq_first, targets.transpose(0, 1).contiguous())
    return -loss.transpose(0, 1)


@dataclass
class SequenceLogprobs:
    """Log-probs of a batch of sequences, aligned with ``input_ids[:, 1:]``."""

    token_logprobs: torch.Tensor
    """[b, s-1] log p(input_ids[:, t+1]) where the target is a response token, 0 elsewhere."""
    mask: torch.Tensor
    """[b, s-1] float, 1 where the target token is a response token."""
    entropy: torch.Tensor | None = None
    """[b, s-1] entropy of the next-token distribution where the target is a response token (0 elsewhere),
    when asked for."""
    log_sum_sq_probs: torch.Tensor | None = None
    """[b, s-1] log sum_v p_v^2 of the next-token distribution where the target is a response token (0
    elsewhere; no gradient), when asked for: WPO's weights."""

    @property
    def summed(self) -> torch.Tensor:
        """[b] sum of response-token log-probs."""
        return (self.token_logprobs * self.mask).sum(dim=-1)

    @property
    def num_tokens(self) -> torch.Tensor:
        """[b] number of response tokens."""
        return self.mask.sum(dim=-1)

    def ld_summed(self, shared_tokens: torch.Tensor, alpha: float) -> torch.Tensor:
        """[b] LD-DPO's summed log-prob (Liu et al. 2024, arXiv:2409.06411, as TRL 1.16's ``ld_alpha``): the
        first ``shared_tokens`` [b] response tokens (the pair's shorter length) count fully, the rest ``alpha``."""
        rank = self.mask.cumsum(dim=-1)
        shared = self.mask * (rank <= shared_tokens[:, None].to(rank.dtype)).float()
        return (self.token_logprobs * shared).sum(-1) + alpha * (self.token_logprobs * (self.mask - shared)).sum(-1)

    def wpo_logps(self) -> torch.Tensor:
        """[b] WPO's aligned log-prob (Zhou et al. 2024, arXiv:2406.11827, eq. 2, as TRL 1.16): the mean over
        response tokens of log p(token) - log sum_v p_v^2, detached; exp of a pair's two is its weight."""
        if self.log_sum_sq_probs is None:
            raise ValueError("log_sum_sq_probs was not computed; pass with_sum_sq=True")
        aligned = ((self.token_logprobs - self.log_sum_sq_probs) * self.mask).sum(-1) / self.num_tokens.clamp(min=1)
        return aligned.detach()

    def mean_entropy(self) -> torch.Tensor:
        """[b] mean entropy over response positions (0 where a row has none)."""
        if self.entropy is None:
            raise ValueError("entropy was not computed; pass with_entropy=True")
        return (self.entropy * self.mask).sum(-1) / self.num_tokens.clamp(min=1)


def sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    with_entropy: bool = False,
    packing: Optional[PackPlan] = None,
    at_targets: bool = False,
    with_sum_sq: bool = False,
) -> SequenceLogprobs:
    """Response log-probs (and entropy) from last-stage logits: [b, s, V/TP], a packed micro-batch's
    [R, W, V/TP] rows with its ``packing`` plan, or (``at_targets``) [T, V/TP], the logits at
    :func:`.head_positions.response_target_positions` alone (an LM head computed there, :mod:`.head_positions`).

    ``response_mask`` [b, s] marks response tokens in ``input_ids``; the first token of a sequence is never a
    target. Only the positions that predict a response token are read (about a fifth of an online step's
    positions): the log-softmax, the entropy and their backward run over those rows alone.
    """
    batch, length = input_ids.shape
    targets = response_mask[:, 1:].bool()
    row, column = targets.nonzero(as_tuple=True)
    if at_targets:
        if logits.dim() != 2 or logits.shape[0] != len(row):
            raise ValueError(f"logits {tuple(logits.shape)} are not the {len(row)} response targets' [T, V] rows")
        picked = logits
    elif packing is not None:
        picked = packing.at_positions(logits, row * length + column)
    elif tuple(logits.shape[:2]) != (batch, length):
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}; packed "
                         "logits need the micro-batch's plan (packing=micro.packing)")
    else:
        picked = logits.reshape(batch * length, logits.shape[-1])[row * length + column]
    target_ids = input_ids[row, column + 1]
    if _whole_vocabulary_here():
        log_probs = picked.float().log_softmax(dim=-1)
        picked_logprobs = log_probs.gather(-1, target_ids[:, None])[:, 0]
        picked_entropy = -(log_probs.exp() * log_probs).sum(dim=-1) if with_entropy else None
        picked_sum_sq = torch.logsumexp(2 * log_probs.detach(), dim=-1) if with_sum_sq else None
    else:
        picked_logprobs = vocab_parallel_token_logprobs(picked[None], target_ids[None])[0]
        picked_entropy = vocab_parallel_entropy(picked) if with_entropy else None
        picked_sum_sq = vocab_parallel_log_sum_sq_probs(picked) if with_sum_sq else None

    def spread(values: torch.Tensor) -> torch.Tensor:  # [T] at the response targets -> [b, s-1], 0 elsewhere
        return values.new_zeros(batch, length - 1).index_put((row, column), values)

    return SequenceLogprobs(
        token_logprobs=spread(picked_logprobs.float()),
        mask=targets.float(),
        entropy=spread(picked_entropy.float()) if picked_entropy is not None else None,
        log_sum_sq_probs=spread(picked_sum_sq.float()) if picked_sum_sq is not None else None,
    )


def microbatch_logprobs(output: torch.Tensor, micro: "Microbatch", *, with_entropy: bool = False,
                        with_sum_sq: bool = False) -> SequenceLogprobs:
    """:func:`sequence_logprobs` of a micro-batch's last-stage ``output`` in whichever layout its forward gave
    (padded, packed, or the LM head at the response targets)."""
    return sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"], with_entropy=with_entropy,
                             packing=micro.packing, at_targets=micro.head_positions is not None,
                             with_sum_sq=with_sum_sq)


@dataclass
class LogprobGap:
    """How far a rollout engine's log-probs of the sampled tokens are from the trainer's, per sequence."""

    abs_sum: torch.Tensor
    """[b] sum over measured tokens of |trainer - rollout|."""
    tokens: torch.Tensor
    """[b] measured tokens."""
    max: torch.Tensor
    """[b] largest per-token |trainer - rollout| (0 where none is measured)."""
    sequence_abs: torch.Tensor
    """[b] |sum of trainer log-probs - sum of rollout log-probs| over the measured tokens."""


def logprob_gap(trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> LogprobGap:
    """Compare per-token log-probs ``trainer`` and ``rollout`` [b, t] (aligned alike) where ``mask`` [b, t] is 1."""
    mask = mask.to(trainer.dtype)
    diff = (trainer.detach() - rollout.to(trainer.dtype)) * mask
    return LogprobGap(abs_sum=diff.abs().sum(-1), tokens=mask.sum(-1), max=diff.abs().amax(-1),
                      sequence_abs=diff.sum(-1).abs())
