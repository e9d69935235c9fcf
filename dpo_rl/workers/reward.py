"""The reward role: a scalar-head Megatron model scoring prompt + response at its last real token.

:class:`RewardWorker` scores (online DPO, evaluation); :class:`RewardTrainerWorker` also
trains it with the Bradley-Terry loss (``stage: reward``).

When the reward model has its own tokenizer (``reward.tokenizer_name_or_path`` names a tokenizer
whose vocabulary or special ids differ from the actor's; a copy of the actor's at another path is the
same tokenizer), samples are decoded with the actor's tokenizer and re-encoded with the reward model's
before scoring.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from dpo_rl.batch import Batch
from dpo_rl.checkpoint.hf_weights import SCORE_HEAD_RULE
from dpo_rl.data.tokenizers import load_local_tokenizer, same_directory, tokenizer_difference, tokenizer_fingerprint
from dpo_rl.dispatch import Dispatch, register
from dpo_rl.workers.base import (
    MegatronWorker,
    Stopwatch,
    pair_microbatch,
    sequence_microbatch,
    split_pair_halves,
)
from dpo_rl.workers.trainable import TrainableWorker

logger = logging.getLogger(__name__)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b] index of each row's last real token."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


def needs_retokenizing(actor_tokenizer, reward_tokenizer) -> bool:
    """The reward model reads other ids than the actor writes: the tokenizers' vocabularies or special ids differ
    (:func:`~dpo_rl.data.tokenizers.tokenizer_difference`). The same tokenizer at another path passes the actor's
    ids as they are (a decode/encode round trip could split the text differently)."""
    return tokenizer_difference(tokenizer_fingerprint(actor_tokenizer), tokenizer_fingerprint(reward_tokenizer)) is not None


def _score_compute(output, micro):
    values = micro.padded(output)[..., 0]
    last = last_token_index(micro.attention_mask)
    return values.sum() * 0, {"scores": values.gather(1, last[:, None])[:, 0].float()}


class RewardWorker(MegatronWorker):
    """Scores samples with a reward model."""

    reward_model = True

    def __init__(self, *, actor_tokenizer: Optional[str] = None, pad_token_id: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        own = self.role.tokenizer_name_or_path
        # decided in init_distributed: a different path may hold the same tokenizer
        self.retokenize = actor_tokenizer is not None and own is not None and not same_directory(actor_tokenizer, own)
        self.actor_tokenizer_path, self.pad_token_id = actor_tokenizer, pad_token_id

    def init_distributed(self, address: str, port: int):
        ranks = super().init_distributed(address, port)
        if self.retokenize:
            self.actor_tokenizer = load_local_tokenizer(self.actor_tokenizer_path,
                                                        "actor_rollout_ref.actor_rollout.tokenizer_name_or_path")
            self.own_tokenizer = load_local_tokenizer(self.role.tokenizer_name_or_path, "reward.tokenizer_name_or_path")
            self.retokenize = needs_retokenizing(self.actor_tokenizer, self.own_tokenizer)
        return ranks

    @register(Dispatch.DP)
    def score(self, samples: Batch) -> Batch:
        """``scores`` [S]: the reward model's value at each sample's last real token."""
        with Stopwatch() as watch:
            # the response mask lets packed rows share each prompt among its samples (the re-encoded rows have none)
            keys = ["sequences", "attention_mask", *(["response_mask"] if "response_mask" in samples else [])]
            inputs = self._retokenized(samples) if self.retokenize else samples.select(keys)
            extras = {"response_mask": "response_mask"} if "response_mask" in inputs else None
            outputs = self.forward_only(self.to_device(inputs), lambda part: sequence_microbatch(part, extras=extras),
                                        _score_compute)
            scores = (torch.cat([o["scores"] for o in outputs])[: len(samples)].cpu()
                      if outputs else torch.zeros(len(samples)))
        result = Batch({"scores": scores})
        result.meta["compute_s"] = watch.seconds
        return result

    def _retokenized(self, samples: Batch) -> Batch:
        texts = [
            self.actor_tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=False)
            for row, mask in zip(samples["sequences"], samples["attention_mask"])
        ]
        encoded = [self.own_tokenizer.encode(t, add_special_tokens=False) for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.own_tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return Batch({"sequences": ids, "attention_mask": mask})


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigma(r_chosen - r_rejected) (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1)."""
    return -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores)


REWARD_STAT_KEYS = ("loss", "accuracy", "margin", "scores/chosen", "scores/rejected")


class RewardTrainerWorker(RewardWorker, TrainableWorker):
    """Trains the reward model on preference pairs (chosen should score higher).

    It may start from a causal LM (an SFT model, as reward models usually do): the trunk is
    loaded and the value head keeps its seeded initialisation, made identical on every TP
    rank. A checkpoint with a ``score`` head loads as is.
    """

    def init_distributed(self, address: str, port: int):
        ranks = super().init_distributed(address, port)
        self._sync_value_head()
        return ranks

    def _keep_value_head(self, checkpoint, directory: str) -> bool:
        if SCORE_HEAD_RULE.hf[0] in checkpoint.names:
            return False
        logger.warning("reward.load=%s has no %s: its trunk is loaded and the value head starts from a seeded "
                       "random initialisation (a reward model trained from a causal LM)", directory,
                       SCORE_HEAD_RULE.hf[0])
        return True

    def _sync_value_head(self) -> None:
        """TP ranks hold replicas of the head: give them all TP rank 0's values (a no-op for a loaded head)."""
        from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

        head = dict(self.model.named_parameters()).get(SCORE_HEAD_RULE.mcore)
        if head is not None and mpu.get_tensor_model_parallel_world_size() > 1:
            with torch.no_grad():
                torch.distributed.broadcast(head.data, mpu.get_tensor_model_parallel_src_rank(),
                                            group=mpu.get_tensor_model_parallel_group())

    @register(Dispatch.DP)
    def update(self, rows: Batch) -> dict[str, float]:
        """One Bradley-Terry step over this rank's share of the step's pairs (``minibatch``/``weight`` as the actor's)."""
        with Stopwatch() as watch:
            metrics = self.train_minibatches(rows, pair_microbatch, self._loss, REWARD_STAT_KEYS)
        metrics["compute_s"] = watch.seconds
        return metrics

    def _loss(self, averaged_over: int):
        def compute(output, micro):
            values = micro.padded(output)[..., 0].float()
            scores = values.gather(1, last_token_index(micro.attention_mask)[:, None])[:, 0]
            chosen, rejected = split_pair_halves(scores)
            weight = micro.extras["weight"]
            losses = bradley_terry_loss(chosen, rejected)
            detached = {"count": (weight > 0).float(), "loss": losses.detach(),
                        "accuracy": (chosen > rejected).float(), "margin": (chosen - rejected).detach(),
                        "scores/chosen": chosen.detach(), "scores/rejected": rejected.detach()}
            return (losses * weight).sum() * averaged_over, detached

        return compute
