"""Learning-rate schedule (pure) and the actor's optimizer."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup: int, total: int, style: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then ``constant``, ``linear`` or ``cosine`` decay
    to ``min_ratio`` at ``total``.
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


def build_optimizer(model: torch.nn.Module, role, total_steps: int):
    """AdamW over the model's parameters and its LambdaLR schedule from a RoleConfig.

    Parameters are one group today; LoRA (a later issue) adds its own group here.
    """
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=role.lr,
        betas=(role.adam_beta1, role.adam_beta2),
        eps=role.adam_eps,
        weight_decay=role.weight_decay,
    )
    min_ratio = role.min_lr / role.lr if role.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup=role.lr_warmup_iters, total=total_steps,
                               style=role.lr_decay_style, min_ratio=min_ratio),
    )
    return optimizer, scheduler
