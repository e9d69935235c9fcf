"""Build (chosen, rejected) pairs from scored samples: pure functions, no tensors moved (and
:class:`LatePairing`, the same pairing applied by an update that started before the scores came).

Samples come in groups of ``n`` per prompt (``prompt_index``). Strategies:

* ``best_vs_worst`` — one pair per prompt: the highest score against the lowest.
* ``all_pairs`` — every pair of distinct samples, higher score chosen.

Scores are first lowered by the missing-EOS penalty and the length penalty (:class:`PairingRule`). A
pair whose score gap is below ``min_score_margin`` is dropped; an exact tie is dropped
(``tie_policy: skip``) or kept with a seeded random orientation (``random``). Every drop
is counted in :class:`Pairs`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

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


def length_penalty(response_lengths: torch.Tensor, per_token: float, target: int) -> torch.Tensor:
    """[S] ``per_token`` x the response tokens beyond ``target`` of each sample (0 at or below it)."""
    return per_token * (response_lengths.float() - target).clamp(min=0)


@dataclass(frozen=True)
class PairingRule:
    """How a step's scored samples become pairs: the missing-EOS and length penalties on the scores, then
    :func:`build_pairs`. The driver and, when the update starts before the scores are in, the actor
    apply the same rule to the same scores, so both see the same pairs."""

    strategy: str
    min_score_margin: float
    tie_policy: str
    missing_eos_penalty: float
    seed: int
    length_penalty: float = 0.0
    """Subtracted per response token beyond ``length_penalty_target``."""
    length_penalty_target: int = 0

    def penalized(self, scores: torch.Tensor, ended_with_eos: torch.Tensor,
                  response_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        penalized = scores - self.missing_eos_penalty * (~ended_with_eos.bool()).float()
        if self.length_penalty:
            if response_lengths is None:
                raise ValueError("a length penalty needs the samples' response lengths")
            penalized = penalized - length_penalty(response_lengths, self.length_penalty, self.length_penalty_target)
        return penalized

    def pairs(self, scores: torch.Tensor, ended_with_eos: torch.Tensor, prompt_index: torch.Tensor,
              response_lengths: Optional[torch.Tensor] = None) -> Pairs:
        return build_pairs(self.penalized(scores, ended_with_eos, response_lengths), prompt_index,
                           strategy=self.strategy, min_score_margin=self.min_score_margin, tie_policy=self.tie_policy,
                           seed=self.seed)


def prompt_pairs(prompt_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) sample of each prompt, prompts ascending, for a step of exactly two samples per
    prompt: its only possible pairs before the scores say which side is chosen (:func:`orient`)."""
    order = torch.argsort(prompt_index, stable=True)
    counts = torch.bincount(prompt_index)
    if bool((counts[counts > 0] != 2).any()):
        raise ValueError("prompt_pairs needs exactly two samples per prompt")
    return order[0::2], order[1::2]


def shared_response_tokens(response_mask: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[S] for LD-DPO: each paired sample's pair's shorter response length (response tokens that are log-prob
    targets, ``response_mask[:, 1:]``), for pairs (``first[i]``, ``second[i]``); 0 for unpaired samples. A
    sample may be in one pair only (its log-prob is summed once)."""
    index = torch.cat([first, second])
    if len(torch.unique(index)) != len(index):
        raise ValueError("LD-DPO sums each sample's log-probs once, for its one pair; a sample is in several pairs "
                         "(algorithm.pairing_strategy: all_pairs); use best_vs_worst or set algorithm.ld_alpha: null")
    lengths = response_mask[:, 1:].sum(-1)
    shared = torch.minimum(lengths[first], lengths[second])
    return torch.zeros_like(lengths).index_put_((index,), torch.cat([shared, shared]))


def orient(first: torch.Tensor, second: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidate pairs (``first[i]``, ``second[i]``) and the pairs the scores gave: ``kept`` [C] (the
    candidate is a pair) and ``swapped`` [C] (its chosen side is ``second``)."""
    rejected_of = dict(zip(pairs.chosen.tolist(), pairs.rejected.tolist()))
    a, b = first.tolist(), second.tolist()
    forward = [rejected_of.get(x) == y for x, y in zip(a, b)]
    backward = [rejected_of.get(y) == x for x, y in zip(a, b)]
    kept = torch.tensor([f or r for f, r in zip(forward, backward)], dtype=torch.bool)
    return kept, torch.tensor(backward, dtype=torch.bool)


@dataclass
class LatePairing:
    """The pairing of an update that starts before the reward's scores are in (two samples per prompt).

    The update's rows are each prompt's two samples as (``chosen_*`` = first, ``rejected_*`` = second),
    laid out in mini-batches as pairs are; its forward runs while the reward model scores. When the first
    loss needs them, :meth:`resolve` reads the scores (``scores``: anything whose ``resolve()`` gives the
    reward call's result, a Ray ``Deferred`` in a run), applies ``rule`` to every sample of the step as the
    driver does, and says per row which side is chosen and the row's weight: 1 / the pairs kept in its
    mini-batch, 0 for a prompt whose pair was dropped (tie, margin) and for layout padding. Every rank
    holds the whole layout (``first``, ``minibatch``, ``laid_out`` over all DP ranks' rows), so all of
    them agree on which mini-batches keep a pair (:meth:`pairs_in`) without a collective.
    """

    scores: object
    rule: PairingRule
    prompt_index: torch.Tensor
    """[S] every sample's prompt."""
    ended_with_eos: torch.Tensor
    """[S] every sample's EOS flag (the missing-EOS penalty)."""
    first: torch.Tensor
    """[R] the laid-out rows' first sample (``chosen_sample`` before orientation), every DP rank's rows."""
    second: torch.Tensor
    """[R] their second sample."""
    minibatch: torch.Tensor
    """[R] the rows' mini-batch."""
    laid_out: torch.Tensor
    """[R] bool: a real row of the layout (not padding added for an even split)."""
    response_lengths: Optional[torch.Tensor] = None
    """[S] every sample's response tokens (the length penalty; needed when the rule has one)."""

    def __post_init__(self) -> None:
        self._resolved: tuple | None = None

    def resolve(self) -> tuple[Pairs, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the step's pairs, ``swapped`` [S] and ``kept`` [S] indexed by a row's first sample, pairs kept per
        mini-batch id); waits for the scores the first time."""
        if self._resolved is None:
            scores = self.scores.resolve()["scores"].detach().to("cpu")
            pairs = self.rule.pairs(scores, self.ended_with_eos, self.prompt_index, self.response_lengths)
            kept, swapped = orient(self.first, self.second, pairs)
            per_minibatch = torch.bincount(self.minibatch[kept & self.laid_out],
                                           minlength=int(self.minibatch.max()) + 1)
            samples = len(self.prompt_index)
            by_first_swapped = torch.zeros(samples, dtype=torch.bool).index_put_((self.first,), swapped)
            by_first_kept = torch.zeros(samples, dtype=torch.bool).index_put_((self.first,), kept)
            self._resolved = (pairs, by_first_swapped, by_first_kept, per_minibatch)
        return self._resolved

    def rows(self, first: torch.Tensor, minibatch: torch.Tensor,
             weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows with first samples ``first``, mini-batches ``minibatch`` and layout weights ``weight`` (0 on
        padding): (``swapped``, the rows' weights after pairing: 1 / pairs kept in the row's mini-batch)."""
        _, swapped, kept, per_minibatch = self.resolve()
        at, mb = first.to("cpu"), minibatch.to("cpu")
        real = (weight.to("cpu") > 0) & kept[at]
        new_weight = torch.where(real, 1.0 / per_minibatch[mb].clamp(min=1).float(), 0.0)
        return swapped[at].to(weight.device), new_weight.to(weight.device, weight.dtype)

    def pairs_in(self, minibatch: int) -> int:
        """Pairs the scores kept in mini-batch ``minibatch``."""
        per_minibatch = self.resolve()[3]
        return int(per_minibatch[minibatch]) if minibatch < len(per_minibatch) else 0
