"""What every trained role shares: optimizer, the mini-batch loop, gradient sync, checkpoints, export.

:class:`TrainableWorker` is mixed into the actor (DPO and SFT objectives) and the reward
model (Bradley-Terry). A trained role's ``update``-style RPC hands :meth:`train_minibatches`
its rows (``minibatch`` = optimizer step, ``weight`` = the row's share of that step's mean
loss, 0 on padding), a function building micro-batches from rows and a loss function; the
loop, the DP all-reduce, clipping, the optimizer and the schedule live here once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dpo_rl.batch import Batch
from dpo_rl.checkpoint.training import (
    load_training_state,
    rank_file,
    save_training_state,
)
from dpo_rl.dispatch import Dispatch, register
from dpo_rl.optim import build_optimizer
from dpo_rl.workers.base import MegatronWorker
from dpo_rl.workers.megatron.forward import run_microbatches
from dpo_rl.workers.megatron.hf_interop import export_from_current_rank


class TrainableWorker(MegatronWorker):
    """A role that owns an optimizer over its model shard."""

    def __init__(self, *, total_iters: int, **kwargs: Any) -> None:
        """``total_iters``: the run's training iterations, the length of the LR schedule."""
        super().__init__(**kwargs)
        self.total_iters = total_iters

    def init_distributed(self, address: str, port: int):

        ranks = super().init_distributed(address, port)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.role, self.total_iters)
        return ranks

    def train_minibatches(self, rows: Batch, make_micro: Callable[[Batch], Any], loss_fn: Callable,
                          stat_keys: Sequence[str]) -> dict[str, float]:
        """One training iteration: an optimizer step per distinct ``minibatch`` id in ``rows``, all at
        this iteration's learning rate, then one step of the LR schedule; returns averaged statistics.

        ``loss_fn(num_micro)`` returns megatron's per-micro-batch loss function, whose second
        output holds ``count`` (1 on real rows) and one per-row tensor per ``stat_keys`` entry.
        """
        self.model.train()
        rows = self.to_device(rows)
        stats = StatSums(stat_keys, self.device)
        grad_norms = []
        for minibatch in torch.unique(rows["minibatch"], sorted=True).tolist():
            part = rows.rows(torch.nonzero(rows["minibatch"] == minibatch).flatten())
            micros = [make_micro(p) for p in part.chunk(len(part) // self.role.micro_batch_size)]
            for out in run_microbatches(self.model, micros, loss_fn(len(micros)), forward_only=False):
                stats.add(out)
            grad_norms.append(self._step())
        self.scheduler.step()
        metrics = stats.reduce()
        prefix = "actor" if not self.reward_model else "reward"
        metrics[f"{prefix}/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
        metrics[f"{prefix}/lr"] = float(self.scheduler.get_last_lr()[0])
        return metrics

    def _step(self) -> float:
        """All-reduce gradients over DP, clip by the global norm, step the optimizer."""
        from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.ranks.dp_size > 1:
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=mpu.get_data_parallel_group())
            for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(synced)
        norm = global_grad_norm(params)
        if self.role.clip_grad > 0 and norm > self.role.clip_grad:
            for p in params:
                p.grad.mul_(self.role.clip_grad / (norm + 1e-6))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @register(Dispatch.ALL)
    def save_checkpoint(self, directory: str) -> bool:
        """Write this rank's model shard, optimizer, scheduler and RNG states under ``directory``."""
        r = self.ranks
        if r.dp_rank == 0:  # DP replicas hold the same state
            save_training_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model, self.optimizer,
                            self.scheduler)
        return True

    @register(Dispatch.ALL)
    def load_checkpoint(self, directory: str) -> bool:
        """Restore what :meth:`save_checkpoint` wrote (same TP/PP layout)."""
        r = self.ranks
        load_training_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model, self.optimizer,
                        self.scheduler)
        return True

    @register(Dispatch.ALL)
    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on the output rank (collective over TP and PP)."""
        return export_from_current_rank(self.model, self.model_config, reward=self.reward_model)


def global_grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the full model's gradient: TP-sharded grads once per shard, replicated once."""
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate  # deferred: heavy (megatron-core)

    device = params[0].grad.device if params else torch.device("cpu")
    square = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            square += p.grad.detach().double().pow(2).sum()
    if mpu.get_model_parallel_group() is not None and dist.get_world_size(mpu.get_model_parallel_group()) > 1:
        dist.all_reduce(square, group=mpu.get_model_parallel_group())
    return float(square.sqrt())


class StatSums:
    """Sums of per-row statistics over real rows, reduced over DP ranks.

    Every rank holds the same keys (ranks without outputs, e.g. early pipeline stages, hold
    zeros) so the all-reduce lines up.
    """

    def __init__(self, keys: Sequence[str], device) -> None:
        self.keys = ("count", *keys)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        real = out["count"]
        self.sums += torch.stack([
            real.sum().double() if key == "count" else (out[key] * real).sum().double() for key in self.keys
        ])

    def reduce(self) -> dict[str, float]:
        from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

        if mpu.get_data_parallel_world_size() > 1:
            dist.all_reduce(self.sums, group=mpu.get_data_parallel_group())
        values = dict(zip(self.keys, self.sums.tolist()))
        count = values.pop("count")
        return {k: v / count if count else 0.0 for k, v in values.items()}
