"""The LM head at chosen positions only.

A DPO or SFT loss reads the logits that predict response tokens (on the tiny world's online step about a third
of the real tokens, fewer where prompts are long). ``GPTModel`` computes its output layer at every
position, an ``[s, b, V/TP]`` product and activation, and the loss then picks the rows it reads. Here a forward
pre-hook on the output layer (installed once, :func:`install`) picks those positions' hidden states first, so the
head's GEMM, its activation and their backward cover the picked positions only: the model returns ``[1, T, V/TP]``
for ``T`` picked positions, in the order given. Everything else of the model is untouched (the head's parameters,
its checkpoint layout, its weight tying).

:func:`selected` sets the positions around one forward: indices into the ``[s * b]`` hidden states that
megatron's layout puts the head's input in (position-major). The head sees whole hidden states only without
sequence parallelism (with it each TP rank holds a slice of the positions), so :func:`can_select` is false
there and callers compute every position.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_ATTRIBUTE = "_dpo_rl_head_positions"


def _pick(head, args, kwargs):
    positions: Optional[torch.Tensor] = getattr(head, _ATTRIBUTE)
    if positions is None:
        return None
    hidden = args[0]  # [s, b, h]
    picked = hidden.reshape(-1, hidden.shape[-1])[positions].unsqueeze(1)  # [T, 1, h]
    return (picked, *args[1:]), kwargs


def install(gpt) -> None:
    """Let :func:`selected` pick the positions ``gpt``'s LM head computes (a no-op on a stage without the head)."""
    head = getattr(gpt, "output_layer", None)
    if head is None or hasattr(head, _ATTRIBUTE):
        return
    setattr(head, _ATTRIBUTE, None)
    head.register_forward_pre_hook(_pick, with_kwargs=True)


def response_target_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """[T] flat positions (``row * s + column``) of a [b, s] layout whose logits predict a response token
    (row-major), the rows :func:`.logprobs.sequence_logprobs` reads."""
    row, column = response_mask[:, 1:].bool().nonzero(as_tuple=True)
    return row * response_mask.shape[1] + column


def _heads(model) -> list:
    return [m for m in model.modules() if hasattr(m, _ATTRIBUTE)]


def can_select(model) -> bool:
    """Whether :func:`selected` works on ``model`` (possibly DDP-wrapped): true on a pipeline stage without an
    output layer (it has nothing to pick); false where the output layer was not given :func:`install` (a value
    head) or is sequence-parallel (its input is this rank's slice of the positions)."""
    heads = _heads(model)
    if not heads:
        return not any(name.split(".")[-1] == "output_layer" for name, _ in model.named_modules())
    return not any(getattr(head, "sequence_parallel", False) for head in heads)


@contextmanager
def selected(model, positions: torch.Tensor) -> Iterator[bool]:
    """During the block, ``model``'s LM head computes only at ``positions`` [T] (long, indices into its input's
    flattened ``[s * b]`` positions), and the model returns ``[1, T, V/TP]``. Yields whether this pipeline stage
    holds the head."""
    heads = _heads(model)
    for head in heads:
        setattr(head, _ATTRIBUTE, positions)
    try:
        yield bool(heads)
    finally:
        for head in heads:
            setattr(head, _ATTRIBUTE, None)
