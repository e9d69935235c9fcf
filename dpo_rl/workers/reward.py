"""The reward role: a scalar-head Megatron model scoring prompt + response at its last real token.

When the reward model has its own tokenizer (``reward.tokenizer_name_or_path`` differs from
the actor's), samples are decoded with the actor's tokenizer and re-encoded with the
reward model's before scoring.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dpo_rl.batch import Batch
from dpo_rl.workers.base import MegatronWorker, Stopwatch, sequence_microbatch
from dpo_rl.workers.worker_group import Dispatch, register


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b] index of each row's last real token."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


def _score_compute(output, micro):
    values = output[..., 0]
    last = last_token_index(micro.attention_mask)
    return values.sum() * 0, {"scores": values.gather(1, last[:, None])[:, 0].float()}


class RewardWorker(MegatronWorker):
    """Scores samples with a reward model."""

    reward_model = True

    def __init__(self, *, actor_tokenizer: Optional[str] = None, pad_token_id: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        own = self.role.tokenizer_name_or_path
        self.retokenize = actor_tokenizer is not None and own is not None and actor_tokenizer != own
        self.actor_tokenizer_path, self.pad_token_id = actor_tokenizer, pad_token_id

    def init_distributed(self, address: str, port: int):
        ranks = super().init_distributed(address, port)
        if self.retokenize:
            from transformers import AutoTokenizer

            self.actor_tokenizer = AutoTokenizer.from_pretrained(self.actor_tokenizer_path)
            self.own_tokenizer = AutoTokenizer.from_pretrained(self.role.tokenizer_name_or_path)
        return ranks

    @register(Dispatch.DP)
    def score(self, samples: Batch) -> Batch:
        """``scores`` [S]: the reward model's value at each sample's last real token."""
        with Stopwatch() as watch:
            inputs = self._retokenized(samples) if self.retokenize else samples.select(["sequences", "attention_mask"])
            outputs = self.forward_only(self.to_device(inputs), sequence_microbatch, _score_compute)
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
