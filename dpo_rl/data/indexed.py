"""Reading what ``preprocess_data.py`` wrote: datasets, collation, and a resumable DP sampler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dpo_rl import seeds
from dpo_rl.data.formats import META_SUFFIX, InputError


class TokenizedDataset(torch.utils.data.Dataset):
    """The fields of one preprocessed prefix; item ``i`` maps field -> int32 token array."""

    def __init__(self, prefix: str | Path) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        meta_path = Path(self.prefix + META_SUFFIX)
        if not meta_path.is_file():
            raise InputError(f"{meta_path} is missing: {self.prefix} is not a complete preprocessed dataset "
                             "(re-run preprocess_data.py)")
        self.meta = json.loads(meta_path.read_text())
        self.fields = tuple(self.meta["fields"])
        self.parts = {f: IndexedDataset(f"{self.prefix}_{f}") for f in self.fields}
        sizes = {f: len(d) for f, d in self.parts.items()}
        if set(sizes.values()) != {self.meta["num_examples"]}:
            raise InputError(f"{self.prefix}: field sizes {sizes} disagree with its meta file "
                             f"({self.meta['num_examples']} examples); re-run preprocess_data.py")

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def __len__(self) -> int:
        return self.meta["num_examples"]

    def max_token_id(self) -> int:
        """The largest token id in any field (one pass over the memory-mapped ``.bin`` files)."""
        largest = -1
        for name, part in self.parts.items():
            tokens = np.memmap(f"{self.prefix}_{name}.bin", dtype=part.index.dtype, mode="r")
            if tokens.size:
                largest = max(largest, int(tokens.max()))
            del tokens
        return largest

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        # Copies: megatron returns views into a memory map that closes with the dataset.
        return {f: np.array(d[index], dtype=np.int32, copy=True) for f, d in self.parts.items()}


def collate_prompts(items: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt_ids`` / ``prompt_mask`` [b, P]."""
    width = max(len(i["prompt"]) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["prompt"])
        ids[row, width - n:] = torch.from_numpy(item["prompt"].astype(np.int64))
        mask[row, width - n:] = 1
    return {"prompt_ids": ids, "prompt_mask": mask}


def collate_pairs(items: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences (prompt + response, right-padded to one width) with masks."""
    width = max(len(i["prompt"]) + max(len(i["chosen"]), len(i["rejected"])) for i in items)
    out = {}
    for side in ("chosen", "rejected"):
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        response = torch.zeros_like(ids)
        for row, item in enumerate(items):
            p, r = len(item["prompt"]), len(item[side])
            ids[row, : p + r] = torch.from_numpy(np.concatenate([item["prompt"], item[side]]).astype(np.int64))
            attention[row, : p + r] = 1
            response[row, p : p + r] = 1
        out.update({f"{side}_ids": ids, f"{side}_attention": attention, f"{side}_response": response})
    return out


def collate_sequences(items: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT examples: ``sequences`` (prompt + response, right-padded), ``attention_mask``, ``response_mask``."""
    width = max(len(i["prompt"]) + len(i["response"]) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for row, item in enumerate(items):
        p, r = len(item["prompt"]), len(item["response"])
        ids[row, : p + r] = torch.from_numpy(np.concatenate([item["prompt"], item["response"]]).astype(np.int64))
        attention[row, : p + r] = 1
        response[row, p : p + r] = 1
    return {"sequences": ids, "attention_mask": attention, "response_mask": response}


class DataParallelSampler:
    """Indices for one DP rank: each global batch is split into equal contiguous shares.

    Seeded shuffling per epoch; ``consumed_samples`` (global) resumes exactly where a run stopped.
    """

    def __init__(self, size: int, *, global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True, consumed_samples: int = 0) -> None:
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be a multiple of the DP size ({dp_size})")
        self.size, self.global_batch_size = size, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.consumed_samples = consumed_samples
        self._order: tuple[int, torch.Tensor] | None = None

    def _global_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, torch.randperm(self.size, generator=torch.Generator().manual_seed(seeds.epoch_order(self.seed, epoch))))
        return int(self._order[1][offset])

    def __iter__(self) -> Iterator[list[int]]:
        share = self.global_batch_size // self.dp_size
        while True:
            start = self.consumed_samples + self.dp_rank * share
            yield [self._global_index(start + i) for i in range(share)]
            self.consumed_samples += self.global_batch_size
