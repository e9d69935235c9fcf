"""Policy-model workers: sampling and log-probs (reference, rollout) and the trained actor.

* :class:`PolicyWorker` — ``generate`` (KV-cached sampling) and ``sequence_logprobs``; used for
  the reference role and for the actor's separate rollout ranks, which ``receive_weights``.
* :class:`ActorWorker` — a PolicyWorker that also trains (:class:`TrainableWorker`): ``update``
  runs the preference loss (online and offline DPO) or the SFT loss over the step's
  mini-batches; ``send_weights`` streams the trained weights to the rollout ranks
  (:mod:`dpo_rl.workers.megatron.weight_sync`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dpo_rl import seeds
from dpo_rl.batch import Batch
from dpo_rl.checkpoint.hf_stream import (
    StreamingLoader,
    WeightsDigest,
    buckets,
    stage_hf_groups,
    weights_checksum,
)
from dpo_rl.dispatch import Dispatch, register
from dpo_rl.losses import (
    LossSpec,
    PairLogps,
    PreferenceLossOutput,
    compute_preference_loss,
)
from dpo_rl.workers.base import (
    MegatronWorker,
    Stopwatch,
    node_address,
    pair_microbatch,
    sequence_microbatch,
    split_pair_halves,
)
from dpo_rl.workers.megatron.forward import Microbatch
from dpo_rl.workers.megatron.generation import SamplingParams, generate
from dpo_rl.workers.megatron.hf_interop import export_from_current_rank
from dpo_rl.workers.megatron.logprobs import sequence_logprobs
from dpo_rl.workers.megatron.parallel_state import connect_store, host_store
from dpo_rl.workers.megatron.weight_sync import (
    receive_buckets,
    send_buckets,
    sync_group,
)
from dpo_rl.workers.trainable import TrainableWorker


def _logprobs_compute(output, micro):

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
        width so shards concatenate), ``ended_with_eos`` [S] and ``rollout_logprobs``.
        """
        with Stopwatch() as watch:
            params = SamplingParams(
                **sampling, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                seed=seeds.data_parallel_rank(seed, self.ranks.dp_rank),
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
                "rollout_logprobs": torch.nn.functional.pad(out.rollout_logprobs.cpu(), (0, right)),
                "prompt_index": prompts["prompt_index"],
            })
        result.meta["compute_s"] = watch.seconds
        return result

    @register(Dispatch.DP)
    def sequence_logprobs(self, samples: Batch) -> Batch:
        """Summed response log-probs of each sequence under this worker's model: ``sequence_logps`` [S].

        Computed once per sample (pairs index into it), so the reference can run while the
        reward model scores the same samples.
        """
        def make_micro(part: Batch):
            return sequence_microbatch(part, extras={"response_mask": "response_mask"})

        with Stopwatch() as watch:
            inputs = self.to_device(samples.select(["sequences", "attention_mask", "response_mask"]))
            outputs = self.forward_only(inputs, make_micro, _logprobs_compute)
            logps = (torch.cat([o["logps"] for o in outputs])[: len(samples)].cpu()
                     if outputs else torch.zeros(len(samples)))  # non-output ranks: ignored by the dispatcher
        result = Batch({"sequence_logps": logps})
        result.meta["compute_s"] = watch.seconds
        return result

    # -- weight sync, receiving side (a split actor's rollout ranks) ------------------------------
    @register(Dispatch.ALL)
    def join_weight_sync_as_receiver(self, address: str, port: int, senders: int) -> bool:
        """Join the sync groups of the ``senders`` trainer pipeline stages (rank 1 + this rank in each)."""
        store = connect_store(address, port)
        self._sync_groups = [sync_group(store, stage, 1 + self.rank, 1 + self.world_size, self.parallel.device,
                                        node_address()) for stage in range(senders)]
        return True

    @register(Dispatch.ALL)
    def receive_weights(self, verify: bool) -> str:
        """Load the weights the training ranks stream (every stage's buckets, resharded to this rank's TP
        shard on arrival); with ``verify``, returns the checksum of the received tensors, else ``""``."""
        r = self.ranks
        loader = StreamingLoader(self.model, self.model_config, tp_rank=r.tp_rank, tp_size=r.tp_size,
                                 pp_rank=r.pp_rank, pp_size=r.pp_size)
        digest = WeightsDigest()
        for group in self._sync_groups:
            for bucket in receive_buckets(group, self.device):
                loader.add_bucket(bucket)
                if verify:
                    digest.add_bucket(bucket)
        loader.finish()
        return digest.hexdigest() if verify else ""

    @register(Dispatch.ALL)
    def checksum(self) -> str:
        """Checksum of this model's full weights as they are now (gathered over TP and PP)."""
        state = export_from_current_rank(self.model, self.model_config)
        return weights_checksum(state) if state is not None else ""


class ActorWorker(PolicyWorker, TrainableWorker):
    """The trained policy: preference (DPO-family) or SFT updates; streams its weights to rollout ranks.

    ``objective`` is ``preference`` (rows are pairs, see :func:`pair_microbatch`) or ``sft``
    (rows are sequences with a ``response_mask``; ``weight`` is 1 / response tokens of the
    mini-batch, so the loss is the token mean).
    """

    def __init__(self, *, loss_spec: Optional[LossSpec] = None, objective: str = "preference", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if objective not in ("preference", "sft"):
            raise ValueError(f"unknown objective {objective!r}")
        self.loss_spec, self.objective = loss_spec or LossSpec(), objective

    @register(Dispatch.DP)
    def update(self, rows: Batch) -> dict[str, float]:
        """One training step over this rank's share of the step's rows.

        ``rows`` carries ``minibatch`` (optimizer step index) and ``weight`` (the row's share of
        its mini-batch's mean loss, 0 on padding) so the DP-reduced gradient is the mini-batch mean's.
        """
        with Stopwatch() as watch:
            if self.objective == "sft":
                metrics = self.train_minibatches(rows, sft_microbatch, self._sft_loss, SFT_STAT_KEYS)
            else:
                metrics = self.train_minibatches(rows, pair_microbatch, self._preference_loss, STAT_KEYS)
        metrics["compute_s"] = watch.seconds
        return metrics

    # -- weight sync, sending side ------------------------------------------------------------------
    @register(Dispatch.ALL)
    def weight_sync_endpoint(self) -> tuple[str, int]:
        """Host the sync groups' store on the output rank of DP replica 0; returns its (address, port)."""
        r = self.ranks
        if r.is_output_rank and r.dp_rank == 0:
            self._sync_store = host_store(node_address())
            return self._sync_store.address, self._sync_store.port
        return "", 0  # not the owner: dropped by the worker group

    @register(Dispatch.ALL)
    def join_weight_sync_as_sender(self, address: str, port: int, receivers: int) -> bool:
        """TP rank 0 of each pipeline stage of DP replica 0 joins its stage's group as rank 0."""
        r = self.ranks
        self._sync_group = None
        if r.dp_rank == 0 and r.tp_rank == 0:
            store = getattr(self, "_sync_store", None) or connect_store(address, port)
            self._sync_group = sync_group(store, r.pp_rank, 0, 1 + receivers, self.parallel.device, node_address())
        return True

    @register(Dispatch.ALL)
    def send_weights(self, bucket_mb: float, verify: bool) -> str:
        """Stream the current weights to the rollout ranks, each stage from its TP rank 0, in buckets of
        about ``bucket_mb`` MB (collective over DP replica 0's TP and PP groups). With ``verify``, returns
        the checksum of everything sent (every stage's, on the output rank), else ``""``."""
        from megatron.core import (
            parallel_state as mpu,  # deferred: heavy (megatron-core)
        )

        r = self.ranks
        if r.dp_rank != 0:
            return ""
        digest = WeightsDigest()
        groups = stage_hf_groups(self.model, self.model_config, tp_group=mpu.get_tensor_model_parallel_group(),
                                 tp_rank=r.tp_rank, tp_size=r.tp_size, pp_rank=r.pp_rank, pp_size=r.pp_size)
        if r.tp_rank == 0:
            stream = buckets(groups, int(bucket_mb * 2**20))
            send_buckets(self._sync_group, _digested(stream, digest) if verify else stream, self.device)
        else:
            for _ in groups:  # take part in the stage's TP gathers
                pass
        if verify and r.pp_size > 1:
            parts: list[Optional[dict]] = [None] * r.pp_size
            torch.distributed.all_gather_object(parts, digest.tensors, group=mpu.get_pipeline_model_parallel_group())
            for part in parts:
                digest.update(part or {})
        return digest.hexdigest() if verify else ""

    def _preference_loss(self, averaged_over: int):
        spec = self.loss_spec

        def compute(output, micro):

            lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"], with_entropy=True)
            chosen, rejected = split_pair_halves(lp.summed)
            chosen_tokens, rejected_tokens = split_pair_halves(lp.num_tokens)
            weight = micro.extras["weight"]
            real = weight > 0
            logps = PairLogps(chosen=chosen, rejected=rejected, chosen_tokens=chosen_tokens,
                              rejected_tokens=rejected_tokens, ref_chosen=micro.extras.get("ref_chosen_logps"),
                              ref_rejected=micro.extras.get("ref_rejected_logps"))
            out = real_rows_loss(logps, spec, real)
            # megatron divides by micro-batches x DP ranks (`averaged_over`); the weights already average.
            loss = (out.losses * weight).sum() * averaged_over
            entropy_c, entropy_r = split_pair_halves(lp.mean_entropy())
            kl = (0.5 * ((chosen - logps.ref_chosen) + (rejected - logps.ref_rejected)) if logps.has_reference
                  else torch.zeros_like(chosen))
            detached = {
                "count": real.float(),
                "loss": out.losses.detach(),
                "rewards/chosen": out.chosen_rewards,
                "rewards/rejected": out.rejected_rewards,
                "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
                "logps/chosen": chosen.detach(),
                "logps/rejected": rejected.detach(),
                "objective/kl": kl.detach(),
                "objective/entropy": 0.5 * (entropy_c + entropy_r).detach(),
            }
            return loss, detached

        return compute

    def _sft_loss(self, averaged_over: int):
        def compute(output, micro):

            lp = sequence_logprobs(output, micro.input_ids, micro.extras["response_mask"])
            weight = micro.extras["weight"]
            nll = -lp.summed
            loss = (nll * weight).sum() * averaged_over
            tokens = lp.num_tokens.clamp(min=1)
            detached = {"count": (weight > 0).float(), "loss": (nll / tokens).detach(), "tokens": lp.num_tokens}
            return loss, detached

        return compute


STAT_KEYS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "objective/kl", "objective/entropy",
)
SFT_STAT_KEYS = ("loss", "tokens")


def real_rows_loss(logps: PairLogps, spec: LossSpec, real: torch.Tensor) -> PreferenceLossOutput:
    """Per-pair losses in which the padding rows (``real`` False, weight 0) cannot change the real ones.

    Batch-coupled losses (aot, kto_pair, sft) read the whole batch, so they run on the real
    rows only and are scattered back (padding rows get 0); other losses run on every row.
    """
    if not spec.batch_coupled or bool(real.all()):
        return compute_preference_loss(logps, spec)
    index = torch.nonzero(real).flatten()
    out = compute_preference_loss(logps.select(index), spec)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(real.shape[0], dtype=values.dtype, device=values.device)
        return full.index_put((index,), values)

    return PreferenceLossOutput(scatter(out.losses), scatter(out.chosen_rewards), scatter(out.rejected_rewards))


def sft_microbatch(rows: Batch):

    return Microbatch(rows["sequences"], rows["attention_mask"],
                      {"response_mask": rows["response_mask"], "weight": rows["weight"]})


def _digested(stream, digest: WeightsDigest):
    """``stream``'s buckets, each added to ``digest`` as it passes."""
    for bucket in stream:
        digest.add_bucket(bucket)
        yield bucket
