"""What every role worker shares: joining its torch.distributed world, building and loading
its Megatron-core model, forward-only passes in micro-batches, timing.

Workers are plain classes: a :class:`~dpo_rl.runtime.worker_group.RayWorkerGroup` runs them
as Ray actors; :class:`~dpo_rl.runtime.worker_group.LocalWorkerGroup` runs one in-process.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from dpo_rl.batch import Batch
from dpo_rl.checkpoint.convert import (
    MegatronCheckpoint,
    load_into_model,
    load_model_shard,
)
from dpo_rl.checkpoint.hf_files import HFCheckpoint
from dpo_rl.config.model import ModelConfig, ParallelConfig
from dpo_rl.config.schema import RoleConfig
from dpo_rl.workers.megatron.forward import Microbatch, run_microbatches
from dpo_rl.workers.megatron.hf_interop import load_into_current_rank
from dpo_rl.workers.megatron.model_factory import build_gpt_model, build_reward_model
from dpo_rl.workers.megatron.parallel_state import (
    free_port,
    init_distributed,
    seed_everything,
    torch_device,
)


class MegatronWorker:
    """One rank of a role: a Megatron-core model shard in its own process group."""

    reward_model = False

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        model_config: ModelConfig,
        parallel: ParallelConfig,
        role: RoleConfig,
        seed: int,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.model_config, self.parallel, self.role, self.seed = model_config, parallel, role, seed
        self.model = None
        self.ranks = None

    # -- set-up -------------------------------------------------------------------------
    def process_info(self) -> tuple[int, str]:
        """(pid, node address) of this rank's process: what the driver names when the rank fails."""
        return os.getpid(), node_address()

    def lower_cpu_priority(self, niceness: int) -> int:
        """Lower this process's CPU priority: add ``niceness`` (``role.cpu_niceness``, on Ray) to its niceness;
        returns the niceness it then has."""
        return os.nice(niceness)

    def rendezvous_endpoint(self) -> tuple[str, int]:
        """Address and a free port of this (rank 0) process for the group's rendezvous."""
        address = node_address()
        return address, free_port(address)

    def init_distributed(self, address: str, port: int):
        """Join the role's process group, build the model and load its weights; returns ranks."""
        torch.set_num_threads(self.role.num_threads)
        self.ranks = init_distributed(self.parallel, self.rank, self.world_size, address, port,
                                      local_address=node_address())
        seed_everything(self.seed, self.parallel.device)
        self.device = torch_device(self.parallel.device)
        self.model = self._build_model()
        if self.role.load:
            self._load(self.role.load)
        return self.ranks

    def _build_model(self):
        build = build_reward_model if self.reward_model else build_gpt_model
        return build(self.model_config, self.parallel, overrides=self.transformer_overrides(),
                     use_transformer_engine=self.use_transformer_engine())

    def use_transformer_engine(self) -> Optional[bool]:
        """TransformerEngine's layer spec: ``None`` = when installed on GPU (trained LoRA roles say no)."""
        return None

    def export_tensors(self) -> Optional[dict]:
        """The local-spec weights this rank's model computes with, when they are not its parameters as they are
        (``None`` here; a LoRA-trained role returns its weights with the adapters merged): what an HF export, a
        weight sync and an engine refresh send."""
        return None

    def transformer_overrides(self) -> dict:
        """Further ``TransformerConfig`` fields for this role's model (none; trained roles add recomputation)."""
        return {}

    def _load(self, directory: str) -> None:
        """Weights from a Megatron checkpoint (tools/checkpoint layout, same TP/PP) or an HF directory."""
        if MegatronCheckpoint.is_checkpoint(directory):
            r = self.ranks
            state = load_model_shard(directory, self.model_config, r.tp_rank, r.tp_size, r.pp_rank, r.pp_size,
                                    self.reward_model)
            load_into_model(self.model, state)
            return
        checkpoint = HFCheckpoint(directory)
        load_into_current_rank(self.model, checkpoint, self.model_config, reward=self.reward_model,
                               keep_value_head=self._keep_value_head(checkpoint, directory))

    def _keep_value_head(self, checkpoint, directory: str) -> bool:
        """Whether to load only the trunk of an HF checkpoint and keep the model's value head (no by default)."""
        return False

    def close(self) -> None:
        """Release what would outlive this process (called before the group kills it); nothing here."""

    # -- helpers ------------------------------------------------------------------------
    def forward_only(self, batch: Batch, make_micro: Callable, compute: Callable) -> list[dict]:
        """Forward ``batch`` in micro-batches of ``role.micro_batch_size`` rows (padded to full)."""
        padded, _ = batch.pad_to_multiple(self.role.micro_batch_size)
        micros = [make_micro(part) for part in padded.chunk(len(padded) // self.role.micro_batch_size)]
        self.model.eval()
        with torch.no_grad():
            return run_microbatches(self.model, micros, compute, forward_only=True, pack=self.role.pack_sequences,
                                    share_prompts=self.role.share_prompts, logits_at_responses=not self.reward_model)

    def to_device(self, batch: Batch) -> Batch:
        return Batch({k: v.to(self.device) for k, v in batch.tensors.items()}, dict(batch.meta))


def node_address() -> str:
    """The address other processes reach this one at: Ray's node address in a Ray actor, else loopback."""
    try:
        import ray  # deferred: Ray, only when a run uses it

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:  # pragma: no cover - Ray is a dependency
        return "127.0.0.1"


class Stopwatch:
    """Measures a worker call's own compute time (reported back to the driver)."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def sequence_microbatch(batch: Batch, ids: str = "sequences", attention: str = "attention_mask",
                        extras: Optional[dict[str, str]] = None):

    return Microbatch(batch[ids], batch[attention], {k: batch[v] for k, v in (extras or {}).items()})


def pair_microbatch(pairs: Batch):
    """k pairs -> one micro-batch of 2k sequences: chosen 1..k, then rejected 1..k."""
    ids = torch.cat([pairs["chosen_ids"], pairs["rejected_ids"]])
    attention = torch.cat([pairs["chosen_attention"], pairs["rejected_attention"]])
    response = torch.cat([pairs["chosen_response"], pairs["rejected_response"]])
    extras = {"response_mask": response}
    if "weight" in pairs:
        extras["weight"] = pairs["weight"]
    for key in ("ref_chosen_logps", "ref_rejected_logps", "gap_measured", "chosen_sample", "rejected_sample",
                "minibatch"):
        if key in pairs:
            extras[key] = pairs[key]
    if "chosen_rollout_logps" in pairs:  # [k, s] per position, for the rollout-vs-trainer log-prob gap
        extras["rollout_logps"] = torch.cat([pairs["chosen_rollout_logps"], pairs["rejected_rollout_logps"]])
    return Microbatch(ids, attention, extras)


def split_pair_halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pair_microbatch`'s row layout: (chosen rows, rejected rows)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
