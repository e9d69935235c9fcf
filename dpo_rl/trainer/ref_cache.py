"""Reference log-probs precomputed once per dataset and cached on disk (``algorithm.reference: precomputed``).

The cache file is named by a key over what determines its values: the dataset (meta file,
sizes and modification times of its ``.bin``/``.idx`` files), the reference model
(architecture, precision, seed, and the names, sizes and modification times of its
checkpoint files). A run that finds a file with its key reuses it; otherwise the reference
group scores every row once and the file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from dpo_rl.config.model import ModelConfig
from dpo_rl.config.schema import RoleConfig
from dpo_rl.data.formats import META_SUFFIX
from dpo_rl.data.indexed import TokenizedDataset
from dpo_rl.trainer.common import logprob_options
from dpo_rl.trainer.offline import pair_logps, pairs_batch

logger = logging.getLogger(__name__)


def _files_fingerprint(paths: list[Path]) -> str:
    parts = []
    for path in sorted(paths):
        stat = path.stat()
        parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def cache_key(dataset: TokenizedDataset, ref: RoleConfig, ref_model: ModelConfig, seed: int,
              ld_alpha: Optional[float] = None) -> str:
    digest = hashlib.sha256()
    prefix = Path(dataset.prefix)
    digest.update(Path(dataset.prefix + META_SUFFIX).read_bytes())
    digest.update(_files_fingerprint([p for p in prefix.parent.glob(prefix.name + "_*")
                                      if p.suffix in (".bin", ".idx")]).encode())
    digest.update(json.dumps(asdict(ref_model), sort_keys=True).encode())
    digest.update(f"{ref.params_dtype}|{seed}".encode())
    if ld_alpha is not None:  # LD-DPO's sums differ from the plain ones
        digest.update(f"ld_alpha={ld_alpha}".encode())
    if ref.load:
        load = Path(ref.load).resolve()
        digest.update(str(load).encode())
        digest.update(_files_fingerprint([p for p in load.rglob("*") if p.is_file()]).encode())
    return digest.hexdigest()[:24]


def cache_path(cache_dir: str | Path, dataset: TokenizedDataset, key: str) -> Path:
    return Path(cache_dir) / f"{Path(dataset.prefix).name}-{key}.pt"


def load_or_compute(group, dataset: TokenizedDataset, path: Path, *, pad_token_id: int, chunk: int,
                    method: str = "sequence_logprobs", ld_alpha: Optional[float] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) reference log-probs of every row of ``dataset`` (``group.method`` computes
    missing ones; LD-DPO's sums with ``ld_alpha``)."""
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("reference log-probs of %s: reusing %s", dataset.prefix, path)
        return cached["chosen"], cached["rejected"]
    chosen, rejected = [], []
    for start in range(0, len(dataset), chunk):
        rows = pairs_batch([dataset[i] for i in range(start, min(start + chunk, len(dataset)))], pad_token_id)
        c, r = pair_logps(group, rows, chunk, method, **logprob_options(ld_alpha))
        chosen.append(c)
        rejected.append(r)
    result = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected), "rows": len(dataset)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(result, tmp)
    os.replace(tmp, path)
    logger.info("reference log-probs of %s (%d rows) written to %s", dataset.prefix, len(dataset), path)
    return result["chosen"], result["rejected"]
