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

import contextlib
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from dpo_rl.batch import Batch
from dpo_rl.checkpoint.hf_files import save_hf_checkpoint
from dpo_rl.checkpoint.hf_weights import local_mcore_state
from dpo_rl.checkpoint.peft_adapters import save_peft_adapter
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

    # -- LoRA (role.lora) ------------------------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        return self.role.lora.enabled

    def _build_model(self):
        model = super()._build_model()
        if model is not None and self.uses_lora:
            from dpo_rl.workers.megatron.lora import (
                add_lora,  # deferred: imports megatron-core
            )

            # before the base weights load (they keep their names; the adapters are initialised from the seed)
            add_lora(model, self.role.lora, seed=self.seed, tp_rank=self.ranks.tp_rank, tp_size=self.ranks.tp_size,
                     trainable=("output_layer.weight",) if self.reward_model else ())
        return model

    def use_transformer_engine(self):
        # TE fuses the norms into linear_qkv / linear_fc1, whose input an adapter must see normalised
        return False if self.uses_lora else super().use_transformer_engine()

    def export_tensors(self):
        if not self.uses_lora:
            return super().export_tensors()
        from dpo_rl.workers.megatron.lora import (
            merged_weights,  # deferred: imports megatron-core
        )

        return merged_weights(self.model, local_mcore_state(self.model))

    def base_model(self):
        """A context in which the model computes as its base (adapters off); the model itself without LoRA."""
        if not self.uses_lora:
            return contextlib.nullcontext()
        from dpo_rl.workers.megatron.lora import (
            adapters_disabled,  # deferred: imports megatron-core
        )

        return adapters_disabled(self.model)

    @register(Dispatch.ALL)
    def trainable_parameters(self) -> dict[str, int]:
        """``trainable`` and ``total`` parameters of this rank's model shard, and the optimizer's ``optimized``
        (the parameters its groups hold: with LoRA the adapters alone)."""
        from dpo_rl.workers.megatron.lora import (
            trainable_count,  # deferred: imports megatron-core
        )

        trainable, total = trainable_count(self.model)
        optimized = sum(p.numel() for group in self.engine.optimizer.param_groups for p in group["params"])
        return {"trainable": trainable, "total": total, "optimized": optimized}

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
        grad_norms, skipped, nonfinite, applied_minibatches = [], 0, 0, 0
        for minibatch in torch.unique(rows["minibatch"], sorted=True).tolist():
            part = rows.rows(torch.nonzero(rows["minibatch"] == minibatch).flatten())
            micros = [make_micro(p) for p in part.chunk(len(part) // self.role.micro_batch_size)]
            engine.zero_grad()
            for out in run_microbatches(engine.ddp, micros, loss_fn(len(micros) * self.ranks.dp_size),
                                        forward_only=False, pack=self.role.pack_sequences,
                                        share_prompts=self.role.share_prompts,
                                        logits_at_responses=not self.reward_model):
                stats.add(out)
            if not self._minibatch_has_rows(minibatch):
                continue  # its rows were all dropped after the forward (late pairing): nothing to apply
            applied_minibatches += 1
            if self.parallel.params_dtype != "fp16" and not engine.grads_finite():
                nonfinite += 1  # never applied; the driver stops the run or skips the step (training.on_nonfinite)
                grad_norms.append(float("nan"))
                continue
            applied, norm = engine.step()
            if applied:
                grad_norms.append(norm)
            else:
                skipped += 1  # fp16 loss scaling found inf/NaN gradients: megatron skipped the update
        prefix = "actor" if not self.reward_model else "reward"
        if not applied_minibatches:
            return {f"{prefix}/applied": 0.0}
        engine.scheduler.step()
        metrics = stats.reduce()
        if grad_norms:  # none when fp16 loss scaling skipped every step (normal while the scale settles)
            metrics[f"{prefix}/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
        metrics[f"{prefix}/lr"] = float(engine.scheduler.get_last_lr()[0])
        metrics[f"{prefix}/nonfinite_steps"] = float(nonfinite)
        if self.parallel.params_dtype == "fp16":
            metrics[f"{prefix}/loss_scale"] = engine.loss_scale()
            metrics[f"{prefix}/skipped_steps"] = float(skipped)
        return metrics

    def _minibatch_has_rows(self, minibatch: int) -> bool:
        """Whether mini-batch ``minibatch`` kept a row to train on (a subclass whose rows can be dropped after
        the forward says otherwise); every rank of the role answers alike."""
        return True

    @register(Dispatch.ALL)
    def save_checkpoint(self, directory: str) -> bool:
        """Write this rank's model shard, optimizer, schedule and RNG states under ``directory``
        (DP rank 0 of each model-parallel rank), and with the distributed optimizer every DP rank's
        shard of the main parameters and Adam moments."""
        r = self.ranks
        state = optimizer_state(self.engine.optimizer)
        if r.dp_rank == 0:  # DP replicas hold the same model and DP-independent optimizer state
            save_training_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model,
                                state["state_dict"], self.engine.scheduler.state_dict(), **self._lora_checkpoint())
        if state["param_shards"]:
            save_optimizer_shard(optimizer_shard_file(directory, r.tp_rank, r.pp_rank, r.pp_size, r.dp_rank),
                                 state["param_shards"])
        return True

    @register(Dispatch.ALL)
    def load_checkpoint(self, directory: str) -> bool:
        """Restore what :meth:`save_checkpoint` wrote (same TP/PP/DP layout and optimizer kind)."""
        r = self.ranks
        state = load_training_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model,
                                    **self._lora_checkpoint(loading=directory))
        shards = (load_optimizer_shard(optimizer_shard_file(directory, r.tp_rank, r.pp_rank, r.pp_size, r.dp_rank))
                  if self.role.use_distributed_optimizer else [])
        load_optimizer_state(self.engine.optimizer, {"state_dict": state["optimizer"], "param_shards": shards})
        self.engine.scheduler.load_state_dict(state["scheduler"])
        return True

    def _lora_checkpoint(self, loading: Optional[str] = None) -> dict[str, Any]:
        """The LoRA arguments of :func:`save_training_state` / :func:`load_training_state` (none without LoRA)."""
        if not self.uses_lora:
            return {}
        from dpo_rl.workers.megatron.lora import (  # deferred: imports megatron-core
            load_trainable_state,
            trainable_state,
        )

        adapters = asdict(self.role.lora)
        if loading is None:
            return {"adapters": adapters, "trainable": trainable_state(self.model)}
        return {"adapters": adapters,
                "load_trainable": lambda state: load_trainable_state(self.model, state, source=loading)}

    @register(Dispatch.ALL)
    def save_hf(self, directory: str, token_ids: dict[str, Any], adapter_directory: Optional[str] = None,
                base_model: Optional[str] = None) -> str:
        """Write the full model as an HF checkpoint (safetensors + config.json) from the output rank of DP
        replica 0, gathered over TP and PP there: the driver never holds the weights (with LoRA, the adapters
        merged in). With LoRA and ``adapter_directory``, also the adapters alone in PEFT's format there
        (``base_model``: the HF base they apply to). Returns the directory."""
        if self.ranks.dp_rank != 0:
            return directory
        state = export_from_current_rank(self.model, self.model_config, reward=self.reward_model,
                                         tensors=self.export_tensors())
        if state is not None:
            save_hf_checkpoint(directory, state, self.model_config, reward=self.reward_model, **token_ids)
        if self.uses_lora and adapter_directory is not None:
            self._save_peft_adapter(adapter_directory, base_model)
        return directory

    def _save_peft_adapter(self, directory: str, base_model: Optional[str]) -> None:
        from dpo_rl.workers.megatron.lora import (
            peft_adapter_tensors,  # deferred: imports megatron-core
        )

        adapters = peft_adapter_tensors(self.model, self.model_config, self.ranks, reward=self.reward_model)
        if adapters is not None:
            save_peft_adapter(directory, adapters, self.role.lora, reward=self.reward_model, base_model=base_model)


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
