"""Batched sampling from a GPTModel with megatron-core's static KV cache, under TP.

Prompts of different lengths are left-padded into one [b, P] block. With the KV cache
the prompt is run once (prefill) into a ``StaticInferenceContext`` and each new token
attends to the cached keys/values; without it every step recomputes the whole sequence
(the reference path the tests compare against). Each step gathers only the *last
position's* logits over TP, samples on every TP rank with the same seeded generator and
broadcasts TP rank 0's tokens, so all ranks agree.

Sampling: greedy (``do_sample=False``) or temperature / top-k / top-p. A sequence stops
at the first of any ``eos_token_ids``; later positions are padding. The returned
``rollout_logprobs`` are the log-probs of each chosen token under the model's own
distribution (log-softmax of the raw logits, before temperature and filtering): what the
trainer computes for the same tokens, so the two can be compared (vLLM's ``raw_logprobs``). The global torch RNG is never touched: a dedicated generator is seeded from
``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from dpo_rl.batch import left_pad
from dpo_rl.config.resolution import ROLE_SECTIONS, sampling_problems
from dpo_rl.workers.megatron.forward import blocked_attention, position_ids_for


@dataclass
class SamplingParams:
    """How to sample (one object for the whole batch)."""

    max_new_tokens: int = 32
    """Upper bound on generated tokens per sequence."""
    do_sample: bool = True
    """Sample; ``False`` means greedy decoding."""
    temperature: float = 1.0
    """Softmax temperature (> 0) when sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = no limit)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0 = no limit)."""
    eos_token_ids: Sequence[int] = field(default_factory=tuple)
    """Generation stops at the first of any of these ids."""
    pad_token_id: int = 0
    """Id written after a sequence ended and used for left padding."""
    seed: int = 0
    """Seed of the sampler's own generator."""

    def check(self) -> list[str]:
        """Problems with these parameters, named by the actor's settings they come from (resolution checks the same
        settings before anything starts)."""
        return sampling_problems(self.max_new_tokens, self.do_sample, self.temperature, self.top_k, self.top_p)


@dataclass
class GenerationOutput:
    """What :func:`generate` returns (shapes for batch b, prompt block P, N new tokens)."""

    sequences: torch.Tensor
    """[b, P+N] left-padded prompt followed by the response (padding after EOS)."""
    attention_mask: torch.Tensor
    """[b, P+N] 1 for real prompt and response tokens."""
    response_mask: torch.Tensor
    """[b, P+N] 1 for response tokens (EOS included)."""
    rollout_logprobs: torch.Tensor
    """[b, N] log-prob of each generated token under the model's raw distribution (0 after EOS)."""
    ended_with_eos: torch.Tensor
    """[b] bool, True when the response stopped at an EOS token."""
    prompt_length: int
    """P, the width of the left-padded prompt block."""

    @property
    def responses(self) -> torch.Tensor:
        """[b, N] the generated block."""
        return self.sequences[:, self.prompt_length :]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. ``logits`` [b, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (keeps at least one).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of ``logits`` [b, V] (``-inf`` = never), drawn with probability softmax(logits).

    Inverse-CDF sampling: one uniform number per row against the running sum of the weights
    (in float64, so a 150k vocabulary's small probabilities keep their mass). Same
    distribution as ``torch.multinomial``, which draws an exponential for every vocabulary
    entry (on CPU that was 0.75 ms of a 7 ms decode step at 32 x 1024).
    """
    weights = (logits - logits.amax(dim=-1, keepdim=True)).double().exp()
    cumulative = weights.cumsum(dim=-1)
    draw = torch.rand((logits.shape[0], 1), generator=generator, device=logits.device, dtype=torch.float64)
    last = logits.shape[-1] - 1
    tokens = torch.searchsorted(cumulative, draw * cumulative[:, -1:], right=True)[:, 0].clamp_(max=last)
    # A draw that rounds up to the total lands past the end (clamped to the last token): if that token has
    # no weight, take the last one that has.
    landed_on_nothing = weights.gather(-1, tokens[:, None])[:, 0] == 0
    if bool(landed_on_nothing.any()):
        last_allowed = last - (weights.flip(-1) > 0).long().argmax(dim=-1)
        tokens = torch.where(landed_on_nothing, last_allowed, tokens)
    return tokens


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from full-vocabulary logits [b, V]; return (tokens, logprobs).

    Raises ``FloatingPointError`` when a logit is NaN or +inf (the weights have diverged): the driver
    stops the run naming the step (``training.on_nonfinite``) instead of failing inside sampling.
    The check reads the chosen tokens' log-probs: a NaN or +inf logit makes every log-prob of its
    row NaN (or -inf), so no full-vocabulary scan is added to each decode step.
    """
    logits = logits.float()
    logprobs = logits.log_softmax(dim=-1)
    if not params.do_sample:
        tokens = logits.argmax(dim=-1)
    else:
        scaled = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        tokens = sample_from_logits(scaled, generator)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    if not bool(torch.isfinite(chosen).all()):
        raise FloatingPointError("the policy's logits are NaN or inf while sampling: its weights have diverged")
    return tokens, chosen


def _last_token_logits_full_vocab(model, ids, mask, context) -> torch.Tensor:
    """Full-vocabulary logits of the last position [b, V] (TP-gathered for that position only)."""
    from megatron.core.tensor_parallel.mappings import (  # deferred: heavy (megatron-core)
        gather_from_tensor_model_parallel_region,
    )

    if context is not None:
        query_len = ids.shape[1]
        full_mask = mask
        positions = torch.arange(
            context.sequence_len_offset, context.sequence_len_offset + query_len, device=ids.device
        ).expand(ids.shape[0], query_len)
        logits = model(
            ids,
            positions,
            attention_mask=blocked_attention(full_mask, query_len=query_len),
            inference_context=context,
            runtime_gather_output=True,
        )
        context.increment_sequence_len_offset(query_len)
        return logits[:, -1, :]
    logits = model(ids, position_ids_for(ids), attention_mask=blocked_attention(mask))
    return gather_from_tensor_model_parallel_region(logits[:, -1, :].contiguous())


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    use_kv_cache: bool = True,
    device: torch.device | str = "cpu",
) -> GenerationOutput:
    """Sample responses for ``prompts`` (token id lists). Collective over the TP group.

    Runs under ``torch.inference_mode``; the returned tensors are ordinary tensors, usable
    as inputs to a training forward. Pipeline parallelism is not supported here: rollout
    ranks run TP only.
    """
    with torch.inference_mode():
        out = _generate(model, prompts, params, use_kv_cache=use_kv_cache, device=device)
    return GenerationOutput(
        **{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(out).items()}
    )


def _generate(model, prompts, params, *, use_kv_cache, device) -> GenerationOutput:
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)
    from megatron.core.inference.contexts import StaticInferenceContext  # deferred: heavy (megatron-core)

    problems = params.check()
    if problems:
        raise ValueError("bad sampling parameters: " + "; ".join(problems))
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError(f"generate() runs on TP-only rollout ranks; {ROLE_SECTIONS['actor_rollout']}."
                         "pipeline_model_parallel_size must be 1 where the actor samples on its training ranks")
    was_training = model.training
    model.eval()
    prompt_ids, prompt_mask = left_pad(prompts, params.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch, prompt_len = prompt_ids.shape
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.do_sample else None
    eos = torch.as_tensor(list(params.eos_token_ids), dtype=torch.long, device=device)
    context = StaticInferenceContext(batch, prompt_len + params.max_new_tokens) if use_kv_cache else None

    tokens_out = torch.full((batch, params.max_new_tokens), params.pad_token_id, dtype=torch.long, device=device)
    logprobs_out = torch.zeros((batch, params.max_new_tokens), device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    ended_with_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    # The rows in the decode batch: their original row numbers, ids (whole sequences) and masks. A row
    # that stops is marked finished (its later tokens are dropped) and leaves the batch and the KV cache
    # once a quarter of the batch has finished, so later steps stop computing it without a cache copy
    # after every stop.
    rows = torch.arange(batch, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ids, mask = prompt_ids, prompt_mask
    step_ids = ids
    steps = 0
    for step in range(params.max_new_tokens):
        if step == 0 and context is not None:
            logits = _prefill_distinct_prompts(model, ids, mask, context)
        else:
            logits = _last_token_logits_full_vocab(model, step_ids, mask, context)
        tokens, logprobs = choose_tokens(logits, params, generator)
        tokens = _agree_across_tp(tokens)
        going = ~finished
        tokens_out[rows[going], step] = tokens[going]
        logprobs_out[rows[going], step] = logprobs[going]
        lengths[rows[going]] = step + 1
        steps = step + 1
        stopped = going & torch.isin(tokens, eos)
        ended_with_eos[rows[stopped]] = True
        finished |= stopped
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(tokens)[:, None]], dim=1)
        done = int(finished.sum())
        if done == len(rows):
            break
        if done and done * 4 >= len(rows):
            keep = ~finished
            rows, ids, mask, tokens, finished = rows[keep], ids[keep], mask[keep], tokens[keep], finished[keep]
            if context is not None:
                _select_cache_rows(context, keep)
        step_ids = tokens[:, None] if use_kv_cache else ids
    model.train(was_training)
    response_mask = (torch.arange(steps, device=device)[None, :] < lengths[:, None]).long()
    responses = torch.where(response_mask.bool(), tokens_out[:, :steps], params.pad_token_id)
    return GenerationOutput(
        sequences=torch.cat([prompt_ids, responses], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1),
        rollout_logprobs=logprobs_out[:, :steps] * response_mask,
        ended_with_eos=ended_with_eos,
        prompt_length=prompt_len,
    )


def _prefill_distinct_prompts(model, ids, mask, context) -> torch.Tensor:
    """Prefill each distinct prompt once (the n responses of a prompt share it), then give every row its
    prompt's KV cache; returns every row's first logits [b, V]."""
    rows = torch.cat([ids, mask], dim=1)
    distinct, which = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return _last_token_logits_full_vocab(model, ids, mask, context)
    order = torch.arange(len(rows), device=ids.device)
    first = torch.full((len(distinct),), len(rows), dtype=torch.long, device=ids.device).scatter_reduce(
        0, which, order, reduce="amin")
    logits = _last_token_logits_full_vocab(model, ids[first], mask[first], context)
    _select_cache_rows(context, which)
    return logits[which]


def _select_cache_rows(context, index: torch.Tensor) -> None:
    """Keep (bool ``index``) or gather (long ``index``) rows of the static KV cache: megatron's attention
    writes and reads the first ``rows`` batch entries of each layer's [s, b, heads, dim] memory, so the
    rows still decoding (a stopped row leaves the batch) must be those entries, in order. Only the filled
    positions are copied (megatron writes each later position before reading it)."""
    filled = context.sequence_len_offset
    for layer, memories in context.key_value_memory_dict.items():
        selected = []
        for memory in memories:
            kept = memory[:filled, index]
            fresh = memory.new_empty(memory.shape[0], kept.shape[1], *memory.shape[2:])
            fresh[:filled] = kept
            selected.append(fresh)
        context.key_value_memory_dict[layer] = tuple(selected)


def _agree_across_tp(tokens: torch.Tensor) -> torch.Tensor:
    """Make every TP rank use TP rank 0's tokens (guards against ties broken differently)."""
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    if mpu.get_tensor_model_parallel_world_size() == 1:
        return tokens
    dist.broadcast(tokens, src=mpu.get_tensor_model_parallel_src_rank(), group=mpu.get_tensor_model_parallel_group())
    return tokens
