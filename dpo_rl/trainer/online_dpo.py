"""The online-DPO loop (driver side).

One step (``train_step``): sample ``n`` responses per prompt from the actor; score them
with the reward model (minus the missing-EOS penalty) while the reference computes their
log-probs; pair them; update the actor over ``ppo_epochs`` x mini-batches; push the new
weights to separate rollout ranks when there are any. Each phase is one worker-group RPC.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from dpo_rl import seeds
from dpo_rl.batch import Batch
from dpo_rl.config.trainer import ResolvedConfig
from dpo_rl.data.prompts import PromptSampler, PromptSet, prompt_batch
from dpo_rl.pairing import build_pairs
from dpo_rl.workers.worker_group import resolve

logger = logging.getLogger(__name__)


@dataclass
class RoleGroups:
    """The worker groups of one run."""

    actor: Any
    """Trains (ActorWorker); also samples when colocated."""
    ref: Any
    """Reference log-probs (PolicyWorker)."""
    reward: Any
    """Scores samples (RewardWorker)."""
    rollout: Optional[Any] = None
    """Separate sampling ranks (PolicyWorker) when the actor is split."""

    @property
    def sampler(self):
        return self.rollout if self.rollout is not None else self.actor

    def all(self) -> list:
        return [g for g in (self.actor, self.rollout, self.ref, self.reward) if g is not None]


def minibatch_layout(
    num_pairs: int, *, mini_batch_size: int, dp_size: int, micro_batch_size: int, epochs: int,
    shuffle: bool, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row order, mini-batch id and weight of every row the actor's DP ranks receive.

    Each epoch's pairs (shuffled with ``seed`` if asked) are cut into mini-batches of
    ``mini_batch_size``; a mini-batch is padded to a multiple of ``dp_size x
    micro_batch_size`` with weight-0 rows and dealt to DP ranks in equal contiguous slices.
    The rows are ordered rank by rank, so splitting the result into ``dp_size`` equal
    chunks gives each rank its slice of every mini-batch, in order. Real rows weigh
    ``1 / real rows in their mini-batch``.
    """
    per_rank: list[list[tuple[int, int, float]]] = [[] for _ in range(dp_size)]
    generator = torch.Generator().manual_seed(seed)
    quantum = dp_size * micro_batch_size
    minibatch = 0
    for _ in range(epochs):
        order = torch.randperm(num_pairs, generator=generator) if shuffle else torch.arange(num_pairs)
        for start in range(0, num_pairs, mini_batch_size):
            real = order[start : start + mini_batch_size].tolist()
            padded = real + [real[0]] * ((-len(real)) % quantum)
            weights = [1.0 / len(real)] * len(real) + [0.0] * (len(padded) - len(real))
            share = len(padded) // dp_size
            for d in range(dp_size):
                per_rank[d].extend(
                    (padded[i], minibatch, weights[i]) for i in range(d * share, (d + 1) * share)
                )
            minibatch += 1
    rows = [r for rank_rows in per_rank for r in rank_rows]
    index = torch.tensor([r[0] for r in rows], dtype=torch.long)
    ids = torch.tensor([r[1] for r in rows], dtype=torch.long)
    weight = torch.tensor([r[2] for r in rows], dtype=torch.float32)
    return index, ids, weight


def gather_pairs(samples: Batch, chosen: torch.Tensor, rejected: torch.Tensor) -> Batch:
    """Pair tensors (see :mod:`dpo_rl.batch`) from sample rows."""
    out = {}
    for side, index in (("chosen", chosen), ("rejected", rejected)):
        out[f"{side}_ids"] = samples["sequences"][index]
        out[f"{side}_attention"] = samples["attention_mask"][index]
        out[f"{side}_response"] = samples["response_mask"][index]
    return Batch(out)


def _compute_seconds(result: Any) -> Optional[float]:
    if isinstance(result, Batch):
        return result.meta.get("compute_s")
    if isinstance(result, dict):
        return result.get("compute_s")
    return None


@dataclass
class StepTimer:
    """Wall time of each phase as seen by the driver, and the workers' own compute time.

    ``critical`` holds the compute on the step's critical path: phases that run
    concurrently count once, with their longest compute.
    """

    wall: dict[str, float] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)
    critical: float = 0.0

    def run(self, phase: str, fn, *args, **kwargs):
        """Run one phase; its result's ``compute_s`` is the worker's own time."""
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.wall[phase] = time.perf_counter() - start
        compute = _compute_seconds(result)
        self.compute[phase] = float(compute) if compute is not None else self.wall[phase]
        self.critical += self.compute[phase]
        return result

    def collect(self, phase: str, pending: list) -> Any:
        """Wait for started calls of one phase; Batches are concatenated, compute times summed."""
        start = time.perf_counter()
        results = [resolve(p) for p in pending]
        self.wall[phase] = time.perf_counter() - start
        computes = [_compute_seconds(r) for r in results]
        self.compute[phase] = sum(c for c in computes if c is not None) if any(
            c is not None for c in computes) else self.wall[phase]
        self.critical += self.compute[phase]
        if isinstance(results[0], Batch):
            merged = Batch.concat(results)
            merged.meta["compute_s"] = self.compute[phase]
            return merged
        return results[0]

    def concurrently(self, name: str, calls: dict[str, tuple[Any, str, tuple]]) -> dict[str, Any]:
        """Start ``phase -> (group, method, args)`` calls together and wait for all of them."""
        start = time.perf_counter()
        pending = {phase: group.call_async(method, *args) for phase, (group, method, args) in calls.items()}
        results = {phase: resolve(p) for phase, p in pending.items()}
        self.wall[name] = time.perf_counter() - start
        for phase, result in results.items():
            compute = _compute_seconds(result)
            self.compute[phase] = float(compute) if compute is not None else self.wall[name]
        self.critical += max(self.compute[phase] for phase in calls)
        return results


class OnlineDPOTrainer:
    """Drives the worker groups through ``train_iters`` online-DPO steps."""

    def __init__(self, config: ResolvedConfig, groups: RoleGroups, prompts: PromptSet, *, pad_token_id: int,
                 tracker, eval_prompts: Optional[PromptSet] = None, decode=None) -> None:
        self.c, self.groups, self.prompts, self.eval_prompts = config, groups, prompts, eval_prompts
        self.pad_token_id, self.tracker, self.decode = pad_token_id, tracker, decode
        self.actor_cfg = config.roles["actor_rollout"]
        self.sampler = PromptSampler(len(prompts), seed=config.training.seed, shuffle=config.data.shuffle)
        self.summary: dict[str, Any] = {}
        self._prefetched: Optional[list] = None
        self._last_step_end: Optional[float] = None

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.c.training
        # The evaluation's baseline is the actor's own initial weights, whatever ref.load names: sampled
        # before a checkpoint is restored, from the group that samples (its weights are the actor's `load`).
        initial = self.sample_eval(self.groups.sampler) if self.eval_prompts is not None else None
        first = self.restore() + 1
        for step in range(first, t.train_iters + 1):
            metrics = self.train_step(step)
            if initial is not None and t.eval_interval and step % t.eval_interval == 0 and step < t.train_iters:
                metrics.update(self.evaluate(initial)[0])
            self.tracker.log(step, metrics)
            if t.save_interval and step % t.save_interval == 0:
                self.save(step)
        if initial is not None:
            final_metrics, final = self.evaluate(initial)
            self.summary.update(final_metrics)
            self.summary["eval/baseline"] = f"the actor's initial weights ({self.actor_cfg.load or 'random init'})"
            self.summary["samples"] = self.sample_table(initial, final)
        return self.summary

    def train_step(self, step: int) -> dict[str, float]:
        """One online-DPO step; returns its metrics.

        With a colocated actor the next step's sampling is queued on the actor right behind
        this step's update (Ray runs one actor's calls in order), so the driver's round trip
        and bookkeeping between steps overlap with the actor's work.
        """
        timer = StepTimer()
        start = self._last_step_end or time.perf_counter()
        if self._prefetched is not None:
            samples = timer.collect("generate", self._prefetched)
            self._prefetched = None
        else:
            samples = timer.collect("generate", self.generate_async(self.next_prompts(), self.sample_seed(step)))
        # The reference scores every sample while the reward model does; pairs index into both.
        scored = timer.concurrently("score_and_reference", {
            "reward": (self.groups.reward, "score", (samples,)),
            "reference": (self.groups.ref, "sample_logprobs", (samples,)),
        })
        scores, ref_logps = scored["reward"]["scores"], scored["reference"]["ref_logps"]
        penalized = scores - self.actor_cfg.missing_eos_penalty * (~samples["ended_with_eos"]).float()
        pairs = build_pairs(penalized, samples["prompt_index"], strategy=self.c.algorithm.pairing_strategy,
                            min_score_margin=self.c.algorithm.min_score_margin,
                            tie_policy=self.c.algorithm.tie_policy, seed=seeds.pairing(self.c.training.seed, step))
        metrics = self.sample_metrics(samples, penalized, pairs)
        if len(pairs):
            pair_batch = gather_pairs(samples, pairs.chosen, pairs.rejected).update(
                {"ref_chosen_logps": ref_logps[pairs.chosen], "ref_rejected_logps": ref_logps[pairs.rejected]})
            pending_update = self.groups.actor.call_async("update", self.layout(pair_batch, step))
            if self.groups.rollout is None and step < self.c.training.train_iters:
                self._prefetched = self.generate_async(self.next_prompts(), self.sample_seed(step + 1))
            update = timer.collect("update", [pending_update])
            metrics.update({k: v for k, v in update.items() if k != "compute_s"})
            if self.groups.rollout is not None:
                timer.run("sync", self.sync_weights)
        self._last_step_end = time.perf_counter()
        step_s = self._last_step_end - start
        metrics.update({f"timing/{k}": v for k, v in timer.wall.items()})
        metrics.update({f"timing/{k}": timer.compute[k] for k in ("reward", "reference")})
        metrics.update({f"timing/compute/{k}": v for k, v in timer.compute.items()})
        metrics["timing/step"] = step_s
        metrics["timing/orchestration"] = step_s - timer.critical
        metrics["throughput/tokens_per_s"] = float(samples["response_mask"].sum()) / step_s
        return metrics

    def sample_seed(self, step: int) -> int:
        return seeds.rollout(self.c.training.seed, step)

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def save_dir(self) -> str:
        return self.c.training.save_dir or f"{self.c.training.output_dir}/checkpoints"

    def save(self, step: int) -> None:
        """Every actor rank writes its state into a staging directory; then it is committed."""
        from dpo_rl.checkpoint.training import save_group_checkpoint

        state = {"step": step, "consumed_prompts": step * self.c.training.global_batch_size}
        save_group_checkpoint(self.groups.actor, self.save_dir, step, state, self.c.models["actor_rollout"],
                              self.actor_cfg.tensor_model_parallel_size, self.actor_cfg.pipeline_model_parallel_size,
                              self.c.training.keep_last_k)
        logger.info("saved checkpoint of step %d to %s", step, self.save_dir)

    def restore(self) -> int:
        """Load the checkpoint ``training.resume`` names; returns its step (0 when starting fresh)."""
        from dpo_rl.checkpoint.training import restore_group_checkpoint

        restored = restore_group_checkpoint(self.groups.actor, self.c.training.resume, self.save_dir)
        if restored is None:
            return 0
        path, state = restored
        if self.groups.rollout is not None:
            self.sync_weights()
        self.sampler.consumed = state["consumed_prompts"]
        self.tracker.resume_from(state["step"])
        logger.info("resumed from %s (step %d)", path, state["step"])
        return state["step"]

    # -- phases -------------------------------------------------------------------------
    def next_prompts(self) -> Batch:
        indices = self.sampler.next(self.c.training.global_batch_size)
        return prompt_batch(self.prompts, indices, self.c.algorithm.num_responses_per_prompt, self.pad_token_id)

    def sampling_params(self) -> dict[str, Any]:
        a = self.actor_cfg
        return {"max_new_tokens": a.max_new_tokens, "do_sample": a.do_sample, "temperature": a.temperature,
                "top_k": a.top_k, "top_p": a.top_p}

    def generate_async(self, prompts: Batch, seed: int, group=None) -> list:
        """Start sampling in calls of ``num_samples_per_step`` prompts (x n responses each); call ``i``
        samples with ``seed + i`` (:func:`dpo_rl.seeds.rollout`)."""
        group = group or self.groups.sampler
        per_call = self.actor_cfg.num_samples_per_step * self.c.algorithm.num_responses_per_prompt
        return [group.call_async("generate", prompts.rows(slice(start, start + per_call)), self.sampling_params(),
                                 seed + call)
                for call, start in enumerate(range(0, len(prompts), per_call))]

    def layout(self, pairs: Batch, step: int) -> Batch:
        a = self.actor_cfg
        index, minibatch, weight = minibatch_layout(
            len(pairs), mini_batch_size=a.ppo_mini_batch_size, dp_size=self.c.dp_size("actor_rollout"),
            micro_batch_size=a.micro_batch_size, epochs=a.ppo_epochs, shuffle=a.shuffle_minibatch,
            seed=seeds.minibatch_shuffle(self.c.training.seed, step),
        )
        return pairs.rows(index).update({"minibatch": minibatch, "weight": weight})

    def sync_weights(self) -> dict[str, float]:
        """Push the trained weights to the rollout ranks (split actor), optionally verified."""
        start = time.perf_counter()
        state = self.groups.actor.export_weights()
        received = self.groups.rollout.load_weights(state)
        if self.actor_cfg.verify_weight_sync:
            sent = self.groups.actor.checksum()
            loaded = self.groups.rollout.checksum()
            if not (sent == received == loaded):
                raise RuntimeError(f"weight sync checksum mismatch: sent {sent[:12]}, rollout loaded {loaded[:12]}")
        return {"compute_s": time.perf_counter() - start}

    # -- metrics and evaluation ----------------------------------------------------------
    def sample_metrics(self, samples: Batch, scores: torch.Tensor, pairs) -> dict[str, float]:
        response_lengths = samples["response_mask"].sum(-1).float()
        responses = [tuple(row[m.bool()].tolist()) for row, m in zip(samples["sequences"], samples["response_mask"])]
        metrics = {
            "objective/scores": float(scores.mean()),
            "val/contain_eos_token": float(samples["ended_with_eos"].float().mean()),
            "response_length/mean": float(response_lengths.mean()),
            "response/distinct_fraction": len(set(responses)) / len(responses),
            "pairs/count": float(len(pairs)),
            "pairs/tie_rate": pairs.tie_rate,
            "pairs/dropped": float(pairs.dropped_ties + pairs.dropped_margin),
        }
        if len(pairs):
            metrics["objective/scores_margin"] = float((scores[pairs.chosen] - scores[pairs.rejected]).mean())
        return metrics

    def sample_eval(self, group) -> dict[str, Any]:
        """Sample one response per held-out prompt with ``group`` (fixed seed) and score it."""
        count = min(self.c.training.eval_samples, len(self.eval_prompts))
        prompts = prompt_batch(self.eval_prompts, list(range(count)), 1, self.pad_token_id)
        samples = self.generate_eval(prompts, group)
        scores = self.groups.reward.score(samples)["scores"]
        scores = scores - self.actor_cfg.missing_eos_penalty * (~samples["ended_with_eos"]).float()
        return {"samples": samples, "scores": scores}

    def generate_eval(self, prompts: Batch, group) -> Batch:
        return StepTimer().collect("generate", self.generate_async(prompts, seeds.EVALUATION_SAMPLING, group=group))

    def evaluate(self, initial: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """RM-judged win rate of the current actor over its initial weights on held-out prompts."""
        current = self.sample_eval(self.groups.sampler)
        wins = (current["scores"] > initial["scores"]).float() + 0.5 * (current["scores"] == initial["scores"]).float()
        metrics = {
            "eval/scores": float(current["scores"].mean()),
            "eval/initial_scores": float(initial["scores"].mean()),
            "eval/win_rate": float(wins.mean()),
        }
        return metrics, current

    def sample_table(self, initial: dict[str, Any], final: dict[str, Any], rows: int = 4) -> list[dict[str, Any]]:
        if self.decode is None:
            return []
        table = []
        for i in range(min(rows, len(initial["scores"]))):
            def text(s):
                return self.decode(s["samples"]["sequences"][i][s["samples"]["response_mask"][i].bool()].tolist())
            table.append({"prompt": self.eval_prompts.texts[i], "before": text(initial), "before_score": float(initial["scores"][i]),
                          "after": text(final), "after_score": float(final["scores"][i])})
        return table
