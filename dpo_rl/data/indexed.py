"""Reading what ``preprocess_data.py`` wrote: datasets, collation, and a resumable DP sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dpo_rl.data.formats import META_SUFFIX, InputError


class TokenizedDataset(torch.utils.data.Dataset):
    """The fields of one preprocessed prefix; item ``i`` maps field -> int32 token array."""

    def __init__(self, prefix: str | Path) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # deferred: heavy (megatron-core)

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
