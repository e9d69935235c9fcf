"""The online-DPO loop (driver side).

One step (``train_step``): sample ``n`` responses per prompt from the actor (with a split actor and
``algorithm.max_staleness >= 1``, sampling runs up to that many steps ahead: :mod:`dpo_rl.trainer.rollout_ahead`); score them
with the reward model (minus the missing-EOS penalty) while the reference computes their
log-probs; pair them; update the actor over ``ppo_epochs`` x mini-batches (starting before the
reference has finished, and with ``n = 2`` before the scores are in: the update reads both results
when its first loss needs them); push the new weights to separate rollout ranks when there are
any. Each phase is one worker-group RPC.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from dpo_rl import seeds
from dpo_rl.batch import Batch, drop_trailing_padding
from dpo_rl.config.resolution import (
    ROLE_SECTIONS,
    ResolvedConfig,
    check_loss,
    check_online_data,
    check_sampling_actor,
)
from dpo_rl.config.schema import (
    AdapterSettings,
    OnlineActorSettings,
    OptimizerSettings,
    RoleBase,
    SamplingSettings,
)
from dpo_rl.data.prompts import (
    PromptSampler,
    PromptSet,
    load_prompt_source,
    prompt_batch,
)
from dpo_rl.errors import ConfigError
from dpo_rl.pairing import LatePairing, PairingRule, length_penalty, prompt_pairs, shared_response_tokens
from dpo_rl.run_report import write_report
from dpo_rl.runtime.groups import GroupFactory
from dpo_rl.runtime.resource_pool import RolePool
from dpo_rl.runtime.worker_group import Deferred, wait_for
from dpo_rl.tracking import MetricsTracker
from dpo_rl.trainer.common import (
    logprob_options,
    export_model,
    load_tokenizer,
    metrics_tracker,
    prepare_output,
    special_ids,
    tokenizer_key,
)
from dpo_rl.trainer.loop import StepTimer, TrainingLoop, minibatch_layout
from dpo_rl.trainer.ref_refresh import ReferenceRefresh, join_sync_channel
from dpo_rl.trainer.rollout_ahead import InFlightSampling, RolloutQueue, oldest_allowed_version, staleness_metrics
from dpo_rl.trainer.stages import Stage, register_stage
from dpo_rl.workers.policy import ActorWorker, PolicyWorker, probe_mismatch
from dpo_rl.workers.reward import RewardWorker

logger = logging.getLogger(__name__)


@dataclass
class RoleGroups:
    """The worker groups of one run."""

    actor: Any
    """Trains (ActorWorker); also samples when colocated."""
    ref: Optional[Any]
    """Reference log-probs (PolicyWorker); ``None`` when the LoRA actor's base is the reference."""
    reward: Any
    """Scores samples (RewardWorker)."""
    rollout: Optional[Any] = None
    """Separate sampling ranks (PolicyWorker) when the actor is split."""

    @property
    def sampler(self):
        return self.rollout if self.rollout is not None else self.actor

    @property
    def reference(self) -> tuple[Any, str]:
        """(group, method) that gives the reference's ``sequence_logps``: the ref group, or the LoRA actor's base
        (``reference_logprobs``, adapters off)."""
        return (self.ref, "sequence_logprobs") if self.ref is not None else (self.actor, "reference_logprobs")

    def all(self) -> list:
        return [g for g in (self.actor, self.rollout, self.ref, self.reward) if g is not None]


def wait_all(pending: list) -> list:
    """Results of calls started together (e.g. both sides of a collective), in order."""
    return [wait_for(p) for p in pending]


def gather_pairs(samples: Batch, chosen: torch.Tensor, rejected: torch.Tensor) -> Batch:
    """Pair tensors (see :mod:`dpo_rl.batch`) from sample rows, with the rollout engine's log-probs of each
    sequence's tokens by position (``{side}_rollout_logps``, 0 on prompt and padding) for the log-prob gap
    and each side's sample row (``{side}_sample``: where its reference log-prob is)."""
    rollout = samples["rollout_logprobs"]
    by_position = torch.nn.functional.pad(rollout, (samples["sequences"].shape[1] - rollout.shape[1], 0))
    out = {}
    for side, index in (("chosen", chosen), ("rejected", rejected)):
        out[f"{side}_sample"] = index
        out[f"{side}_ids"] = samples["sequences"][index]
        out[f"{side}_attention"] = samples["attention_mask"][index]
        out[f"{side}_response"] = samples["response_mask"][index]
        out[f"{side}_rollout_logps"] = by_position[index]
    return Batch(out)


def step_timing(timer: StepTimer, step_s: float, response_tokens: float) -> dict[str, float]:
    """A step's ``timing/*`` (wall and the workers' own compute) and ``throughput/tokens_per_s``."""
    timing = {f"timing/{k}": v for k, v in timer.wall.items()}
    timing.update({f"timing/{k}": timer.compute.get(k, 0.0) for k in ("reward", "reference")})  # the workers' own
    timing.update({f"timing/compute/{k}": v for k, v in timer.compute.items()})
    timing.update({"timing/step": step_s, "timing/orchestration": step_s - timer.critical,
                   "throughput/tokens_per_s": response_tokens / step_s})
    return timing


def paired_samples(samples: Batch, pairs) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The samples in at least one of ``pairs`` (ascending) and each pair's (chosen, rejected) row in them."""
    if bool((samples["prompt_index"][pairs.chosen] != samples["prompt_index"][pairs.rejected]).any()):
        raise RuntimeError("a pair's chosen and rejected samples answer different prompts")  # pairing bug
    kept = torch.unique(torch.cat([pairs.chosen, pairs.rejected]), sorted=True)
    return samples.rows(kept), torch.searchsorted(kept, pairs.chosen), torch.searchsorted(kept, pairs.rejected)


class OnlineDPOTrainer(TrainingLoop):
    """Drives the worker groups through ``train_iters`` online-DPO steps."""

    consumed_key = "consumed_prompts"

    def __init__(self, config: ResolvedConfig, groups: RoleGroups, prompts: PromptSet, *, pad_token_id: int,
                 tracker, eval_prompts: Optional[PromptSet] = None, decode=None) -> None:
        super().__init__(config, groups.actor, tracker=tracker,
                         sampler=PromptSampler(len(prompts), seed=config.training.seed, shuffle=config.data.shuffle))
        self.groups, self.prompts, self.eval_prompts = groups, prompts, eval_prompts
        self.pad_token_id, self.decode = pad_token_id, decode
        self.actor_cfg = config.roles["actor_rollout"]
        self.initial: Optional[dict[str, Any]] = None
        #: sampling started for later steps (a colocated actor's next step; a split actor's max_staleness steps)
        self.rollouts = RolloutQueue()
        self._last_step_end: Optional[float] = None
        #: actor updates applied so far (the version the sampling weights must carry)
        self.policy_version = 0
        #: the policy version the split actor's rollout ranks hold (their last weight sync)
        self.rollout_version = 0
        #: a split actor samples ahead of the update (asynchronous online DPO)
        self.samples_ahead = groups.rollout is not None and config.algorithm.max_staleness > 0
        self.ref_refresh = ReferenceRefresh(config.algorithm.ref_update, groups.actor, groups.ref,
                                            senders=config.parallel("actor_rollout").pipeline_model_parallel_size,
                                            verify=self.actor_cfg.verify_weight_sync)

    # -- the loop's hooks (TrainingLoop.fit runs them) --------------------------------------
    @property
    def evaluates(self) -> bool:
        return self.eval_prompts is not None

    def before_training(self) -> None:
        # The evaluation's baseline is the actor's own initial weights, whatever ref.load names: sampled
        # before a checkpoint is restored, from the group that samples (its weights are the actor's `load`).
        if self.groups.rollout is not None:  # infer ranks sample with the actor's weights from the start
            self.join_weight_sync()
            self.sync_weights()
        self.ref_refresh.join()
        self.initial = self.sample_eval() if self.evaluates else None

    def evaluate(self) -> dict[str, float]:
        return self.compare_with_baseline()[0]

    def finish(self) -> dict[str, Any]:
        if self.initial is not None:
            final_metrics, final = self.compare_with_baseline()
            self.summary.update(final_metrics)
            self.summary["eval/baseline"] = f"the actor's initial weights ({self.actor_cfg.load or 'random init'})"
            self.summary["samples"] = self.sample_table(self.initial, final)
        return self.summary

    def trainer_state(self) -> dict[str, Any]:
        return {"in_flight_prompts": self.rollouts.record(), "policy_version": self.policy_version,
                **self.ref_refresh.state()}

    def save_extra(self, directory: Path) -> None:
        self.ref_refresh.save(directory)

    def after_restore(self, directory: Path, state: dict[str, Any]) -> None:
        """The checkpoint's in-flight prompts are sampled again first (with the restored weights), and the
        prompt sampler goes on after them: resume neither skips nor repeats a prompt. A refreshed reference
        (TR-DPO) is the checkpoint's."""
        in_flight, size = state.get("in_flight_prompts", []), self.c.training.global_batch_size
        if any(len(p) != size for p in in_flight):
            held = next(len(p) for p in in_flight if len(p) != size)
            raise ConfigError([f"training.global_batch_size={size}, but the checkpoint {directory} was sampling "
                               f"batches of {held} prompts; resume with training.global_batch_size={held}"])
        self.rollouts.restore(in_flight)
        self.sampler.consumed += sum(len(p) for p in in_flight)
        self.policy_version = state.get("policy_version", state["step"])  # (older checkpoints: one update a step)
        self.ref_refresh.restore(directory, state)

    def restore(self) -> int:
        step = super().restore()
        if step:
            if self.groups.rollout is not None:
                self.sync_weights()
            else:
                self.groups.actor.set_policy_version(self.policy_version)
        return step

    def train_step(self, step: int) -> dict[str, float]:
        """One online-DPO step; returns its metrics.

        With a colocated actor the next step's sampling is queued on the actor right behind
        this step's update (Ray runs one actor's calls in order), so the driver's round trip
        and bookkeeping between steps overlap with the actor's work. A split actor with
        ``max_staleness >= 1`` samples the next steps on its rollout ranks meanwhile (:meth:`sample_ahead`).
        """
        timer = StepTimer()
        start = self._last_step_end or time.perf_counter()
        samples, staleness = self.collect_samples(step, timer)
        # With two samples per prompt every sample is half of its prompt's only candidate pair: the reference
        # scores them all while the reward model does, and the update starts on its forward before the scores
        # are in (the pair is known but for its orientation, LatePairing). With more and best-vs-worst, the
        # reference scores only the samples the scores pair (at n = 8 a quarter of them), beside the update's
        # forward; all_pairs pairs nearly every sample, so its reference scores them all beside the reward model.
        # The update reads the reference's log-probs when its first loss needs them.
        a = self.c.algorithm
        two_per_prompt = a.num_responses_per_prompt == 2
        paired_only = not two_per_prompt and a.pairing_strategy == "best_vs_worst"
        pending_reference = pending_update = None
        if two_per_prompt:
            first, second = prompt_pairs(samples["prompt_index"])
            samples = self.with_shared_lengths(samples, first, second)
        if not paired_only:
            pending_reference = self.reference_async(samples)
        pending_scores = self.groups.reward.call_async("score", samples)
        if self.samples_ahead:  # (its sync, when due, runs beside the scoring, before the update is queued)
            self.sample_ahead(step, timer)
        rule, lengths = self.pairing_rule(step), samples["response_mask"].sum(-1)
        if two_per_prompt:
            rows = self.layout(gather_pairs(samples, first, second), step)
            late = LatePairing(Deferred(pending_scores), rule, samples["prompt_index"], samples["ended_with_eos"],
                               first=rows["chosen_sample"], second=rows["rejected_sample"],
                               minibatch=rows["minibatch"], laid_out=rows["weight"] > 0, response_lengths=lengths)
            pending_update = self.start_update(rows, Deferred(pending_reference), late, step)
        # with the update started, the reward model scores beside its forward (the actor waits for the scores
        # inside the update if they are slower): off the critical path
        scores = timer.collect("reward", [pending_scores], critical=pending_update is None)["scores"]
        penalized = rule.penalized(scores, samples["ended_with_eos"], lengths)
        pairs = rule.pairs(scores, samples["ended_with_eos"], samples["prompt_index"], lengths)
        metrics = self.sample_metrics(samples, scores, penalized, pairs) | staleness
        referenced = 0 if paired_only else len(samples)
        if pending_update is None and len(pairs):
            pending_update, pending_reference, referenced = self.start_scored_update(samples, pairs,
                                                                                     pending_reference, step)
        metrics["reference/sequences"] = float(referenced)
        if pending_update is not None:
            update = timer.collect("update", [pending_update])
            if len(pairs):  # the actor applied the update exactly when the scores gave a pair
                self.policy_version += 1
                metrics.update({k: v for k, v in update.items() if k != "compute_s"})
                if self.groups.rollout is not None and not self.samples_ahead:  # (ahead: before the next sampling)
                    timer.run("sync", self.sync_weights)
        if pending_reference is not None:  # the update waited for it if it had pairs
            timer.collect("reference", [pending_reference], critical=False)
        if self.ref_refresh.due(step):  # TR-DPO: after the update (this step queued no sampling behind it)
            timer.run("ref_refresh", self.ref_refresh.refresh, self.policy_version)
        metrics.update(self.ref_refresh.metrics())
        self._last_step_end = time.perf_counter()
        return metrics | step_timing(timer, self._last_step_end - start, float(samples["response_mask"].sum()))

    def collect_samples(self, step: int, timer: StepTimer) -> tuple[Batch, dict[str, float]]:
        """Step ``step``'s samples (started earlier, or now), without the columns after their longest response,
        and their staleness metrics. A batch sampled ahead computed beside the last update: only the wait for it
        is on this step's critical path."""
        started = self.rollouts.pop(step)
        ahead = started is not None and self.samples_ahead
        samples = timer.collect("generate", (started or self.start_sampling(step)).pending, critical=not ahead)
        if ahead:
            timer.critical += timer.wall["generate"]
        staleness = staleness_metrics(step, self.policy_version, samples["policy_version"],
                                      self.c.algorithm.max_staleness)
        return drop_trailing_padding(samples), staleness

    def start_scored_update(self, samples: Batch, pairs, pending_reference, step: int):
        """Start the update on the pairs the scores gave; with no reference started yet (best-vs-worst, n > 2),
        start it on the paired samples first. Returns (the update call, the reference call, the sequences the
        reference scores)."""
        chosen, rejected = pairs.chosen, pairs.rejected
        if pending_reference is None:
            samples, chosen, rejected = paired_samples(samples, pairs)
            samples = self.with_shared_lengths(samples, chosen, rejected)
            pending_reference = self.reference_async(samples)
        rows = self.layout(gather_pairs(samples, chosen, rejected), step)
        return self.start_update(rows, Deferred(pending_reference), None, step), pending_reference, len(samples)

    def start_update(self, rows: Batch, reference: Deferred, late: Optional[LatePairing], step: int):
        """Start the actor's update; with a colocated actor, queue the next step's sampling right behind it."""
        pending = self.groups.actor.call_async("update", rows, reference, late)
        # not on a refresh step: the refresh streams from the actor right after the update (the reference waits)
        if self.groups.rollout is None and step < self.c.training.train_iters and not self.ref_refresh.due(step):
            self.rollouts.push(self.start_sampling(step + 1))
        return pending

    def sample_ahead(self, step: int, timer: StepTimer) -> None:
        """Split actor, ``max_staleness >= 1``: keep up to that many later steps' sampling in flight on the rollout
        ranks. A batch whose step may train more than ``max_staleness`` updates after the rollout ranks' weights
        first gets the current weights, which the ranks receive only once the sampling queued on them is done:
        with sampling still in flight the next batch waits for a later step instead."""
        k = self.c.algorithm.max_staleness
        while len(self.rollouts) < k:
            target = self.rollouts.next_target(step)
            if target > self.c.training.train_iters:
                return
            if self.rollout_version < oldest_allowed_version(self.policy_version, step, target, k):
                if len(self.rollouts):
                    return
                timer.run("sync", self.sync_weights)
            self.rollouts.push(self.start_sampling(target))

    def pairing_rule(self, step: int) -> PairingRule:
        a = self.c.algorithm
        return PairingRule(strategy=a.pairing_strategy, min_score_margin=a.min_score_margin, tie_policy=a.tie_policy,
                           missing_eos_penalty=self.actor_cfg.missing_eos_penalty,
                           seed=seeds.pairing(self.c.training.seed, step), length_penalty=a.length_penalty,
                           length_penalty_target=a.length_penalty_target)

    def reference_async(self, samples: Batch):
        """Start the reference's summed response log-probs of ``samples`` (``sequence_logps`` [S]; LD-DPO's with
        ``algorithm.ld_alpha``)."""
        group, method = self.groups.reference
        return group.call_async(method, samples, **logprob_options(self.c.algorithm.ld_alpha))

    def with_shared_lengths(self, samples: Batch, first: torch.Tensor, second: torch.Tensor) -> Batch:
        """With ``algorithm.ld_alpha``, ``samples`` with each one's pair's shorter response length (LD-DPO)."""
        if self.c.algorithm.ld_alpha is None:
            return samples
        shared = shared_response_tokens(samples["response_mask"], first, second)
        return samples.update({"shared_response_tokens": shared})

    def sample_seed(self, step: int) -> int:
        return seeds.rollout(self.c.training.seed, step)

    # -- phases -------------------------------------------------------------------------
    def start_sampling(self, step: int) -> InFlightSampling:
        """Start sampling step ``step``'s batch: the prompts a resumed checkpoint had in flight, else the
        sampler's next ``global_batch_size``."""
        indices = self.rollouts.next_resumed() or self.sampler.next(self.c.training.global_batch_size)
        prompts = prompt_batch(self.prompts, indices, self.c.algorithm.num_responses_per_prompt, self.pad_token_id)
        return InFlightSampling(step, indices, self.generate_async(prompts, self.sample_seed(step)))

    def sampling_params(self) -> dict[str, Any]:
        a = self.actor_cfg
        return {"max_new_tokens": a.max_new_tokens, "do_sample": a.do_sample, "temperature": a.temperature,
                "top_k": a.top_k, "top_p": a.top_p}

    def generate_async(self, prompts: Batch, seed: int) -> list:
        """Start sampling on the sampling group in calls of ``num_samples_per_step`` prompts (x n responses
        each); call ``i`` samples with ``seed + i`` (:func:`dpo_rl.seeds.rollout`)."""
        group = self.groups.sampler
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

    def join_weight_sync(self) -> None:
        """Build the sync groups between the training ranks and the rollout ranks (split actor, once)."""
        join_sync_channel(self.groups.actor, self.groups.rollout,
                          self.c.parallel("actor_rollout").pipeline_model_parallel_size, "rollout")

    def sync_weights(self) -> dict[str, float]:
        """Stream the trained weights to the rollout ranks over their sync groups (split actor): the driver
        only starts both sides; with ``verify_weight_sync`` it compares the checksums of what was sent and
        received, and then what the rollout side holds: its model's checksum, or, for a vLLM engine (whose CPU
        build packs its weights), its log-probs on fixed probe sequences against the trainer's. The groups
        are joined in :meth:`before_training`, which runs before any restore or step."""
        start = time.perf_counter()
        a = self.actor_cfg
        verify = a.verify_weight_sync
        self.rollout_version = self.policy_version
        sent, received = wait_all([self.groups.actor.call_async("send_weights", a.weight_sync_bucket_mb, verify),
                                   self.groups.rollout.call_async("receive_weights", verify, self.policy_version)])
        if verify:
            problems = [] if sent == received else [f"sent {sent[:12]} but received {received[:12]}"]
            if a.rollout_engine == "vllm":
                mismatch = probe_mismatch(*wait_all([self.groups.actor.call_async("probe_logprobs"),
                                                     self.groups.rollout.call_async("probe_logprobs")]),
                                          a.params_dtype)
                problems += [f"the trained model and the vLLM engine {mismatch}"] if mismatch else []
            else:
                loaded = self.groups.rollout.checksum()
                problems += [] if loaded == received else [f"received {received[:12]} but the rollout model holds "
                                                           f"{loaded[:12]}"]
            if problems:
                raise RuntimeError("weight sync check failed: " + "; ".join(problems))
        return {"compute_s": time.perf_counter() - start}

    # -- metrics and evaluation ----------------------------------------------------------
    def sample_metrics(self, samples: Batch, raw_scores: torch.Tensor, scores: torch.Tensor, pairs) -> dict[str, float]:
        """The step's sample and pair metrics; ``scores`` are ``raw_scores`` (the reward model's) after the
        missing-EOS and length penalties."""
        response_lengths = samples["response_mask"].sum(-1).float()
        responses = [tuple(row[m.bool()].tolist()) for row, m in zip(samples["sequences"], samples["response_mask"])]
        a = self.c.algorithm
        metrics = {
            "objective/scores": float(scores.mean()),
            "objective/rm_scores": float(raw_scores.mean()),
            "objective/length_penalty": float(length_penalty(response_lengths, a.length_penalty,
                                                             a.length_penalty_target).mean()),
            "val/contain_eos_token": float(samples["ended_with_eos"].float().mean()),
            "response_length/mean": float(response_lengths.mean()),
            "response/distinct_fraction": len(set(responses)) / len(responses),
            "pairs/count": float(len(pairs)),
            "pairs/tie_rate": pairs.tie_rate,
            "pairs/dropped": float(pairs.dropped_ties + pairs.dropped_margin),
            "rollout/policy_version": float(samples["policy_version"].min()),
        }
        if len(pairs):
            metrics["objective/scores_margin"] = float((scores[pairs.chosen] - scores[pairs.rejected]).mean())
        return metrics

    def sample_eval(self) -> dict[str, Any]:
        """Sample one response per held-out prompt with the sampling group's current weights (fixed seed)
        and score it."""
        if self.groups.rollout is not None and self.rollout_version < self.policy_version:  # sampling ahead
            self.rollouts.settle()  # the rollout ranks finish their queued sampling, then take the current weights
            self.sync_weights()
        count = min(self.c.training.eval_samples, len(self.eval_prompts))
        prompts = prompt_batch(self.eval_prompts, list(range(count)), 1, self.pad_token_id)
        samples = StepTimer().collect("generate", self.generate_async(prompts, seeds.EVALUATION_SAMPLING))
        scores = self.groups.reward.score(samples)["scores"]
        # judged by the objective the pairs are built on: the RM score less the missing-EOS and length penalties
        scores = self.pairing_rule(0).penalized(scores, samples["ended_with_eos"], samples["response_mask"].sum(-1))
        return {"samples": samples, "scores": scores}

    def compare_with_baseline(self) -> tuple[dict[str, float], dict[str, Any]]:
        """RM-judged win rate of the current actor over its initial weights on held-out prompts."""
        initial = self.initial
        current = self.sample_eval()
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


# --------------------------------------------------------------------------- the stage
def worker_specs(c: ResolvedConfig, eos_ids: tuple[int, ...], pad_id: int) -> dict[str, tuple[type, dict[str, Any]]]:
    """Role -> (worker class, constructor kwargs); the role -> worker map as data."""
    seed = c.training.seed
    actor = c.roles["actor_rollout"]
    policy = {"eos_token_ids": eos_ids, "pad_token_id": pad_id}
    engine = actor.rollout_engine
    specs = {
        "actor": (ActorWorker, dict(model_config=c.models["actor_rollout"], parallel=c.parallel("actor_rollout"),
                                    role=actor, seed=seed, loss_spec=c.algorithm.loss_spec(), total_iters=c.training.train_iters,
                                    rollout_engine=engine if c.colocated else None, **policy)),
        "reward": (RewardWorker, dict(model_config=c.models["reward"], parallel=c.parallel("reward"),
                                      role=c.roles["reward"], seed=seed, pad_token_id=pad_id,
                                      actor_tokenizer=actor.tokenizer_name_or_path)),
    }
    if "ref" in c.roles:  # else the LoRA actor's base is the reference (c.reference_is_actor_base)
        specs["ref"] = (PolicyWorker, dict(model_config=c.models["ref"], parallel=c.parallel("ref"), role=c.roles["ref"],
                                           seed=seed, **policy))
    if not c.colocated:
        specs["rollout"] = (PolicyWorker, dict(model_config=c.models["actor_rollout"], parallel=c.rollout_parallel(),
                                               role=actor, seed=seed, rollout_engine=engine,
                                               holds_model=engine != "vllm", **policy))
    return specs


def role_pools(c: ResolvedConfig):
    """RolePools for each group; the actor's pool is split into train and rollout ranks."""
    def pool(role, counts, config_key=""):
        return RolePool(role, list(counts), c.ray.device_resource, c.ray.cpus_per_worker, config_key)

    actor = c.roles["actor_rollout"]
    train_counts, infer_counts, need = [], [], actor.num_gpus_for_train
    for n in c.resource_pool.actor_rollout:
        take = min(n, need)
        train_counts.append(take)
        infer_counts.append(n - take)
        need -= take
    pools = {"actor": pool("actor", train_counts, "resource_pool.actor_rollout"), "reward": pool("reward", c.resource_pool.reward)}
    if "ref" in c.roles:
        pools["ref"] = pool("ref", c.resource_pool.ref)
    if not c.colocated:
        pools["rollout"] = pool("rollout", infer_counts, "resource_pool.actor_rollout")
    return pools


class OnlineDPOStage(Stage):
    """``ray_online_dpo``: sample from the actor, score with the reward model, pair, update against the reference."""

    name = "ray_online_dpo"
    samples = True
    key_metrics = ("objective/scores", "loss")

    def roles(self, training, algorithm) -> tuple[str, ...]:
        return ("actor_rollout", "ref", "reward")

    def role_settings(self, role: str, placed: tuple[str, ...]) -> tuple[type, ...]:
        if role == "actor_rollout":  # trains and samples
            return (RoleBase, OptimizerSettings, AdapterSettings, SamplingSettings, OnlineActorSettings)
        return (RoleBase,)

    def check(self, c: ResolvedConfig, check_paths: bool) -> list[str]:
        problems = check_loss(c) + check_sampling_actor(c) + check_online_data(c, check_paths)
        if c.algorithm.reference != "model":
            problems.append(f"algorithm.reference={c.algorithm.reference!r}: online DPO scores fresh samples, so its "
                            "reference is a live model; set algorithm.reference: model")
        return problems

    def run(self, cfg, c: ResolvedConfig, *, use_ray: bool) -> dict[str, Any]:
        return run_online(cfg, c, use_ray=use_ray)


def run_online(cfg: DictConfig, c: ResolvedConfig, *, use_ray: bool) -> dict[str, Any]:
    actor = c.roles["actor_rollout"]
    tokenizer = load_tokenizer(actor.tokenizer_name_or_path, tokenizer_key("actor_rollout"))
    eos_ids, pad_id = special_ids(tokenizer)
    prompts = load_prompt_source(c.data.train_path, tokenizer, prompt_key=c.data.prompt_key,
                                 max_prompt_length=actor.max_prompt_length)
    eval_prompts = (load_prompt_source(c.data.eval_path, tokenizer, prompt_key=c.data.prompt_key,
                                       max_prompt_length=actor.max_prompt_length) if c.data.eval_path else None)
    if not use_ray and not c.colocated:
        raise ConfigError([f"{ROLE_SECTIONS['actor_rollout']}.num_gpus_for_infer={actor.num_gpus_for_infer}: running "
                           "in-process needs a colocated actor; set it to 0 or run on Ray"])
    out = prepare_output(cfg, c)
    specs = worker_specs(c, eos_ids, pad_id)
    tracker = metrics_tracker(cfg, c, out, OnlineDPOStage.key_metrics)
    try:
        with GroupFactory(c, role_pools(c), use_ray=use_ray) as factory:
            created = {name: factory.create(name, cls, kwargs) for name, (cls, kwargs) in specs.items()}
            groups = RoleGroups(ref=created.pop("ref", None), **created)
            trainer = OnlineDPOTrainer(c, groups, prompts, pad_token_id=pad_id, tracker=tracker,
                                       eval_prompts=eval_prompts, decode=tokenizer.decode)
            summary = trainer.fit()
            if c.training.export_hf:
                summary.update(export_model(c, groups.actor, out / "hf_actor", "actor_rollout", tokenizer))
    finally:
        tracker.close()
    if c.training.plot:
        summary["plot"] = str(tracker.plot())
        summary["report"] = str(write_report(out, c.stage, summary))
    tracker.write_json("summary.json", summary)
    report(summary, tracker)
    return summary


def report(summary: dict[str, Any], tracker: MetricsTracker) -> None:
    if "eval/win_rate" in summary:
        tracker.print(f"final evaluation: win rate of the trained actor over {summary['eval/baseline']} "
                      f"{summary['eval/win_rate']:.1%} (mean RM score {summary['eval/initial_scores']:.3f} -> "
                      f"{summary['eval/scores']:.3f})")
    for row in summary.get("samples", []):
        tracker.print(f"  prompt: {row['prompt']}\n    before ({row['before_score']:+.2f}): {row['before']}\n"
                      f"    after  ({row['after_score']:+.2f}): {row['after']}")


register_stage(OnlineDPOStage())
