"""Policy-model workers: sampling and log-probs (reference, rollout) and the trained actor.

* :class:`PolicyWorker` — ``generate`` (KV-cached sampling) and ``sequence_logprobs``; used for
  the reference role and for the actor's separate rollout ranks, which ``receive_weights``.
* :class:`ActorWorker` — a PolicyWorker that also trains (:class:`TrainableWorker`): ``update``
  runs the preference loss (online and offline DPO) or the SFT loss over the step's
  mini-batches; ``send_weights`` streams the trained weights to the rollout ranks
  (:mod:`dpo_rl.workers.megatron.weight_sync`).
"""

from __future__ import annotations

import itertools
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
from dpo_rl.checkpoint.training import load_model_shard, reference_file, save_model_shard
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
from dpo_rl.workers.megatron.logprobs import logprob_gap, microbatch_logprobs
from dpo_rl.workers.megatron.parallel_state import connect_store, host_store
from dpo_rl.workers.megatron.weight_sync import (
    receive_buckets,
    send_buckets,
    sync_group,
)
from dpo_rl.workers.trainable import TrainableWorker


def logprobs_compute(wpo: bool = False, ld_alpha: Optional[float] = None):
    """A forward-only compute: each sequence's summed response log-prob (``logps``; with ``ld_alpha`` LD-DPO's,
    its first ``extras["shared_response_tokens"]`` tokens in full and the rest weighted ``ld_alpha``) and, with
    ``wpo``, its WPO aligned log-prob (``wpo``)."""
    def compute(output, micro):
        lp = microbatch_logprobs(output, micro, with_sum_sq=wpo)
        summed = lp.summed if ld_alpha is None else lp.ld_summed(micro.extras["shared_response_tokens"], ld_alpha)
        return output.sum() * 0, {"logps": summed, **({"wpo": lp.wpo_logps()} if wpo else {})}

    return compute


class PolicyWorker(MegatronWorker):
    """Samples and scores log-probs with a causal LM (no optimizer).

    ``rollout_engine`` is what samples: ``megatron`` (the KV-cached decode loop on this rank's
    Megatron-core model), ``vllm`` (a :class:`~dpo_rl.workers.vllm_engine.VLLMEngine` in this process)
    or ``None`` (a role that never samples, the reference). A rank whose weights only ever arrive
    through the weight sync and that samples with vLLM (a split actor's infer rank) builds no
    Megatron-core model at all (``holds_model=False``).
    """

    def __init__(self, *, eos_token_ids: tuple[int, ...], pad_token_id: int, rollout_engine: Optional[str] = None,
                 holds_model: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eos_token_ids, self.pad_token_id = tuple(eos_token_ids), pad_token_id
        if not holds_model and rollout_engine != "vllm":
            raise ValueError("only a vLLM rollout rank can do without a Megatron-core model")
        self.rollout_engine, self.holds_model = rollout_engine, holds_model
        self.vllm = None
        #: the actor updates the sampling weights reflect (reported with every sample as ``policy_version``)
        self.policy_version = 0

    def init_distributed(self, address: str, port: int):
        ranks = super().init_distributed(address, port)
        if self.rollout_engine == "vllm":
            from dpo_rl.workers.vllm_engine import VLLMEngine  # deferred: vLLM is optional and heavy

            r = self.role
            self.vllm = VLLMEngine(self.model_config, params_dtype=self.parallel.params_dtype,
                                   device=self.parallel.device, seed=self.seed,
                                   max_model_len=r.max_prompt_length + r.max_new_tokens,
                                   kv_cache_mb=r.vllm_kv_cache_mb, enforce_eager=r.vllm_enforce_eager,
                                   host_ip=node_address(), tensor_parallel_size=self.ranks.tp_size, rank=self.rank)
            if self.model is not None:
                self.vllm.load_weights(self._own_weight_stream())
        return ranks

    def _build_model(self):
        return super()._build_model() if self.holds_model else None

    def _load(self, directory: str) -> None:
        if self.holds_model:  # otherwise the first weight sync brings the weights
            super()._load(directory)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.shutdown()
            self.vllm = None

    def _own_weight_stream(self):
        """This (TP = PP = 1) rank's Megatron-core weights as HF buckets, for its own vLLM engine (or an in-process
        reference refresh)."""
        groups = stage_hf_groups(self.model, self.model_config, tp_group=None, tp_rank=0, tp_size=1, pp_rank=0,
                                 pp_size=1, tensors=self.export_tensors())
        return buckets(groups, int(self.role.weight_sync_bucket_mb * 2**20))

    @register(Dispatch.DP)
    def generate(self, prompts: Batch, sampling: dict, seed: int) -> Batch:
        """Sample one response per row of ``prompts`` (``prompt_ids``/``prompt_mask`` [S, P]).

        Returns ``sequences``/``attention_mask``/``response_mask`` [S, P + max_new_tokens] (fixed
        width so shards concatenate), ``ended_with_eos`` [S], ``rollout_logprobs`` [S, max_new_tokens]
        (the sampled tokens' log-probs under the model's raw distribution) and ``policy_version`` [S]
        (:attr:`policy_version` of the weights that sampled), whichever engine samples.
        """
        with Stopwatch() as watch:
            params = SamplingParams(
                **sampling, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id,
                seed=seeds.data_parallel_rank(seed, self.ranks.dp_rank),
            )
            ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
            token_lists = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
            if self.vllm is not None:
                out = self.vllm.generate(token_lists, params,
                                         [seeds.request(params.seed, row) for row in range(len(token_lists))])
            else:
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
                "policy_version": torch.full((len(token_lists),), self.policy_version, dtype=torch.long),
                "prompt_index": prompts["prompt_index"],
            })
        result.meta["compute_s"] = watch.seconds
        return result

    @register(Dispatch.DP)
    def sequence_logprobs(self, samples: Batch, wpo: bool = False, ld_alpha: Optional[float] = None) -> Batch:
        """Summed response log-probs of each sequence under this worker's model: ``sequence_logps`` [S]; with
        ``wpo`` also WPO's aligned log-prob (``wpo_logps`` [S],
        :meth:`~dpo_rl.workers.megatron.logprobs.SequenceLogprobs.wpo_logps`); with ``ld_alpha`` the sums are
        LD-DPO's, each sequence's first ``samples["shared_response_tokens"]`` response tokens in full.

        Computed once per sample (pairs index into it), so with two samples per prompt the reference runs while
        the reward model scores the same samples.
        """
        extras = {"response_mask": "response_mask"}
        if ld_alpha is not None:
            if "shared_response_tokens" not in samples:
                raise ValueError("LD-DPO log-probs need each sample's shared_response_tokens (its pair's shorter "
                                 "response length)")
            extras["shared_response_tokens"] = "shared_response_tokens"

        def make_micro(part: Batch):
            return sequence_microbatch(part, extras=extras)

        def gathered(outputs, key):  # non-output ranks have none: their zeros are ignored by the dispatcher
            return torch.cat([o[key] for o in outputs])[: len(samples)].cpu() if outputs else torch.zeros(len(samples))

        with Stopwatch() as watch:
            inputs = self.to_device(samples.select(["sequences", "attention_mask", *extras.values()]))
            outputs = self.forward_only(inputs, make_micro, logprobs_compute(wpo, ld_alpha))
        result = Batch({"sequence_logps": gathered(outputs, "logps"),
                        **({"wpo_logps": gathered(outputs, "wpo")} if wpo else {})})
        result.meta["compute_s"] = watch.seconds
        return result

    # -- weight sync, receiving side (a split actor's rollout ranks; a refreshed reference's ranks) -------
    @register(Dispatch.ALL)
    def join_weight_sync_as_receiver(self, address: str, port: int, senders: int, channel: str = "rollout") -> bool:
        """Join ``channel``'s sync groups of the ``senders`` trainer pipeline stages (rank 1 + this rank in each)."""
        store = connect_store(address, port)
        self._sync_groups = [sync_group(store, stage, 1 + self.rank, 1 + self.world_size, self.parallel.device,
                                        node_address(), channel=channel) for stage in range(senders)]
        return True

    @register(Dispatch.ALL)
    def set_policy_version(self, version: int) -> bool:
        """The actor updates the current weights reflect (after a restore)."""
        self.policy_version = version
        return True

    @register(Dispatch.ALL)
    def receive_weights(self, verify: bool, version: int, mix: float = 1.0) -> str:
        """Load the weights the training ranks stream (every stage's buckets) into this rank's model
        (resharded to its TP shard on arrival) or its vLLM engine (in place, prefix cache reset); with
        ``verify``, returns the checksum of the received tensors, else ``""``. ``version``: the actor updates
        the weights reflect. ``mix`` < 1 (a soft reference refresh) keeps ``1 - mix`` of the weights held before:
        ``mix`` x received + (1 - mix) x held, per parameter."""
        digest = WeightsDigest()
        stream = itertools.chain.from_iterable(receive_buckets(group, self.device) for group in self._sync_groups)
        if verify:
            stream = _digested(stream, digest)
        if self.vllm is not None:
            if mix != 1.0:
                raise ValueError("a vLLM engine takes weights whole (mix 1)")
            self.vllm.load_weights(stream)
        else:
            self._load_weight_stream(stream, mix)
        self.policy_version = version
        return digest.hexdigest() if verify else ""

    @register(Dispatch.ALL)
    def load_weight_stream(self, stream, mix: float = 1.0) -> bool:
        """:meth:`receive_weights` from a stream in this process (an in-process run's reference refresh; a Ray
        call cannot pass a generator)."""
        self._load_weight_stream(stream, mix)
        return True

    def _load_weight_stream(self, stream, mix: float) -> None:
        r = self.ranks
        params = list(self.model.parameters())
        held = [p.detach().clone() for p in params] if mix != 1.0 else []
        loader = StreamingLoader(self.model, self.model_config, tp_rank=r.tp_rank, tp_size=r.tp_size,
                                 pp_rank=r.pp_rank, pp_size=r.pp_size)
        for bucket in stream:
            loader.add_bucket(bucket)
        loader.finish()
        with torch.no_grad():
            for param, before in zip(params, held):  # mixed in fp32, whatever the parameters' dtype
                param.copy_((mix * param.float() + (1.0 - mix) * before.float()).to(param.dtype))

    @register(Dispatch.ALL)
    def save_reference(self, directory: str) -> bool:
        """Write this rank's weights into the checkpoint ``directory`` (DP rank 0 of each model-parallel rank): a
        reference that TR-DPO refreshed is no longer its ``load``."""
        r = self.ranks
        if r.dp_rank == 0:
            save_model_shard(reference_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model)
        return True

    @register(Dispatch.ALL)
    def load_reference(self, directory: str) -> bool:
        """Load what :meth:`save_reference` wrote (same TP/PP layout)."""
        r = self.ranks
        load_model_shard(reference_file(directory, r.tp_rank, r.pp_rank, r.pp_size), self.model)
        return True

    @register(Dispatch.ALL)
    def checksum(self) -> str:
        """Checksum of this model's full weights as they are now (gathered over TP and PP); ``""`` for a rank
        that samples with vLLM only (its CPU build packs the weights; :meth:`probe_logprobs` checks them)."""
        if self.model is None:
            return ""
        state = export_from_current_rank(self.model, self.model_config)
        return weights_checksum(state) if state is not None else ""

    @register(Dispatch.ALL)
    def probe_logprobs(self) -> torch.Tensor:
        """[n, L-1] per-token log-probs of the fixed :func:`probe_sequences` under the weights that sample
        here (the vLLM engine's when there is one, else the Megatron model's): two sides holding the same
        weights agree to float rounding."""
        sequences = probe_sequences(self.model_config.vocab_size)
        if self.vllm is not None:
            return self.vllm.token_logprobs(sequences)
        return self._model_token_logprobs(sequences)

    def _model_token_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(sequences, dtype=torch.long)
        batch = Batch({"sequences": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones_like(ids)})

        def compute(output, micro):
            lp = microbatch_logprobs(output, micro)
            return output.sum() * 0, {"token_logprobs": lp.token_logprobs}

        outputs = self.forward_only(self.to_device(batch), lambda part: sequence_microbatch(
            part, extras={"response_mask": "response_mask"}), compute)
        if not outputs:
            return torch.zeros(0)  # not an output rank: dropped by the worker group
        return torch.cat([o["token_logprobs"] for o in outputs])[: len(sequences)].float().cpu()


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
        self._reference = None  # the running update's deferred reference log-probs (see update)
        self._sync_stores: dict[str, Any] = {}  # weight-sync channel -> the store this rank hosts for it
        self._sync_senders: dict[str, Any] = {}  # weight-sync channel -> this rank's sending group (or None)
        self._late_pairing = None  # the running update's pairing when it started before the scores (see update)

    @register(Dispatch.DP)
    def update(self, rows: Batch, reference=None, late_pairing=None) -> dict[str, float]:
        """One training step over this rank's share of the step's rows.

        ``rows`` carries ``minibatch`` (optimizer step index) and ``weight`` (the row's share of
        its mini-batch's mean loss, 0 on padding) so the DP-reduced gradient is the mini-batch mean's.
        The reference's log-probs are the rows' ``ref_{chosen,rejected}_logps``, or come from
        ``reference`` (a :class:`~dpo_rl.runtime.worker_group.Deferred` of the reference's
        ``sequence_logps`` [S] over the step's samples, indexed by ``{chosen,rejected}_sample``), read
        when the first loss needs them: the forward before it runs while the reference computes.
        With ``late_pairing`` (:class:`~dpo_rl.pairing.LatePairing`) the rows are each prompt's two samples and
        the reward's scores decide, when the first loss needs them, which side is chosen and which rows count:
        the forward runs while the reward model scores. A mini-batch whose pairs were all dropped applies no
        optimizer step; an update with no pair at all is not applied (``actor/applied`` 0).
        """
        self._reference, self._late_pairing = reference, late_pairing
        try:
            with Stopwatch() as watch:
                if self.objective == "sft":
                    metrics = self.train_minibatches(rows, sft_microbatch, self._sft_loss, SFT_STAT_KEYS)
                elif "chosen_rollout_logps" in rows:
                    # the first optimizer step's rows are still on the weights that sampled them
                    rows = rows.update({"gap_measured": (rows["minibatch"] == rows["minibatch"].min()).float()})
                    metrics = self.train_minibatches(rows, pair_microbatch, self._preference_loss,
                                                     STAT_KEYS + GAP_SUM_KEYS, max_keys=(GAP_MAX_KEY,))
                    metrics = gap_metrics(metrics) if metrics.get("actor/applied", 1.0) else metrics
                else:
                    metrics = self.train_minibatches(rows, pair_microbatch, self._preference_loss, STAT_KEYS)
                if metrics.get("actor/applied", 1.0):  # else nothing trained: weights, version, engine unchanged
                    self.policy_version += 1
                    if self.vllm is not None:  # colocated engine: the next sampling must see the new weights
                        self.vllm.load_weights(self._own_weight_stream())
                        if self.role.verify_weight_sync:
                            self._verify_engine_weights()
        finally:
            self._reference = self._late_pairing = None  # the next update brings its own
        metrics["compute_s"] = watch.seconds
        return metrics

    def _minibatch_has_rows(self, minibatch: int) -> bool:
        return self._late_pairing is None or self._late_pairing.pairs_in(minibatch) > 0

    @register(Dispatch.DP)
    def reference_logprobs(self, samples: Batch, **options: Any) -> Batch:
        """:meth:`sequence_logprobs` (with its ``options``) under the base model, every LoRA adapter off: the
        reference when it is the actor's initial weights (no reference model is placed; ``algorithm.reference``
        docs)."""
        if not self.uses_lora:
            raise RuntimeError("reference_logprobs needs a LoRA-trained actor (its base is the reference)")
        with self.base_model():
            return self.sequence_logprobs(samples, **options)

    def _verify_engine_weights(self) -> None:
        sequences = probe_sequences(self.model_config.vocab_size)
        problem = probe_mismatch(self._model_token_logprobs(sequences), self.vllm.token_logprobs(sequences),
                                 self.parallel.params_dtype)
        if problem:
            raise RuntimeError(f"weight sync check failed: the trained model and its vLLM engine {problem}")

    @register(Dispatch.ALL)
    def load_checkpoint(self, directory: str) -> bool:
        """Restore a training checkpoint (:meth:`TrainableWorker.load_checkpoint`), and the vLLM engine's weights."""
        loaded = super().load_checkpoint(directory)
        if self.vllm is not None:
            self.vllm.load_weights(self._own_weight_stream())
        return loaded

    # -- weight sync, sending side ------------------------------------------------------------------
    @register(Dispatch.ALL)
    def weight_sync_endpoint(self, channel: str = "rollout") -> tuple[str, int]:
        """Host ``channel``'s sync groups' store on the output rank of DP replica 0; returns its (address, port)."""
        r = self.ranks
        if r.is_output_rank and r.dp_rank == 0:
            store = self._sync_stores[channel] = host_store(node_address())
            return store.address, store.port
        return "", 0  # not the owner: dropped by the worker group

    @register(Dispatch.ALL)
    def join_weight_sync_as_sender(self, address: str, port: int, receivers: int, channel: str = "rollout") -> bool:
        """TP rank 0 of each pipeline stage of DP replica 0 joins its stage's group on ``channel`` as rank 0."""
        r = self.ranks
        self._sync_senders[channel] = None
        if r.dp_rank == 0 and r.tp_rank == 0:
            store = self._sync_stores.get(channel) or connect_store(address, port)
            self._sync_senders[channel] = sync_group(store, r.pp_rank, 0, 1 + receivers, self.parallel.device,
                                                     node_address(), channel=channel)
        return True

    @register(Dispatch.ALL)
    def local_weight_stream(self):
        """This rank's weights as HF buckets, for a reference in the same process (an in-process run, TP = PP = 1):
        the reference refresh's stream where there is no second process to broadcast to."""
        if self.ranks.tp_size * self.ranks.pp_size != 1:
            raise RuntimeError("local_weight_stream is for a one-rank actor in the driver's process")
        return self._own_weight_stream()

    @register(Dispatch.ALL)
    def send_weights(self, bucket_mb: float, verify: bool, channel: str = "rollout") -> str:
        """Stream the current weights to ``channel``'s ranks (the rollout ranks, or the reference's for a refresh),
        each stage from its TP rank 0, in buckets of about ``bucket_mb`` MB (collective over DP replica 0's TP and
        PP groups). With ``verify``, returns the checksum of everything sent (every stage's, on the output rank),
        else ``""``."""
        from megatron.core import (
            parallel_state as mpu,  # deferred: heavy (megatron-core)
        )

        r = self.ranks
        if r.dp_rank != 0:
            return ""
        digest = WeightsDigest()
        groups = stage_hf_groups(self.model, self.model_config, tp_group=mpu.get_tensor_model_parallel_group(),
                                 tp_rank=r.tp_rank, tp_size=r.tp_size, pp_rank=r.pp_rank, pp_size=r.pp_size,
                                 tensors=self.export_tensors())  # with LoRA: the adapters merged in
        if r.tp_rank == 0:
            stream = buckets(groups, int(bucket_mb * 2**20))
            send_buckets(self._sync_senders[channel], _digested(stream, digest) if verify else stream, self.device)
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

            lp = microbatch_logprobs(output, micro, with_entropy=True, with_sum_sq=spec.options.use_weighting)
            logps, weight = self._oriented_pair_logps(lp, micro)
            chosen, rejected, chosen_tokens, rejected_tokens = (logps.chosen, logps.rejected, logps.chosen_tokens,
                                                                logps.rejected_tokens)
            real = weight > 0
            out = real_rows_loss(logps, spec, real)
            gap = {}
            if "rollout_logps" in micro.extras:
                measured_rows = micro.extras["gap_measured"] * real  # pairs only (not padding, not dropped rows)
                measured = measured_rows.repeat(2)[:, None]
                g = logprob_gap(lp.token_logprobs, micro.extras["rollout_logps"][:, 1:], lp.mask * measured)
                pair_sum = lambda v: sum(split_pair_halves(v))  # noqa: E731 - chosen + rejected of each pair
                gap = {"rollout/_gap_abs_sum": pair_sum(g.abs_sum), "rollout/_gap_tokens": pair_sum(g.tokens),
                       "rollout/_gap_sequence_abs": pair_sum(g.sequence_abs),
                       "rollout/_gap_sequences": 2 * measured_rows,
                       GAP_MAX_KEY: torch.maximum(*split_pair_halves(g.max))}
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
                # length bias (SimPO, RLHFlow): the pairs' response lengths, and how often the longer one is chosen
                "pairs/chosen_length": chosen_tokens.float(),
                "pairs/rejected_length": rejected_tokens.float(),
                "pairs/length_win_rate": length_win(chosen_tokens, rejected_tokens),
                "objective/kl": kl.detach(),
                "objective/entropy": 0.5 * (entropy_c + entropy_r).detach(),
                **gap,
            }
            return loss, detached

        return compute

    def _oriented_pair_logps(self, lp, micro) -> tuple[PairLogps, torch.Tensor]:
        """The micro-batch's pairs as the loss reads them, and the rows' weights: the policy's sums (LD-DPO's with
        ``ld_alpha``: each pair's tokens beyond its shorter response weigh ``ld_alpha``), token counts, WPO
        log-probs and the reference's; with a late pairing, each row oriented (and weighed) by the scores."""
        options = self.loss_spec.options
        chosen_tokens, rejected_tokens = split_pair_halves(lp.num_tokens)
        summed = lp.summed if options.ld_alpha is None else lp.ld_summed(
            torch.minimum(chosen_tokens, rejected_tokens).repeat(2), options.ld_alpha)
        chosen, rejected = split_pair_halves(summed)
        wpo = split_pair_halves(lp.wpo_logps()) if options.use_weighting else (None, None)
        ref = self._reference_logps(micro)
        weight = micro.extras["weight"]
        if self._late_pairing is not None:  # the rows are (first, second) samples: the scores orient them
            swapped, weight = self._late_pairing.rows(micro.extras["chosen_sample"], micro.extras["minibatch"], weight)
            chosen, rejected = _swap(swapped, chosen, rejected)
            chosen_tokens, rejected_tokens = _swap(swapped, chosen_tokens, rejected_tokens)
            wpo = wpo if wpo[0] is None else _swap(swapped, *wpo)
            ref = ref if ref[0] is None else _swap(swapped, *ref)
        return PairLogps(chosen=chosen, rejected=rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                         ref_chosen=ref[0], ref_rejected=ref[1], chosen_wpo=wpo[0], rejected_wpo=wpo[1]), weight

    def _reference_logps(self, micro) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The micro-batch's reference log-probs (chosen, rejected): carried by its rows, read from the
        update's deferred reference result, or ``None`` (a reference-free loss)."""
        extras = micro.extras
        if "ref_chosen_logps" in extras:
            return extras["ref_chosen_logps"], extras["ref_rejected_logps"]
        if self._reference is None:
            return None, None
        logps = self._reference.resolve()["sequence_logps"].to(self.device)
        return logps[extras["chosen_sample"]], logps[extras["rejected_sample"]]

    def _sft_loss(self, averaged_over: int):
        def compute(output, micro):

            lp = microbatch_logprobs(output, micro)
            weight = micro.extras["weight"]
            nll = -lp.summed
            loss = (nll * weight).sum() * averaged_over
            tokens = lp.num_tokens.clamp(min=1)
            detached = {"count": (weight > 0).float(), "loss": (nll / tokens).detach(), "tokens": lp.num_tokens}
            return loss, detached

        return compute


def length_win(chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """[N] 1 where the chosen response is the longer, 0.5 on equal lengths, else 0."""
    return (chosen_tokens > rejected_tokens).float() + 0.5 * (chosen_tokens == rejected_tokens).float()


def _swap(swapped: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) from a row's (first, second) values: ``second`` is chosen where ``swapped``."""
    return torch.where(swapped, second, first), torch.where(swapped, first, second)


#: Largest per-token log-prob difference two copies of the same weights may show on the probe, by dtype.
PROBE_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.05}


def probe_sequences(vocab_size: int, count: int = 2, length: int = 24) -> list[list[int]]:
    """Fixed token sequences (seeded, ids >= 3) on which both sides of a weight sync are compared."""
    g = torch.Generator().manual_seed(20240611)
    return torch.randint(3, vocab_size, (count, length), generator=g).tolist()


def probe_mismatch(expected: torch.Tensor, actual: torch.Tensor, params_dtype: str) -> str:
    """``""`` when two probes agree within :data:`PROBE_TOLERANCE`, else what differs."""
    if expected.shape != actual.shape:
        return f"gave probe log-probs of shapes {tuple(expected.shape)} and {tuple(actual.shape)}"
    worst = float((expected - actual).abs().max())
    if worst > PROBE_TOLERANCE[params_dtype]:
        return (f"disagree on the probe sequences by up to {worst:.3g} nats per token (tolerance "
                f"{PROBE_TOLERANCE[params_dtype]:g} for {params_dtype}): they do not hold the same weights")
    return ""


STAT_KEYS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "objective/kl", "objective/entropy",
    "pairs/chosen_length", "pairs/rejected_length", "pairs/length_win_rate",
)
SFT_STAT_KEYS = ("loss", "tokens")
#: Per-pair sums behind the rollout-vs-trainer log-prob gap (turned into metrics by :func:`gap_metrics`).
GAP_SUM_KEYS = ("rollout/_gap_abs_sum", "rollout/_gap_tokens", "rollout/_gap_sequence_abs", "rollout/_gap_sequences")
GAP_MAX_KEY = "rollout/logprob_diff_max"


def gap_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Turn the gap's per-pair means into per-token and per-sequence means (the common row count cancels).

    ``rollout/logprob_diff_mean``: mean |trainer - rollout| log-prob over the measured response tokens;
    ``rollout/seq_logprob_diff_mean``: mean |difference of summed log-probs| over the measured sequences;
    ``rollout/logprob_diff_max``: the largest per-token difference; ``rollout/logprob_diff_tokens``: the
    measured tokens per pair (the first optimizer step's pairs, still on the weights that sampled them).
    """
    out = {k: v for k, v in metrics.items() if not k.startswith("rollout/_gap")}
    tokens, sequences = metrics["rollout/_gap_tokens"], metrics["rollout/_gap_sequences"]
    out["rollout/logprob_diff_mean"] = metrics["rollout/_gap_abs_sum"] / tokens if tokens else 0.0
    out["rollout/seq_logprob_diff_mean"] = metrics["rollout/_gap_sequence_abs"] / sequences if sequences else 0.0
    out["rollout/logprob_diff_tokens"] = tokens
    return out


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
