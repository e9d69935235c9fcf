"""Build (chosen, rejected) pairs from scored samples: pure functions, no tensors moved.

Samples come in groups of ``n`` per prompt (``prompt_index``). Strategies:

* ``best_vs_worst`` — one pair per prompt: the highest score against the lowest.
* ``all_pairs`` — every pair of distinct samples, higher score chosen.

A pair whose score gap is below ``min_score_margin`` is dropped; an exact tie is dropped
(``tie_policy: skip``) or kept with a seeded random orientation (``random``). Every drop
is counted in :class:`Pairs`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class Pairs:
    """Sample indices of each pair, and what was dropped."""

    chosen: torch.Tensor
    """[N] index of the chosen sample."""
    rejected: torch.Tensor
    """[N] index of the rejected sample."""
    candidates: int
    """Pairs considered before dropping."""
    ties: int
    """Candidates whose scores were exactly equal."""
    dropped_ties: int
    """Ties dropped (tie_policy skip)."""
    dropped_margin: int
    """Non-tied candidates dropped for a gap below min_score_margin."""

    def __len__(self) -> int:
        return int(self.chosen.numel())

    @property
    def tie_rate(self) -> float:
        return self.ties / self.candidates if self.candidates else 0.0


def build_pairs(
    scores: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    strategy: str = "best_vs_worst",
    min_score_margin: float = 0.0,
    tie_policy: str = "skip",
    seed: int = 0,
) -> Pairs:
    """Pairs from ``scores`` [S] of samples grouped by ``prompt_index`` [S] (sorted groups not required)."""
    if strategy not in ("best_vs_worst", "all_pairs"):
        raise ValueError(f"unknown algorithm.pairing_strategy {strategy!r}")
    if tie_policy not in ("skip", "random"):
        raise ValueError(f"unknown algorithm.tie_policy {tie_policy!r}")
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = [], []
    candidates = ties = dropped_ties = dropped_margin = 0
    for prompt in torch.unique(prompt_index, sorted=True).tolist():
        members = torch.nonzero(prompt_index == prompt).flatten().tolist()
        if strategy == "best_vs_worst":
            ordered = sorted(members, key=lambda i: (-float(scores[i]), i))
            candidate_pairs = [(ordered[0], ordered[-1])] if len(ordered) > 1 else []
        else:
            candidate_pairs = list(itertools.combinations(members, 2))
        for a, b in candidate_pairs:
            candidates += 1
            gap = float(scores[a] - scores[b])
            if gap == 0.0:
                ties += 1
                if tie_policy == "skip" or min_score_margin > 0:
                    dropped_ties += 1
                    continue
                if torch.rand((), generator=generator) < 0.5:
                    a, b = b, a
            elif abs(gap) < min_score_margin:
                dropped_margin += 1
                continue
            elif gap < 0:
                a, b = b, a
            chosen.append(a)
            rejected.append(b)
    return Pairs(
        chosen=torch.tensor(chosen, dtype=torch.long),
        rejected=torch.tensor(rejected, dtype=torch.long),
        candidates=candidates,
        ties=ties,
        dropped_ties=dropped_ties,
        dropped_margin=dropped_margin,
    )
