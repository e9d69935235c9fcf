"""What every trained role shares: megatron's DDP and optimizer, the mini-batch loop, checkpoints, export.

:class:`TrainableWorker` is mixed into the actor (DPO and SFT objectives) and the reward
model (Bradley-Terry). A trained role's ``update``-style RPC hands :meth:`train_minibatches`
its rows (``minibatch`` = optimizer step, ``weight`` = the row's share of that step's mean
loss, 0 on padding), a function building micro-batches from rows and a loss function; the
loop lives here once and steps megatron-core's training path
(:mod:`dpo_rl.workers.megatron.optimizer`: DDP gradient buckets, fp32 main parameters for
16-bit models, the distributed optimizer, clipping over every shard).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from dpo_rl.batch import Batch
from dpo_rl.checkpoint.hf_files import save_hf_checkpoint
from dpo_rl.checkpoint.training import (
    load_optimizer_shard,
    load_training_state,
    optimizer_shard_file,
    rank_file,
    save_optimizer_shard,
    save_training_state,
)
from dpo_rl.dispatch import Dispatch, register
from dpo_rl.workers.base import MegatronWorker
from dpo_rl.workers.megatron.forward import run_microbatches
from dpo_rl.workers.megatron.hf_interop import export_from_current_rank
from dpo_rl.workers.megatron.optimizer import (
    build_training_engine,
    load_optimizer_state,
    optimizer_state,
)


class TrainableWorker(MegatronWorker):
    """A role that trains its model shard with megatron-core's DDP and optimizer."""

    def __init__(self, *, total_iters: int, **kwargs: Any) -> None:
        """``total_iters``: the run's training iterations, the length of the LR schedule."""
        super().__init__(**kwargs)
        self.total_iters = total_iters
        self.engine = None

    def init_distributed(self, address: str, port: int):
        ranks = super().init_distributed(address, port)
        # after the weights are loaded: the optimizer's fp32 main parameters copy them
        self.engine = build_training_engine(self.model, self.role, self.parallel, self.total_iters)
        return ranks

    def transformer_overrides(self) -> dict[str, Any]:
        """Activation recomputation (``recompute_*``) for the trained model."""
        r = self.role
        if r.recompute_granularity is None:
            return {}
        if r.recompute_granularity == "selective":
            return {"recompute_granularity": "selective"}
        return {"recompute_granularity": "full", "recompute_method": r.recompute_method,
                "recompute_num_layers": r.recompute_num_layers}

    def train_minibatches(self, rows: Batch, make_micro: Callable[[Batch], Any], loss_fn: Callable,
                          stat_keys: Sequence[str], max_keys: Sequence[str] = ()) -> dict[str, float]:
        """One training iteration: an optimizer step per distinct ``minibatch`` id in ``rows``, all at
        this iteration's learning rate, then one step of the LR schedule; returns averaged statistics.

        ``loss_fn(averaged_over)`` returns megatron's per-micro-batch loss function, whose second
        output holds ``count`` (1 on real rows) and one per-row tensor per ``stat_keys`` entry;
        ``averaged_over`` (micro-batches x DP ranks) is what megatron divides the loss by (the schedule
        by micro-batches, DDP by DP ranks), which the row weights already account for. ``max_keys`` are
        further per-row statistics reported as their maximum over real rows.
        """
        self.model.train()
        rows = self.to_device(rows)
        stats = StatSums(stat_keys, self.device, max_keys)
        engine = self.engine
        grad_norms, skipped, nonfinite = [], 0, 0
        for minibatch in torch.unique(rows["minibatch"], sorted=True).tolist():
            part = rows.rows(torch.nonzero(rows["minibatch"] == minibatch).flatten())
            micros = [make_micro(p) for p in part.chunk(len(part) // self.role.micro_batch_size)]
            engine.zero_grad()
            for out in run_microbatches(engine.ddp, micros, loss_fn(len(micros) * self.ranks.dp_size),
                                        forward_only=False):
                stats.add(out)
            if self.parallel.params_dtype != "fp16" and not engine.grads_finite():
                nonfinite += 1  # never applied; the driver stops the run or skips the step (training.on_nonfinite)
                grad_norms.append(float("nan"))
                continue
            applied, norm = engine.step()
            if applied:
                grad_norms.append(norm)
            else:
                skipped += 1  # fp16 loss scaling found inf/NaN gradients: megatron skipped the update
        engine.scheduler.step()
        metrics = stats.reduce()
        prefix = "actor" if not self.reward_model else "reward"
        if grad_norms:  # none when fp16 loss scaling skipped every step (normal while the scale settles)
            metrics[f"{prefix}/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
        metrics[f"{prefix}/lr"] = float(engine.scheduler.get_last_lr()[0])
        metrics[f"{prefix}/nonfinite_steps"] = float(nonfinite)
        if self.parallel.params_dtype == "fp16":
            metrics[f"{prefix}/loss_scale"] = engine.loss_scale()
            metrics[f"{prefix}/skipped_steps"] = float(skipped)
        return metrics

    @register(Dispatch.ALL)
    def save_checkpoint(self, directory: str) -> bool:
        """Write this rank's model shard, optimizer, schedule and RNG states under ``directory``
        (DP rank 0 of each model-parallel rank), and with the distributed optimizer every DP rank's
        shard of the main parameters and Adam moments."""
        r = self.ranks
        state = optimizer_state(self.engine.optimizer)
        if r.dp_rank == 0:  # DP replicas hold the same model and DP-independent optimizer state
            save_training_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model,
                                state["state_dict"], self.engine.scheduler.state_dict())
        if state["param_shards"]:
            save_optimizer_shard(optimizer_shard_file(directory, r.tp_rank, r.pp_rank, r.pp_size, r.dp_rank),
                                 state["param_shards"])
        return True

    @register(Dispatch.ALL)
    def load_checkpoint(self, directory: str) -> bool:
        """Restore what :meth:`save_checkpoint` wrote (same TP/PP/DP layout and optimizer kind)."""
        r = self.ranks
        state = load_training_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model)
        shards = (load_optimizer_shard(optimizer_shard_file(directory, r.tp_rank, r.pp_rank, r.pp_size, r.dp_rank))
                  if self.role.use_distributed_optimizer else [])
        load_optimizer_state(self.engine.optimizer, {"state_dict": state["optimizer"], "param_shards": shards})
        self.engine.scheduler.load_state_dict(state["scheduler"])
        return True

    @register(Dispatch.ALL)
    def save_hf(self, directory: str, token_ids: dict[str, Any]) -> str:
        """Write the full model as an HF checkpoint (safetensors + config.json) from the output rank of DP
        replica 0, gathered over TP and PP there: the driver never holds the weights. Returns the directory."""
        if self.ranks.dp_rank != 0:
            return directory
        state = export_from_current_rank(self.model, self.model_config, reward=self.reward_model)
        if state is not None:
            save_hf_checkpoint(directory, state, self.model_config, reward=self.reward_model, **token_ids)
        return directory


class StatSums:
    """Sums of per-row statistics over real rows, reduced over DP ranks.

    Every rank holds the same keys (ranks without outputs, e.g. early pipeline stages, hold
    zeros) so the all-reduce lines up.
    """

    def __init__(self, keys: Sequence[str], device, max_keys: Sequence[str] = ()) -> None:
        """``keys`` are averaged over real rows; ``max_keys`` (non-negative statistics) report their maximum."""
        self.keys, self.max_keys = ("count", *keys), tuple(max_keys)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self.maxima = torch.zeros(len(self.max_keys), dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        real = out["count"]
        self.sums += torch.stack([
            real.sum().double() if key == "count" else (out[key] * real).sum().double() for key in self.keys
        ])
        if self.max_keys:
            self.maxima = torch.maximum(self.maxima, torch.stack([(out[k] * real).max().double() for k in self.max_keys]))

    def reduce(self) -> dict[str, float]:
        from megatron.core import (
            parallel_state as mpu,  # deferred: heavy (megatron-core)
        )

        if mpu.get_data_parallel_world_size() > 1:
            dist.all_reduce(self.sums, group=mpu.get_data_parallel_group())
            if self.max_keys:
                dist.all_reduce(self.maxima, op=dist.ReduceOp.MAX, group=mpu.get_data_parallel_group())
        values = dict(zip(self.keys, self.sums.tolist()))
        count = values.pop("count")
        out = {k: v / count if count else 0.0 for k, v in values.items()}
        out.update(zip(self.max_keys, self.maxima.tolist()))
        return out
