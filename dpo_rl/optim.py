"""Learning-rate schedule (pure), parameter groups and the trained roles' optimizer."""

from __future__ import annotations

import math

import torch


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


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's named parameter groups over the trainable parameters.

    ``decay``: matrices (weight decay applies); ``no_decay``: biases, norm weights and other
    1-D parameters (Megatron's and HF Trainer's convention). Frozen parameters
    (``requires_grad=False``) are in no group. An adapter method (LoRA, a later issue) adds
    its own group here and freezes the base, and nothing else changes.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, role, total_iters: int):
    """AdamW over :func:`parameter_groups` and its LambdaLR schedule (stepped once per training
    iteration, over ``total_iters`` of them) from a RoleConfig."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, role.weight_decay),
        lr=role.lr,
        betas=(role.adam_beta1, role.adam_beta2),
        eps=role.adam_eps,
    )
    min_ratio = role.min_lr / role.lr if role.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup=role.lr_warmup_iters, total=total_iters,
                               style=role.lr_decay_style, min_ratio=min_ratio),
    )
    return optimizer, scheduler
