"""The one batch type that crosses the Ray boundary.

A :class:`Batch` is a dict of tensors that share their first dimension (rows) plus a
small ``meta`` dict. Keys used by the online-DPO loop (B prompts x n responses = S
samples, N pairs, L = prompt block + response width):

| key                          | shape  | dtype | meaning                                          |
|------------------------------|--------|-------|--------------------------------------------------|
| ``prompt_ids``               | [B, P] | long  | left-padded prompt tokens                        |
| ``prompt_mask``              | [B, P] | long  | 1 on real prompt tokens                          |
| ``prompt_index``             | [S]    | long  | which prompt of the step a sample answers        |
| ``sequences``                | [S, L] | long  | prompt block followed by the response            |
| ``attention_mask``           | [S, L] | long  | 1 on real tokens                                 |
| ``response_mask``            | [S, L] | long  | 1 on response tokens (EOS included)              |
| ``ended_with_eos``           | [S]    | bool  | response stopped at EOS                          |
| ``rollout_logprobs``         | [S, R] | float | the engine's raw log-prob of each sampled token (R = response width; 0 after EOS) |
| ``policy_version``           | [S]    | long  | actor updates the sampling weights reflected     |
| ``scores``                   | [S]    | float | reward-model score (before the EOS penalty)      |
| ``{chosen,rejected}_ids``    | [N, L] | long  | the pair's two sequences                         |
| ``{chosen,rejected}_attention`` / ``_response`` | [N, L] | long | their masks               |
| ``ref_{chosen,rejected}_logps`` | [N] | float | summed reference log-probs of the responses      |
| ``{chosen,rejected}_rollout_logps`` | [N, L] | float | ``rollout_logprobs`` by token position (0 on the prompt), for the log-prob gap |
| ``minibatch``                | [N]    | long  | mini-batch (optimizer step) a pair belongs to    |
| ``weight``                   | [N]    | float | 1 / real pairs in its mini-batch; 0 on padding   |

Rows added only to make a split even carry ``weight`` 0 (pairs) or are dropped by
``trim`` on the way back (samples).

A batch pickles (Ray's serialization of call arguments and results) its CPU tensors as NumPy arrays:
PyTorch's own tensor pickling costs ~0.2 ms per tensor each way, so a 12-tensor pair batch took ~6 ms
per Ray call where the arrays take ~1.4 ms (a call with no argument: ~1 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch


@dataclass
class Batch:
    """Tensors sharing dimension 0, and metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError unless every tensor has the same number of rows."""
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch tensors disagree on the number of rows: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def __reduce__(self):
        return _unpickle_batch, ({k: _to_portable(v) for k, v in self.tensors.items()}, self.meta)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    def select(self, keys: Iterable[str]) -> "Batch":
        return Batch({k: self.tensors[k] for k in keys}, dict(self.meta))

    def rows(self, index: torch.Tensor | Sequence[int] | slice) -> "Batch":
        """The rows ``index`` (a slice, an index list or a long tensor)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return Batch({k: v[index] for k, v in self.tensors.items()}, dict(self.meta))

    def update(self, other: "Batch | dict[str, torch.Tensor]") -> "Batch":
        """A new batch with ``other``'s tensors added (same rows)."""
        extra = other.tensors if isinstance(other, Batch) else other
        return Batch({**self.tensors, **extra}, dict(self.meta))

    def chunk(self, parts: int) -> list["Batch"]:
        """``parts`` equal contiguous chunks; the row count must divide evenly (pad first)."""
        if len(self) % parts:
            raise ValueError(f"cannot split {len(self)} rows into {parts} equal parts; pad the batch first")
        size = len(self) // parts
        return [self.rows(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def pad_to_multiple(self, multiple: int) -> tuple["Batch", int]:
        """Repeat the last row until the row count is a multiple; returns (batch, rows added).

        Callers mark padded rows inert (``weight`` 0) or drop them with :meth:`trim`.
        """
        extra = (-len(self)) % multiple
        if extra == 0:
            return self, 0
        index = torch.cat([torch.arange(len(self)), torch.full((extra,), len(self) - 1)])
        return self.rows(index), extra

    def trim(self, rows: int) -> "Batch":
        """The first ``rows`` rows (drops padding added by :meth:`pad_to_multiple`)."""
        return self.rows(slice(0, rows))

    @staticmethod
    def concat(batches: Sequence["Batch"]) -> "Batch":
        """Rows of every batch, in order (same keys; metadata of the first)."""
        if not batches:
            raise ValueError("nothing to concatenate")
        keys = list(batches[0].keys())
        for b in batches[1:]:
            if list(b.keys()) != keys:
                raise ValueError(f"batches disagree on keys: {keys} vs {list(b.keys())}")
        return Batch({k: torch.cat([b[k] for b in batches]) for k in keys}, dict(batches[0].meta))


def drop_trailing_padding(samples: Batch) -> Batch:
    """``samples`` without the response columns that no row reaches.

    The sampling ranks return sequences ``max_new_tokens`` wide (so shards concatenate), but a
    step's longest response is often much shorter; every later forward (reward, reference,
    update) would compute those all-padding positions. Cuts ``sequences``/``attention_mask``/
    ``response_mask`` [S, L] after the last real token of any row and ``rollout_logprobs``
    [S, R] to the same response width; other keys are unchanged.
    """
    width = samples["attention_mask"].shape[1]
    real_columns = samples["attention_mask"].any(dim=0).nonzero()
    keep = int(real_columns[-1]) + 1 if len(real_columns) else width
    if keep == width:
        return samples
    response_width = samples["rollout_logprobs"].shape[1] - (width - keep)
    return samples.update({
        **{k: samples[k][:, :keep] for k in ("sequences", "attention_mask", "response_mask")},
        "rollout_logprobs": samples["rollout_logprobs"][:, :max(response_width, 0)],
    })


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded ids [b, P] and mask [b, P] (1 on real tokens): the one left-padding
    of prompts, for generation and for prompt batches."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


#: dtypes NumPy lacks, pickled as a same-width integer view
_VIEWED_AS = {torch.bfloat16: torch.int16}


def _to_portable(tensor: torch.Tensor):
    """A CPU tensor as a NumPy array (with the dtype to view it back as, for bf16); anything else (a device
    tensor, one that needs its autograd state) as itself, for PyTorch's own pickling."""
    if tensor.device.type != "cpu" or tensor.requires_grad or tensor.is_sparse:
        return tensor
    viewed = _VIEWED_AS.get(tensor.dtype)
    try:
        if viewed is not None:
            return tensor.view(viewed).numpy(), str(tensor.dtype)
        return tensor.numpy()
    except (TypeError, RuntimeError):  # a dtype or layout NumPy cannot hold (float8, conjugate views)
        return tensor


def _from_portable(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple):
        array, dtype = value
        return _from_portable(array).view(getattr(torch, dtype.removeprefix("torch.")))
    # arrays unpickled from Ray's object store are read-only views of its buffers: copy those
    return torch.from_numpy(value if value.flags.writeable else value.copy())


def _unpickle_batch(tensors: dict, meta: dict) -> Batch:
    return Batch({k: _from_portable(v) for k, v in tensors.items()}, meta)
