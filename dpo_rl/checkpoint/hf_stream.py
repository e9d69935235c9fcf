"""HF-named weights as a stream: produced stage by stage from a sharded model, consumed bucket by bucket.

The weight sync of a split actor (:mod:`dpo_rl.workers.megatron.weight_sync`) and, later, other
rollout engines share this shape: an iterator of **buckets**, each a list of ``(hf_name, tensor)``
with full (unsharded) HF tensors, of about a configured size.

* :func:`stage_hf_groups` yields one pipeline stage's weights, one group per megatron tensor
  (the HF pieces it is made of: q/k/v, gate/up, ...), gathered over the stage's TP ranks
  (a collective over the TP group; TP rank 0 receives the tensors, the others yield nothing).
* :func:`buckets` packs groups into buckets without splitting a group.
* :class:`StreamingLoader` takes a stream of HF tensors into a model shard of any TP/PP layout:
  each megatron tensor is sharded and copied as soon as its HF pieces have arrived, so only a
  bucket is held at a time; :meth:`StreamingLoader.finish` raises if anything was left unfilled.
* :class:`WeightsDigest` is a checksum over names and bytes that does not depend on the order the
  tensors arrive in, so a sender and a receiver (or a re-export) can compare.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import torch

from dpo_rl.checkpoint.hf_weights import (
    HFGroup,
    combine,
    copy_local_tensor,
    key_map,
    local_tensor_names,
    model_tensors,
    shard,
    stage_hf_groups,
    uses_te_names,
)
from dpo_rl.config.model import ModelConfig
from dpo_rl.errors import ConfigError

__all__ = ["HFGroup", "StreamingLoader", "WeightsDigest", "buckets", "stage_hf_groups", "weights_checksum"]


def group_bytes(group: HFGroup) -> int:
    return sum(t.numel() * t.element_size() for _, t in group)


def buckets(groups: Iterable[HFGroup], bucket_bytes: int) -> Iterator[HFGroup]:
    """Pack groups into buckets of at most ``bucket_bytes`` (a group larger than that is a bucket alone)."""
    current: HFGroup = []
    size = 0
    for group in groups:
        nbytes = group_bytes(group)
        if current and size + nbytes > bucket_bytes:
            yield current
            current, size = [], 0
        current.extend(group)
        size += nbytes
    if current:
        yield current


class StreamingLoader:
    """Loads HF tensors into this rank's model shard as they arrive (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, *, tp_rank: int, tp_size: int, pp_rank: int,
                 pp_size: int, reward: bool = False) -> None:
        self.config, self.tp_rank, self.tp_size = config, tp_rank, tp_size
        self.params = model_tensors(model)
        self.uses_te = uses_te_names(self.params)
        rules = key_map(config, reward=reward)
        #: every HF name of the model (all stages), and hf name -> (rule, layer, local name) for this shard
        self.known = {h.format(i=layer) for rule, layer, _ in local_tensor_names(rules, config, 0, 1) for h in rule.hf}
        self.wanted: dict[str, tuple] = {}
        for rule, layer, local_name in local_tensor_names(rules, config, pp_rank, pp_size):
            for h in rule.hf:
                self.wanted[h.format(i=layer)] = (rule, layer, local_name)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.filled: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Take one full HF tensor; tensors of other pipeline stages are skipped, unknown names refused."""
        target = self.wanted.get(name)
        if target is None:
            if name not in self.known:
                raise ConfigError([f"weight stream: {name!r} is no tensor of the configured model; do the two "
                                   "sides' model configs match?"])
            return
        rule, layer, local_name = target
        names = [h.format(i=layer) for h in rule.hf]
        parts = self.pending.setdefault(local_name, {})
        if len(parts) + 1 < len(names):
            parts[name] = tensor.clone()  # held past this bucket: own the memory
            return
        parts[name] = tensor
        del self.pending[local_name]
        local = shard(combine(rule, [parts[n] for n in names], self.config), rule.tp_split, self.tp_rank,
                      self.tp_size)
        target_name, problem = copy_local_tensor(self.params, local_name, local, uses_te=self.uses_te, label=f"weight stream {names[0]!r}")
        if problem:
            raise ConfigError([problem])
        self.filled.add(target_name)

    def add_bucket(self, bucket: HFGroup) -> None:
        for name, tensor in bucket:
            self.add(name, tensor)

    def finish(self) -> int:
        """Check every parameter of the shard was filled; returns how many were."""
        unfilled = sorted(set(self.params) - self.filled)
        if self.pending or unfilled:
            raise ConfigError([f"weight stream ended with parameters not filled: {unfilled[:5]}"
                               f"{' (incomplete: ' + str(sorted(self.pending)[:5]) + ')' if self.pending else ''}"])
        return len(self.filled)


class WeightsDigest:
    """sha256 over (name, sha256 of the tensor's bytes) in name order: independent of arrival order."""

    def __init__(self) -> None:
        self.tensors: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        self.tensors[name] = hashlib.sha256(data).hexdigest()

    def add_bucket(self, bucket: HFGroup) -> None:
        for name, tensor in bucket:
            self.add(name, tensor)

    def update(self, other: dict[str, str]) -> None:
        self.tensors.update(other)

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            digest.update(name.encode())
            digest.update(self.tensors[name].encode())
        return digest.hexdigest()


def weights_checksum(state: dict[str, torch.Tensor]) -> str:
    """:class:`WeightsDigest` of a whole state dict."""
    digest = WeightsDigest()
    for name, tensor in state.items():
        digest.add(name, tensor)
    return digest.hexdigest()
