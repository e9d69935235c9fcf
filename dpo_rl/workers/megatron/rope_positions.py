"""Rotary embeddings at given position ids.

megatron-core's ``GPTModel`` rotates query and key ``t`` of a row by ``t`` itself: its ``RotaryEmbedding`` is
called with the sequence length and returns the angles of positions ``0..s-1`` (``[s, 1, 1, d]``, the same for
every row); the ``position_ids`` argument feeds learned absolute embeddings only. That is right for padded rows
and for packed rows where each sequence is contiguous (attention under RoPE depends on the distance between two
tokens alone). A packed span that shares one prompt among several continuations (:mod:`.packing`) puts the second
continuation after the first, so its distance to the prompt is not its sequence's: there each token needs the
angle of its own position.

:func:`install` adds a forward hook to the model's ``RotaryEmbedding``; inside :func:`at_positions` it returns the
angles of the given ``[b, s]`` positions instead, ``[s, b, 1, d]`` (megatron's unfused rotary application
broadcasts per row, as it does for multimodal RoPE; ``apply_rope_fusion`` is off in every model built here),
computed as megatron computes its own (the same product of position and inverse frequency, the same layout).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_ATTRIBUTE = "_dpo_rl_rope_positions"


def angles(rope, positions: torch.Tensor) -> torch.Tensor:
    """Rotary angles [s, b, 1, d] of ``positions`` [b, s] under ``rope`` (a megatron ``RotaryEmbedding``)."""
    inv_freq = rope.inv_freq
    seq = positions.to(device=inv_freq.device, dtype=inv_freq.dtype)
    if rope.seq_len_interpolation_factor is not None:
        seq = seq * (1 / rope.seq_len_interpolation_factor)
    freqs = seq[..., None] * inv_freq  # [b, s, d/2]
    if not rope.rotary_interleaved:
        emb = torch.cat((freqs, freqs), dim=-1)
    else:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    return emb.transpose(0, 1)[:, :, None, :]


def _replace(rope, args, output):
    positions: Optional[torch.Tensor] = getattr(rope, _ATTRIBUTE)
    return None if positions is None else angles(rope, positions)


def install(gpt) -> None:
    """Let :func:`at_positions` set the positions ``gpt``'s rotary embedding rotates by (no-op without one)."""
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None or not hasattr(rope, "inv_freq") or hasattr(rope, _ATTRIBUTE):
        return
    setattr(rope, _ATTRIBUTE, None)
    rope.register_forward_hook(_replace)


@contextmanager
def at_positions(model, positions: torch.Tensor) -> Iterator[None]:
    """During the block, ``model`` (possibly DDP-wrapped) rotates each token by its own ``positions`` [b, s]."""
    ropes = [m for m in model.modules() if hasattr(m, _ATTRIBUTE)]
    if not ropes and any(hasattr(m, "inv_freq") for m in model.modules()):
        raise RuntimeError("this model's rotary embedding was built without rope_positions.install")
    for rope in ropes:
        setattr(rope, _ATTRIBUTE, positions)
    try:
        yield
    finally:
        for rope in ropes:
            setattr(rope, _ATTRIBUTE, None)
