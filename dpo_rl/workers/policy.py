"""Policy-model workers: sampling and log-probs (reference, rollout) and the trained actor.

* :class:`PolicyWorker` — ``generate`` (KV-cached sampling) and ``sample_logprobs``; used for
  the reference role and for the actor's separate rollout ranks.
* :class:`ActorWorker` — a PolicyWorker that also trains: ``update`` runs the DPO loss over
  the step's mini-batches; weights can be exported to rollout ranks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from dpo_rl.batch import Batch
from dpo_rl.losses import PairLogps, compute_dpo_loss
from dpo_rl.workers.base import MegatronWorker, Stopwatch
from dpo_rl.workers.worker_group import Dispatch, register

def pair_microbatch(pairs: Batch):
    """k pairs -> one micro-batch of 2k sequences: chosen 1..k, then rejected 1..k."""
    from dpo_rl.workers.megatron.forward import Microbatch

    ids = torch.cat([pairs["chosen_ids"], pairs["rejected_ids"]])
    attention = torch.cat([pairs["chosen_attention"], pairs["rejected_attention"]])
    response = torch.cat([pairs["chosen_response"], pairs["rejected_response"]])
    extras = {"response_mask": response}
    if "weight" in pairs:
        extras["weight"] = pairs["weight"]
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in pairs:
            extras[key] = pairs[key]
    return Microbatch(ids, attention, extras)


def split_pair_halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pair_microbatch`'s row layout: (chosen rows, rejected rows)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def _logprobs_compute(output, micro):
    from dpo_rl.workers.megatron.logprobs import sequence_logprobs

    lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"])
    return output.sum() * 0, {"logps": lp.summed}


class PolicyWorker(MegatronWorker):
    """Samples and scores log-probs with a causal LM (no optimizer)."""

    def __init__(self, *, eos_token_ids: tuple[int, ...], pad_token_id: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eos_token_ids, self.pad_token_id = tuple(eos_token_ids), pad_token_id

    @register(Dispatch.DP)
    def generate(self, prompts: Batch, sampling: dict, seed: int) -> Batch:
        """Sample one response per row of ``prompts`` (``prompt_ids``/``prompt_mask`` [S, P]).

        Returns ``sequences``/``attention_mask``/``response_mask`` [S, P + max_new_tokens] (fixed
        width so shards concatenate), ``ended_with_eos`` [S] and ``sample_logprobs``.
        """
        from dpo_rl.workers.megatron.generation import SamplingParams, generate

        with Stopwatch() as watch:
            params = SamplingParams(
                **sampling, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                seed=seed + 1_000_003 * self.ranks.dp_rank,
            )
            ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
            token_lists = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
            out = generate(self.model, token_lists, params, device=self.device)
            width_p, width_r = ids.shape[1], params.max_new_tokens
            left = width_p - out.prompt_length
            right = width_r - out.responses.shape[1]

            def fit(t: torch.Tensor, fill: int) -> torch.Tensor:
                return torch.nn.functional.pad(t.cpu(), (left, right), value=fill)

            result = Batch({
                "sequences": fit(out.sequences, self.pad_token_id),
                "attention_mask": fit(out.attention_mask, 0),
                "response_mask": fit(out.response_mask, 0),
                "ended_with_eos": out.ended_with_eos.cpu(),
                "sample_logprobs": torch.nn.functional.pad(out.sample_logprobs.cpu(), (0, right)),
                "prompt_index": prompts["prompt_index"],
            })
        result.meta["compute_s"] = watch.seconds
        return result

    @register(Dispatch.DP)
    def sample_logprobs(self, samples: Batch) -> Batch:
        """Summed response log-probs of each sample: ``ref_logps`` [S].

        Computed once per sample (pairs index into it), so the reference can run while the
        reward model scores the same samples.
        """
        from dpo_rl.workers.base import sequence_microbatch

        def make_micro(part: Batch):
            return sequence_microbatch(part, extras={"response_mask": "response_mask"})

        with Stopwatch() as watch:
            inputs = self.to_device(samples.select(["sequences", "attention_mask", "response_mask"]))
            outputs = self.forward_only(inputs, make_micro, _logprobs_compute)
            logps = (torch.cat([o["logps"] for o in outputs])[: len(samples)].cpu()
                     if outputs else torch.zeros(len(samples)))  # non-output ranks: ignored by the dispatcher
        result = Batch({"ref_logps": logps})
        result.meta["compute_s"] = watch.seconds
        return result

    @register(Dispatch.ALL)
    def load_weights(self, state: dict[str, torch.Tensor]) -> str:
        """Load full HF-named weights (pushed from the training ranks); returns their checksum."""
        from dpo_rl.workers.megatron.hf_interop import load_into_current_rank

        load_into_current_rank(self.model, state, self.model_config)
        return weights_checksum(state)

    @register(Dispatch.ALL)
    def checksum(self) -> str:
        """Checksum of this model's full weights (gathered over TP)."""
        from dpo_rl.workers.megatron.hf_interop import export_from_current_rank

        state = export_from_current_rank(self.model, self.model_config)
        return weights_checksum(state) if state is not None else ""


def weights_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ActorWorker(PolicyWorker):
    """The trained policy: DPO updates, and weight export for separate rollout ranks."""

    def __init__(self, *, algorithm: dict, total_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.algorithm, self.total_steps = algorithm, total_steps

    def init_distributed(self, address: str, port: int):
        from dpo_rl.optim import build_optimizer

        ranks = super().init_distributed(address, port)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.role, self.total_steps)
        return ranks

    @register(Dispatch.DP)
    def update(self, pairs: Batch) -> dict[str, float]:
        """One step of DPO training over this rank's share of the step's pairs.

        ``pairs`` carries ``minibatch`` (optimizer step index) and ``weight`` (1 / real pairs in
        that mini-batch, 0 on padding) so gradients summed over DP ranks equal the mean loss.
        """
        from dpo_rl.workers.megatron.forward import run_microbatches

        with Stopwatch() as watch:
            self.model.train()
            pairs = self.to_device(pairs)
            stats = _StatSums(self.device)
            grad_norms = []
            for minibatch in torch.unique(pairs["minibatch"], sorted=True).tolist():
                rows = pairs.rows(torch.nonzero(pairs["minibatch"] == minibatch).flatten())
                micros = [pair_microbatch(p) for p in rows.chunk(len(rows) // self.role.micro_batch_size)]
                outputs = run_microbatches(self.model, micros, self._loss(len(micros)), forward_only=False)
                for out in outputs:
                    stats.add(out)
                grad_norms.append(self._step())
            metrics = stats.reduce()
        metrics["actor/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
        metrics["actor/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["compute_s"] = watch.seconds
        return metrics

    def _loss(self, num_micro: int):
        algorithm = self.algorithm

        def compute(output, micro):
            from dpo_rl.workers.megatron.logprobs import sequence_logprobs

            lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"], with_entropy=True)
            chosen, rejected = split_pair_halves(lp.summed)
            chosen_tokens, rejected_tokens = split_pair_halves(lp.num_tokens)
            weight = micro.extras["weight"]
            logps = PairLogps(chosen, rejected, micro.extras["ref_chosen_logps"], micro.extras["ref_rejected_logps"],
                              chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1))
            out = compute_dpo_loss(logps, algorithm["loss_type"], algorithm["beta"], algorithm["label_smoothing"])
            # megatron's schedule divides each micro-batch loss by their number; weights already average.
            loss = (out.losses * weight).sum() * num_micro
            entropy_c, entropy_r = split_pair_halves(lp.mean_entropy())
            real = (weight > 0).float()
            detached = {
                "count": real,
                "loss": out.losses.detach(),
                "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.rejected_rewards,
                "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
                "logps/chosen": chosen.detach(),
                "logps/rejected": rejected.detach(),
                "objective/kl": 0.5 * ((chosen - logps.ref_chosen) + (rejected - logps.ref_rejected)).detach(),
                "objective/entropy": 0.5 * (entropy_c + entropy_r).detach(),
            }
            return loss, detached

        return compute

    def _step(self) -> float:
        """All-reduce gradients over DP, clip by the global norm, step optimizer and schedule."""
        from megatron.core import parallel_state as mpu

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
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @register(Dispatch.ALL)
    def save_checkpoint(self, directory: str) -> bool:
        """Write this rank's model shard, optimizer, scheduler and RNG states under ``directory``."""
        from dpo_rl.checkpoint.training import rank_file, save_rank_state

        r = self.ranks
        if r.dp_rank == 0:  # DP replicas hold the same state
            save_rank_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model, self.optimizer,
                            self.scheduler)
        return True

    @register(Dispatch.ALL)
    def load_checkpoint(self, directory: str) -> bool:
        """Restore what :meth:`save_checkpoint` wrote (same TP/PP layout)."""
        from dpo_rl.checkpoint.training import load_rank_state, rank_file

        r = self.ranks
        load_rank_state(rank_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model, self.optimizer,
                        self.scheduler)
        return True

    @register(Dispatch.ALL)
    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on the output rank (collective over TP and PP)."""
        from dpo_rl.workers.megatron.hf_interop import export_from_current_rank

        return export_from_current_rank(self.model, self.model_config)


def global_grad_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of the full model's gradient: TP-sharded grads once per shard, replicated once."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    device = params[0].grad.device if params else torch.device("cpu")
    square = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            square += p.grad.detach().double().pow(2).sum()
    if mpu.get_model_parallel_group() is not None and dist.get_world_size(mpu.get_model_parallel_group()) > 1:
        dist.all_reduce(square, group=mpu.get_model_parallel_group())
    return float(square.sqrt())


STAT_KEYS = (
    "count", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "objective/kl", "objective/entropy",
)


class _StatSums:
    """Sums of per-pair statistics over real pairs, reduced over DP ranks.

    Every rank holds the same keys (ranks without outputs, e.g. early pipeline stages, hold
    zeros) so the all-reduce lines up.
    """

    def __init__(self, device) -> None:
        self.sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        real = out["count"]
        self.sums += torch.stack([
            real.sum().double() if key == "count" else (out[key] * real).sum().double() for key in STAT_KEYS
        ])

    def reduce(self) -> dict[str, float]:
        from megatron.core import parallel_state as mpu

        if mpu.get_data_parallel_world_size() > 1:
            dist.all_reduce(self.sums, group=mpu.get_data_parallel_group())
        values = dict(zip(STAT_KEYS, self.sums.tolist()))
        count = values.pop("count")
        return {k: v / count if count else 0.0 for k, v in values.items()}
