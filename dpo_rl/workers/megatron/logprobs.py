"""Per-token log-probs and entropy from vocab-parallel logits, never gathering the vocabulary.

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

import torch


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
    """[b, s-1] log p(input_ids[:, t+1]) for every position."""
    mask: torch.Tensor
    """[b, s-1] float, 1 where the target token is a response token."""
    entropy: torch.Tensor | None = None
    """[b, s-1] entropy of the next-token distribution, when asked for (at TP = 1 computed at response
    positions only, 0 elsewhere: the mean over the response is what is read)."""

    @property
    def summed(self) -> torch.Tensor:
        """[b] sum of response-token log-probs."""
        return (self.token_logprobs * self.mask).sum(dim=-1)

    @property
    def num_tokens(self) -> torch.Tensor:
        """[b] number of response tokens."""
        return self.mask.sum(dim=-1)

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
) -> SequenceLogprobs:
    """Response log-probs (and entropy) from last-stage logits [b, s, V/TP].

    ``response_mask`` [b, s] marks response tokens in ``input_ids``; the first token of
    a sequence is never a target.
    """
    shifted = logits[:, :-1, :]
    if _whole_vocabulary_here():
        log_probs = shifted.float().log_softmax(dim=-1)
        token_logprobs = log_probs.gather(-1, input_ids[:, 1:, None])[..., 0]
        entropy = _response_entropy(log_probs, response_mask[:, 1:].bool()) if with_entropy else None
    else:
        entropy = vocab_parallel_entropy(shifted) if with_entropy else None
        token_logprobs = vocab_parallel_token_logprobs(shifted, input_ids[:, 1:])
    return SequenceLogprobs(
        token_logprobs=token_logprobs,
        mask=response_mask[:, 1:].to(token_logprobs.dtype),
        entropy=entropy,
    )


def _response_entropy(log_probs: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """[b, s-1] entropy where ``response`` is true (0 elsewhere) from log-probs [b, s-1, V]: a third of the
    positions of an online step's rows, and of the exp and product over the vocabulary."""
    picked = log_probs[response]
    return log_probs.new_zeros(response.shape).masked_scatter(response, -(picked.exp() * picked).sum(dim=-1))


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
