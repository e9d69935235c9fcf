"""DPO-family losses as pure functions in one registry.

Every loss takes the policy's and reference's summed response log-probs of each pair
(and the response token counts, for length-normalised losses) and returns per-pair
losses; :func:`compute_dpo_loss` also returns the implicit rewards TRL logs. Online and
offline DPO call the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed response log-probs [N] of each pair under the policy and the reference."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def sigmoid_loss(lp: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta * h), h = policy margin - reference margin.

    With ``label_smoothing`` e (conservative DPO, Mitchell 2023):
    -(1 - e) log sigma(beta h) - e log sigma(-beta h).
    """
    h = (lp.chosen - lp.rejected) - (lp.ref_chosen - lp.ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(lp: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:  # noqa: ARG001
    """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2 on length-averaged log-probs."""
    chosen, rejected = lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens
    ref_chosen, ref_rejected = lp.ref_chosen / lp.chosen_tokens, lp.ref_rejected / lp.rejected_tokens
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


LOSSES: dict[str, Callable[[PairLogps, float, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
}


@dataclass
class DPOLossOutput:
    losses: torch.Tensor
    """[N] per-pair loss."""
    chosen_rewards: torch.Tensor
    """[N] beta * (policy - reference) log-prob of the chosen response (detached)."""
    rejected_rewards: torch.Tensor
    """[N] same for the rejected response (detached)."""


def compute_dpo_loss(lp: PairLogps, loss_type: str, beta: float, label_smoothing: float = 0.0) -> DPOLossOutput:
    """Per-pair losses of ``loss_type`` and the implicit rewards."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(LOSSES)}")
    if bool((lp.chosen_tokens <= 0).any() | (lp.rejected_tokens <= 0).any()):
        raise ValueError("every chosen and rejected response needs at least one token")
    losses = LOSSES[loss_type](lp, beta, label_smoothing)
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * (lp.chosen - lp.ref_chosen)).detach(),
        rejected_rewards=(beta * (lp.rejected - lp.ref_rejected)).detach(),
    )
