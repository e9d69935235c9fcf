"""Offline stages on the online loop's worker groups: DPO from preference pairs, reward-model
training (Bradley-Terry) and SFT.

One step: take the next ``global_batch_size`` examples (seeded epochs), collate them into the
:class:`~dpo_rl.batch.Batch` layout online DPO uses, add the reference's log-probs (DPO: live
from the ref group, or from the precomputed cache), and call the trained group's ``update``
RPC once (one optimizer step). Evaluation runs at the start, every ``eval_interval`` steps
and at the end on the held-out split.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from dpo_rl import seeds
from dpo_rl.batch import Batch
from dpo_rl.config.resolution import ResolvedConfig
from dpo_rl.config.schema import RefUpdateConfig
from dpo_rl.data.indexed import TokenizedDataset, collate_pairs, collate_sequences
from dpo_rl.data.prompts import PromptSampler
from dpo_rl.losses import PairLogps, compute_preference_loss
from dpo_rl.pairing import shared_response_tokens
from dpo_rl.trainer.common import logprob_options
from dpo_rl.trainer.loop import StepTimer, TrainingLoop, minibatch_layout
from dpo_rl.trainer.ref_refresh import ReferenceRefresh
from dpo_rl.workers.reward import bradley_terry_loss

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Some rows of a preprocessed dataset (train or eval)."""

    dataset: TokenizedDataset
    rows: list[int]
    name: str

    def __len__(self) -> int:
        return len(self.rows)

    def items(self, positions: Sequence[int]) -> list[dict]:
        return [self.dataset[self.rows[i]] for i in positions]


def make_splits(train: TokenizedDataset, eval_dataset: Optional[TokenizedDataset], *, eval_fraction: float,
                eval_samples: int, seed: int) -> tuple[Split, Optional[Split]]:
    """Train rows and (at most ``eval_samples``) eval rows: ``eval_dataset``'s, else a seeded ``eval_fraction`` of ``train``."""
    if eval_dataset is not None:
        used = min(eval_samples, len(eval_dataset))
        logger.info("evaluation on the first %d of %d rows of %s (training.eval_samples)", used, len(eval_dataset),
                    eval_dataset.prefix)
        return Split(train, list(range(len(train))), "train"), Split(eval_dataset, list(range(used)), "eval")
    if eval_fraction <= 0:
        return Split(train, list(range(len(train))), "train"), None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seeds.held_out_split(seed))).tolist()
    held_out = max(1, round(eval_fraction * len(train)))
    if held_out >= len(train):
        raise ValueError(f"data.eval_fraction={eval_fraction} leaves no training rows of {len(train)}")
    logger.info("held out %d of %d rows of %s (data.eval_fraction=%g); evaluation on %d of them (training.eval_samples)",
                held_out, len(train), train.prefix, eval_fraction, min(held_out, eval_samples))
    return (Split(train, sorted(order[held_out:]), "train"),
            Split(train, sorted(order[:held_out])[:eval_samples], "eval"))


def pairs_batch(items: list[dict], pad_id: int) -> Batch:
    return Batch(collate_pairs(items, pad_id))


def sequences_batch(items: list[dict], pad_id: int) -> Batch:
    return Batch(collate_sequences(items, pad_id))


def pairs_as_samples(pairs: Batch) -> Batch:
    """2N sequence rows (chosen 1..N, then rejected 1..N), the layout ``sequence_logprobs``/``score`` read, with
    each row's pair's shorter response length (``shared_response_tokens``, LD-DPO's split).

    Pairs share one width (:func:`~dpo_rl.data.indexed.collate_pairs`), so the sides stack as they are."""
    samples = Batch({key: torch.cat([pairs[f"chosen_{side}"], pairs[f"rejected_{side}"]])
                     for key, side in (("sequences", "ids"), ("attention_mask", "attention"),
                                       ("response_mask", "response"))})
    n = len(pairs)
    index = torch.arange(n)
    return samples.update({"shared_response_tokens": shared_response_tokens(samples["response_mask"], index,
                                                                            index + n)})


def response_tokens(response_mask: torch.Tensor) -> torch.Tensor:
    """Target tokens per row as log-prob code counts them (the first token is never a target)."""
    return response_mask[:, 1:].sum(-1).to(torch.float32)


def score_pair_values(group, method: str, keys: tuple[str, ...], pairs: Batch, chunk: int,
                      **options: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key -> (chosen [N], rejected [N]) values of ``group.method(samples, **options)`` (a DP-dispatched
    per-sequence RPC returning ``keys``) on ``pairs``, in calls of ``chunk`` pairs."""
    chosen: dict[str, list] = {k: [] for k in keys}
    rejected: dict[str, list] = {k: [] for k in keys}
    for start in range(0, len(pairs), chunk):
        part = pairs.rows(slice(start, start + chunk))
        result = getattr(group, method)(pairs_as_samples(part), **options)
        for key in keys:
            chosen[key].append(result[key][: len(part)])
            rejected[key].append(result[key][len(part):])
    return {k: (torch.cat(chosen[k]), torch.cat(rejected[k])) for k in keys}


def score_pairs(group, method: str, key: str, pairs: Batch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) values of ``group.method`` (returning ``key``) on ``pairs``, in calls of ``chunk``."""
    return score_pair_values(group, method, (key,), pairs, chunk)[key]


def pair_logps(group, pairs: Batch, chunk: int, method: str = "sequence_logprobs",
               **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [N], rejected [N]) of ``pairs`` under ``group``'s model (``method``:
    ``reference_logprobs`` for a LoRA actor's base; ``options``: :func:`logprob_options`)."""
    return score_pair_values(group, method, ("sequence_logps",), pairs, chunk, **options)["sequence_logps"]


class OfflineObjective:
    """What differs between the offline stages: how examples become a batch, how the rows of a step
    weigh, and how the trained model is judged on held-out data. The default is pairs, weighted
    as laid out."""

    def collate(self, items: list[dict], pad_id: int) -> Batch:
        return pairs_batch(items, pad_id)

    def weight(self, rows: Batch, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def evaluate(self, loop: "OfflineTrainer", split: Split, rows: Batch) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError


class PreferenceObjective(OfflineObjective):
    """Offline DPO: the preference loss of ``spec``; held-out implicit-reward accuracy and margins."""

    def __init__(self, spec) -> None:
        self.spec = spec

    def evaluate(self, loop: "OfflineTrainer", split: Split, rows: Batch) -> dict[str, float]:
        options = logprob_options(self.spec.options.ld_alpha)
        if self.spec.options.use_weighting:  # WPO: the policy's aligned log-probs weigh the held-out loss too
            values = score_pair_values(loop.trained, "sequence_logprobs", ("sequence_logps", "wpo_logps"), rows,
                                       loop.chunk, wpo=True, **options)
            (chosen, rejected), (chosen_wpo, rejected_wpo) = values["sequence_logps"], values["wpo_logps"]
        else:
            chosen, rejected = pair_logps(loop.trained, rows, loop.chunk, **options)
            chosen_wpo = rejected_wpo = None
        ref_c, ref_r = loop.eval_reference(split, rows) if loop.uses_reference else (None, None)
        lp = PairLogps(chosen=chosen, rejected=rejected, chosen_tokens=response_tokens(rows["chosen_response"]),
                       rejected_tokens=response_tokens(rows["rejected_response"]), ref_chosen=ref_c,
                       ref_rejected=ref_r, chosen_wpo=chosen_wpo, rejected_wpo=rejected_wpo)
        out = compute_preference_loss(lp, self.spec)
        return {
            "eval/loss": float(out.losses.mean()),
            "eval/rewards/accuracies": float((out.chosen_rewards > out.rejected_rewards).float().mean()),
            "eval/rewards/margins": float((out.chosen_rewards - out.rejected_rewards).mean()),
            "eval/logps_accuracy": float((lp.chosen_mean > lp.rejected_mean).float().mean()),
            "eval/logps/chosen": float(chosen.mean()),
            "eval/logps/rejected": float(rejected.mean()),
        }


class RewardObjective(OfflineObjective):
    """Reward-model training: held-out pair accuracy, margin and Bradley-Terry loss."""

    def evaluate(self, loop: "OfflineTrainer", split: Split, rows: Batch) -> dict[str, float]:
        return reward_metrics(loop.trained, rows, loop.chunk)


class SFTObjective(OfflineObjective):
    """SFT: sequences; each row weighs 1 / the step's response tokens (a token mean); held-out NLL."""

    def collate(self, items: list[dict], pad_id: int) -> Batch:
        return sequences_batch(items, pad_id)

    def weight(self, rows: Batch, weight: torch.Tensor) -> torch.Tensor:
        return (weight > 0).float() / float(response_tokens(rows["response_mask"]).sum().clamp(min=1))

    def evaluate(self, loop: "OfflineTrainer", split: Split, rows: Batch) -> dict[str, float]:
        return sft_metrics(loop.trained, rows, loop.chunk)


class OfflineTrainer(TrainingLoop):
    """Drives one trained worker group (and the DPO reference) through ``train_iters`` steps."""

    def __init__(self, config: ResolvedConfig, trained, train: Split, eval_split: Optional[Split], *,
                 objective: OfflineObjective, pad_token_id: int, tracker, ref=None,
                 ref_cache: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        """``ref_cache`` maps a dataset prefix to the reference's (chosen, rejected) log-probs of all its rows. With
        ``config.reference_is_actor_base`` the trained (LoRA) group's base is the live reference."""
        super().__init__(config, trained, tracker=tracker,
                         sampler=PromptSampler(len(train), seed=config.training.seed, shuffle=config.data.shuffle))
        base = config.reference_is_actor_base
        self.ref, self.ref_cache, self.objective = (trained if base else ref), ref_cache, objective
        self.ref_method = "reference_logprobs" if base else "sequence_logprobs"
        self.train, self.eval_split, self.pad_token_id = train, eval_split, pad_token_id
        self.role = config.roles[config.trained_role]
        self.uses_reference = "ref" in config.roles or base  # placed only when the loss reads a reference
        self.chunk = max(config.training.global_batch_size, 1)
        self.logprob_options = logprob_options(config.algorithm.ld_alpha)  # the reference's sums: LD-DPO
        # (the resolution refuses a refresh without a reference model: reference-free losses, a LoRA base, a cache)
        self.ref_refresh = ReferenceRefresh(config.algorithm.ref_update if self.uses_reference else RefUpdateConfig(),
                                            trained, self.ref,
                                            senders=config.parallel(config.trained_role).pipeline_model_parallel_size)
        self._eval_ref: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._prefetched: Optional[tuple] = None

    # -- the loop's hooks (TrainingLoop.fit runs them) --------------------------------------
    @property
    def evaluates(self) -> bool:
        return self.eval_split is not None

    def start_evaluation(self) -> None:
        if self.evaluates:
            initial = {f"{k}_initial": v for k, v in self.evaluate().items()}
            self.summary.update(initial)
            self.tracker.print("initial evaluation: " + _format(initial))

    def finish(self) -> dict[str, Any]:
        if self.evaluates:
            final = self.evaluate()
            self.summary.update(final)
            self.tracker.print("final evaluation: " + _format(final))
        self.summary["epochs"] = self.c.training.train_iters * self.c.training.global_batch_size / len(self.train)
        return self.summary

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step. With a live reference, the next step's reference forward is queued
        on the ref group while the trained group updates (the data order is fixed by the seed)."""
        timer = StepTimer()
        start = time.perf_counter()
        positions, rows, pending_ref = self._prefetched or self.fetch()
        self._prefetched = None
        if pending_ref is not None:
            logps = timer.collect("reference", [pending_ref])["sequence_logps"]
            rows = rows.update({"ref_chosen_logps": logps[: len(rows)], "ref_rejected_logps": logps[len(rows):]})
        elif self.uses_reference:
            ref_c, ref_r = timer.run("reference", self.reference_logps, self.train, positions, rows)
            rows = rows.update({"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r})
        pending_update = self.trained.call_async("update", self.layout(rows, step))
        refresh = self.ref_refresh.due(step)  # TR-DPO: the next step's reference runs on the refreshed weights
        if self.ref_cache is None and self.uses_reference and step < self.c.training.train_iters and not refresh:
            self._prefetched = self.fetch()
        metrics = timer.collect("update", [pending_update])
        metrics = {k: v for k, v in metrics.items() if k != "compute_s"}
        if refresh:
            timer.run("ref_refresh", self.ref_refresh.refresh, step)
            self._eval_ref = None  # the held-out reference log-probs are the refreshed reference's from now on
        metrics.update(self.ref_refresh.metrics())
        metrics["epoch"] = step * self.c.training.global_batch_size / len(self.train)
        step_s = time.perf_counter() - start
        metrics.update({f"timing/{k}": v for k, v in timer.wall.items()})
        metrics["timing/step"] = step_s
        metrics["timing/orchestration"] = step_s - timer.critical
        return metrics

    def before_training(self) -> None:
        self.ref_refresh.join()

    def trainer_state(self) -> dict[str, Any]:
        return self.ref_refresh.state()

    def save_extra(self, directory: Path) -> None:
        self.ref_refresh.save(directory)

    def after_restore(self, directory: Path, state: dict[str, Any]) -> None:
        self.ref_refresh.restore(directory, state)  # a refreshed reference (TR-DPO) is the checkpoint's

    def fetch(self) -> tuple[list[int], Batch, Any]:
        """The next batch's positions and rows, and the started live-reference call (or None)."""
        positions = self.sampler.next(self.c.training.global_batch_size)
        rows = self.collate(self.train, positions)
        pending = None
        if self.uses_reference and self.ref_cache is None:
            pending = self.ref.call_async(self.ref_method, pairs_as_samples(rows), **self.logprob_options)
        return positions, rows, pending

    def collate(self, split: Split, positions: Sequence[int]) -> Batch:
        return self.objective.collate(split.items(positions), self.pad_token_id)

    def reference_logps(self, split: Split, positions: Sequence[int], rows: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_cache is not None:
            chosen, rejected = self.ref_cache[split.dataset.prefix]
            index = torch.tensor([split.rows[i] for i in positions], dtype=torch.long)
            return chosen[index], rejected[index]
        return pair_logps(self.ref, rows, self.chunk, self.ref_method, **self.logprob_options)

    def layout(self, rows: Batch, step: int) -> Batch:
        """One mini-batch of the whole step, dealt to DP ranks, weighted by the objective."""
        index, minibatch, weight = minibatch_layout(
            len(rows), mini_batch_size=len(rows), dp_size=self.c.dp_size(self.c.trained_role),
            micro_batch_size=self.role.micro_batch_size, epochs=1, shuffle=False, seed=step)
        return rows.rows(index).update({"minibatch": minibatch, "weight": self.objective.weight(rows, weight)})

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        split = self.eval_split
        return self.objective.evaluate(self, split, self.collate(split, range(len(split))))

    def eval_reference(self, split: Split, rows: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's log-probs of the held-out rows, scored once per reference (a TR-DPO refresh clears them)."""
        if self._eval_ref is None:
            self._eval_ref = self.reference_logps(split, range(len(split)), rows)
        return self._eval_ref


def reward_metrics(group, pairs: Batch, chunk: int) -> dict[str, float]:
    """Pair accuracy, mean margin and Bradley-Terry loss of a reward model on ``pairs``."""
    chosen, rejected = score_pairs(group, "score", "scores", pairs, chunk)
    return {"eval/accuracy": float((chosen > rejected).float().mean()),
            "eval/margin": float((chosen - rejected).mean()),
            "eval/loss": float(bradley_terry_loss(chosen, rejected).mean())}


def sft_metrics(group, rows: Batch, chunk: int) -> dict[str, float]:
    """Token-mean negative log-likelihood of the responses (and its perplexity)."""
    total, tokens = 0.0, 0.0
    for start in range(0, len(rows), chunk):
        part = rows.rows(slice(start, start + chunk))
        total += float(group.sequence_logprobs(part)["sequence_logps"].sum())
        tokens += float(response_tokens(part["response_mask"]).sum())
    nll = -total / max(tokens, 1.0)
    return {"eval/loss": nll, "eval/perplexity": math.exp(min(nll, 50.0))}


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
