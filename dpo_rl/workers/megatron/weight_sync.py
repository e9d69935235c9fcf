"""Trainer -> rollout weight sync over a process group of their own, never through the driver.

The training ranks and the rollout ranks live in different torch.distributed worlds (each role
has its own), so the sync uses process groups built directly on a TCP store: one group per
pipeline stage of the trainer, joining that stage's sender (TP rank 0 of DP replica 0; rank 0
of the group) and every rollout rank (ranks 1..R). gloo on CPU, nccl on CUDA.

The wire format is the bucket stream of :mod:`dpo_rl.checkpoint.hf_stream`: for each bucket the
sender broadcasts a length, a JSON table ``[(name, dtype, shape, offset), ...]`` and one flat
byte buffer holding the tensors; a length of 0 ends the stage's stream. Receivers view the
tensors in the buffer (no copy) and hand the bucket on (:func:`receive_buckets` is an iterator
of buckets, the interface a rollout engine consumes). Each side holds about one bucket at a time.

The store (:func:`~dpo_rl.workers.megatron.parallel_state.host_store`) listens on the address the
ranks use, not on every interface; each gloo group opens its sockets on its rank's node address.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from dpo_rl.checkpoint.hf_stream import HFGroup
from dpo_rl.workers.megatron.parallel_state import Rendezvous

END_OF_STREAM = 0


def sync_group(store: Rendezvous, stage: int, rank: int, size: int, device: str, local_address: str,
               timeout_s: float = 600.0, channel: str = "rollout"):
    """The process group of trainer stage ``stage``'s sync (``rank`` 0 = the sender) on ``channel`` (the receiving
    role: ``rollout`` ranks, or the ``ref`` ranks a reference refresh streams to)."""
    prefixed = dist.PrefixStore(f"weight_sync/{channel}/stage{stage}", store.store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cpu":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address)]
        options._timeout = timeout
        return dist.ProcessGroupGloo(prefixed, rank, size, options)
    if device == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    raise NotImplementedError(f"weight sync over {device!r} process groups is not implemented (cpu, cuda)")


def _broadcast(group, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    options.rootTensor = 0
    group.broadcast([tensor], options).wait()


def send_buckets(group, buckets: Iterable[HFGroup], device: torch.device) -> int:
    """Broadcast every bucket from this (rank 0) process, then the end mark; returns the bytes sent."""
    sent = 0
    for bucket in buckets:
        table, offset = [], 0
        for name, tensor in bucket:
            table.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
            offset += tensor.numel() * tensor.element_size()
        flat = torch.empty(offset, dtype=torch.uint8, device=device)
        for (_, tensor), (_, _, _, start) in zip(bucket, table):
            data = tensor.contiguous().view(-1).view(torch.uint8)
            flat[start:start + data.numel()].copy_(data)
        meta = torch.frombuffer(bytearray(json.dumps(table).encode()), dtype=torch.uint8).to(device)
        _broadcast(group, torch.tensor([meta.numel(), offset], dtype=torch.int64, device=device))
        _broadcast(group, meta)
        _broadcast(group, flat)
        sent += offset
        del flat
    _broadcast(group, torch.tensor([END_OF_STREAM, 0], dtype=torch.int64, device=device))
    return sent


def receive_buckets(group, device: torch.device) -> Iterator[HFGroup]:
    """The buckets one sender broadcasts, as ``[(name, tensor), ...]`` viewing a fresh buffer each."""
    while True:
        header = torch.zeros(2, dtype=torch.int64, device=device)
        _broadcast(group, header)
        meta_len, data_len = (int(v) for v in header.tolist())
        if meta_len == END_OF_STREAM:
            return
        meta = torch.empty(meta_len, dtype=torch.uint8, device=device)
        _broadcast(group, meta)
        flat = torch.empty(data_len, dtype=torch.uint8, device=device)
        _broadcast(group, flat)
        table = json.loads(meta.cpu().numpy().tobytes().decode())
        bucket = []
        for name, dtype, shape, start in table:
            dt = getattr(torch, dtype)
            nbytes = math.prod(shape) * dt.itemsize
            bucket.append((name, flat[start:start + nbytes].view(dt).view(shape)))
        yield bucket
