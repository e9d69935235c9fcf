"""The reward worker re-tokenizes samples when the reward model has its own tokenizer."""

from __future__ import annotations

import torch

from dpo_rl.batch import Batch
from dpo_rl.workers.reward import RewardWorker, last_token_index


def test_last_token_index_handles_left_and_right_padding():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 2]


def test_retokenized_batch_is_right_padded_text_of_the_real_tokens(tmp_path):
    from transformers import AutoTokenizer

    from examples.tiny_world.build import build_tokenizer

    build_tokenizer(tmp_path / "actor_tok")
    actor = AutoTokenizer.from_pretrained(tmp_path / "actor_tok")
    worker = RewardWorker.__new__(RewardWorker)  # only the tokenizer plumbing is under test
    worker.actor_tokenizer = worker.own_tokenizer = actor
    texts = ["Describe the lake at dawn.\nIt was fine.", "Describe the farm at noon.\nThe farm had cold wind."]
    encoded = [actor.encode(t) for t in texts]
    width = max(map(len, encoded)) + 2
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, tokens in enumerate(encoded):  # left padding, as samples come from the actor
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    out = worker._retokenized(Batch({"sequences": ids, "attention_mask": mask}))
    for row, tokens in enumerate(encoded):
        assert out["sequences"][row, : len(tokens)].tolist() == tokens
        assert out["attention_mask"][row].sum() == len(tokens)
        assert actor.decode(out["sequences"][row][out["attention_mask"][row].bool()].tolist()) == texts[row]
