"""The Batch container: invariants, splitting for DP ranks and reassembly."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.batch import Batch, drop_trailing_padding
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


def _samples(response_lengths, prompt=2, width=6):
    """Two-token prompts followed by responses of the given lengths, padded to ``width`` response columns."""
    rows = len(response_lengths)
    response = torch.tensor([[1] * n + [0] * (width - n) for n in response_lengths])
    attention = torch.cat([torch.ones(rows, prompt, dtype=torch.long), response], dim=1)
    return Batch({
        "sequences": torch.arange(rows * (prompt + width)).view(rows, -1),
        "attention_mask": attention,
        "response_mask": torch.cat([torch.zeros(rows, prompt, dtype=torch.long), response], dim=1),
        "rollout_logprobs": -response.float(),
        "ended_with_eos": torch.ones(rows, dtype=torch.bool),
    })


def test_drop_trailing_padding_keeps_every_real_token_and_nothing_after_the_longest():
    samples = _samples([1, 3])
    trimmed = drop_trailing_padding(samples)
    assert trimmed["sequences"].shape == (2, 5) and trimmed["rollout_logprobs"].shape == (2, 3)
    for key in ("sequences", "attention_mask", "response_mask"):
        assert torch.equal(trimmed[key], samples[key][:, :5])
    assert int(trimmed["response_mask"].sum()) == int(samples["response_mask"].sum()) == 4
    assert torch.equal(trimmed["rollout_logprobs"], samples["rollout_logprobs"][:, :3])
    assert torch.equal(trimmed["ended_with_eos"], samples["ended_with_eos"])


def test_drop_trailing_padding_leaves_a_full_batch_alone():
    samples = _samples([6, 2])
    assert drop_trailing_padding(samples) is samples


def test_pickled_batch_carries_cpu_tensors_as_arrays_and_comes_back_equal():
    import pickle

    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    tensors = {
        "ids": torch.arange(8, dtype=torch.long).view(4, 2),
        "ended": torch.tensor([True, False, True, True]),
        "half": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
        "strided": base[:, ::2],  # a non-contiguous view: only its own values travel
        "grad": torch.ones(4, requires_grad=True),  # autograd state: PyTorch's own pickling keeps it
    }
    batch = Batch(tensors, {"compute_s": 0.5})
    payload = pickle.dumps(batch, protocol=5)
    back = pickle.loads(payload)
    assert back.meta == {"compute_s": 0.5} and list(back.keys()) == list(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key].detach(), tensor.detach()), key
    assert back["grad"].requires_grad
    back["ids"][0, 0] = 99  # writable, and not shared with the sender's tensor
    assert tensors["ids"][0, 0] == 0
    # Only the requires-grad tensor went through PyTorch's tensor pickling (~0.2 ms per tensor each way).
    assert payload.count(b"_rebuild_tensor") + payload.count(b"_rebuild_from_type") <= 1
    assert pickle.dumps(Batch({k: v for k, v in tensors.items() if k != "grad"})).count(b"torch._utils") == 0
