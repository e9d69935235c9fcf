"""Sampling started before the step that trains on it, and how stale it may be (``algorithm.max_staleness``).

Online DPO samples every step's responses from the actor. Two ways start that sampling early:

- a colocated actor queues step k+1's sampling right behind step k's update (Ray runs one actor's calls in
  order), so it samples with the updated weights: staleness 0, only the driver's round trip overlaps;
- a split actor with ``max_staleness >= 1`` (asynchronous online DPO) samples step k+1, and up to
  ``max_staleness`` steps ahead, on its rollout ranks while the training ranks update on step k.

The policy version of a sample is the number of actor updates its sampling weights reflect (stamped by the
sampling worker, ``policy_version``); its staleness is the actor's version when it trains on the sample minus that.
The loss sees the current policy's log-probs of the sampled responses against the reference's, as in the
synchronous loop: DPO needs no importance ratio, so a sample from an older policy is a pair like an offline one,
only less on-policy. The log-probs the sampling engine reported (``rollout/logprob_diff_*``) then differ from
the trainer's by the updates in between.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from dpo_rl.runtime.worker_group import completed


@dataclass
class InFlightSampling:
    """Sampling calls started for a later step."""

    step: int
    """The step that trains on these samples."""
    prompts: list[int]
    """The prompt dataset's indices (what a checkpoint records, so a resumed run samples them again)."""
    pending: list
    """The started sampling calls."""


def oldest_allowed_version(policy_version: int, step: int, target: int, max_staleness: int) -> int:
    """The oldest policy version that may sample step ``target``'s batch, seen from step ``step`` before its
    update with the actor at ``policy_version``: ``target`` trains after at most ``target - step`` more updates
    (a step without pairs applies none)."""
    return policy_version + (target - step) - max_staleness


def staleness_metrics(step: int, policy_version: int, sampled_versions: torch.Tensor, max_staleness: int
                      ) -> dict[str, float]:
    """``async/staleness_mean`` and ``async/staleness_max`` of a step's samples; samples older than
    ``max_staleness`` versions are refused (the scheduling never starts them: this is its check)."""
    stale = policy_version - sampled_versions.long()
    worst = int(stale.max())
    if worst > max_staleness or int(stale.min()) < 0:
        raise RuntimeError(f"step {step}: samples of policy versions {sorted(set(sampled_versions.tolist()))} for the "
                           f"actor at version {policy_version}: staleness {worst} is outside algorithm.max_staleness="
                           f"{max_staleness} (a scheduling bug)")
    return {"async/staleness_mean": float(stale.float().mean()), "async/staleness_max": float(worst)}


class RolloutQueue:
    """The steps' prompt batches in the order the steps train on them: sampling already started
    (:class:`InFlightSampling`, oldest first) and, after a resume, the prompts a checkpoint recorded as in flight."""

    def __init__(self) -> None:
        self.in_flight: deque[InFlightSampling] = deque()
        self.resumed_prompts: deque[list[int]] = deque()

    def __len__(self) -> int:
        return len(self.in_flight)

    def push(self, sampling: InFlightSampling) -> None:
        if self.in_flight and sampling.step != self.in_flight[-1].step + 1:
            raise RuntimeError(f"sampling for step {sampling.step} queued after step {self.in_flight[-1].step}'s")
        self.in_flight.append(sampling)

    def pop(self, step: int) -> Optional[InFlightSampling]:
        """Step ``step``'s started sampling, or ``None`` when none was started."""
        if not self.in_flight:
            return None
        if self.in_flight[0].step != step:
            raise RuntimeError(f"step {step} found the sampling started for step {self.in_flight[0].step}")
        return self.in_flight.popleft()

    def next_resumed(self) -> Optional[list[int]]:
        """The oldest prompts a resumed checkpoint had in flight and no step has sampled again yet."""
        return self.resumed_prompts.popleft() if self.resumed_prompts else None

    def settle(self) -> None:
        """Wait for every started sampling and keep the results (their steps collect them at once): the rollout
        ranks are idle after this, so a weight sync starting now does not wait behind their queue."""
        for sampling in self.in_flight:
            sampling.pending = [completed(p) for p in sampling.pending]

    def next_target(self, step: int) -> int:
        """The step the next sampling started at step ``step`` is for."""
        return (self.in_flight[-1].step if self.in_flight else step) + 1

    def record(self) -> list[list[int]]:
        """Prompts sampled for steps not yet trained (a checkpoint's ``in_flight_prompts``), oldest first."""
        return [list(s.prompts) for s in self.in_flight] + [list(p) for p in self.resumed_prompts]

    def restore(self, recorded: list[list[int]]) -> None:
        """After a resume: the checkpoint's in-flight prompts come before any new ones; the started sampling of
        the run that wrote it is gone."""
        self.in_flight.clear()
        self.resumed_prompts = deque(list(p) for p in recorded)
