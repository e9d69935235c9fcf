"""The Batch container: invariants, splitting for DP ranks and reassembly."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.batch import Batch
from dpo_rl.runtime.worker_group import collect_dp, split_for_dp


def test_rows_must_agree():
    with pytest.raises(ValueError, match="disagree"):
        Batch({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_split_pads_and_collect_trims_back():
    batch = Batch({"x": torch.arange(7), "y": torch.arange(7) * 10})
    shards, rows = split_for_dp(batch, 3)
    assert [len(s) for s in shards] == [3, 3, 3] and rows == 7
    assert shards[2]["x"].tolist() == [6, 6, 6]  # padding repeats the last row
    back = collect_dp(shards, rows)
    assert back["x"].tolist() == list(range(7)) and back["y"].tolist() == [i * 10 for i in range(7)]


def test_chunk_requires_even_split_and_concat_requires_same_keys():
    batch = Batch({"x": torch.arange(5)})
    with pytest.raises(ValueError, match="pad the batch first"):
        batch.chunk(2)
    with pytest.raises(ValueError, match="disagree on keys"):
        Batch.concat([batch, Batch({"z": torch.arange(2)})])


def test_collect_non_batch_takes_dp_rank_zero():
    assert collect_dp([{"loss": 1.0}, {"loss": 2.0}], rows=4) == {"loss": 1.0}
