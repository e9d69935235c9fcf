"""The learning-rate schedule, a pure function of the training iteration.

The optimizer itself is megatron-core's (:mod:`dpo_rl.workers.megatron.optimizer`), which applies
this schedule to its parameter groups.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup: int, total: int, style: str, min_ratio: float) -> float:
    """Multiplier of the peak LR in training iteration ``step`` (0-based).

    Linear warm-up over ``warmup`` iterations, then ``constant``, ``linear`` or ``cosine``
    decay to ``min_ratio`` at ``total``. The schedule counts training iterations, which
    always happen, rather than optimizer steps, whose number per online iteration depends on
    how many pairs survive pairing (ties and margins drop some): so the decay ends at
    ``min_ratio`` on the last iteration however many pairs were dropped.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if style == "linear":
        decay = 1.0 - progress
    elif style == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr_decay_style {style!r}")
    return min_ratio + (1.0 - min_ratio) * decay
