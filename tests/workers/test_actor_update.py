"""The actor's DPO update: TP=2 gives TP=1's losses and metrics for the same pair batch."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_rl.batch import Batch
from dpo_rl.config.model import ParallelConfig
from dpo_rl.config.schema import AlgorithmConfig, RoleConfig
from dpo_rl.trainer.loop import minibatch_layout
from dpo_rl.runtime.worker_group import Deferred, _Done
from dpo_rl.trainer.online_dpo import gather_pairs
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.policy import ActorWorker
from tests.tolerance import assert_close, logps_scale
from tests.workers.megatron.common import (
    random_batch,
    run_distributed,
    tiny_config,
    tiny_hf_model,
)

TP1 = ParallelConfig()
TP2 = ParallelConfig(tensor_model_parallel_size=2)
#: TP=2 splits the matmuls and the vocabulary softmax: sums in another order.
RTOL_TP = 1e-4


def fixed_pairs() -> Batch:
    ids, attention, response = random_batch(8, 24, prompt_lens=[10, 12, 8, 10, 14, 9, 11, 10])
    samples = Batch({"sequences": ids, "attention_mask": attention, "response_mask": response,
                     "rollout_logprobs": torch.zeros(ids.shape)})
    pairs = gather_pairs(samples, torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7]))
    g = torch.Generator().manual_seed(3)
    ref = {"ref_chosen_logps": -60 - torch.rand(4, generator=g), "ref_rejected_logps": -60 - torch.rand(4, generator=g)}
    index, minibatch, weight = minibatch_layout(4, mini_batch_size=2, dp_size=1, micro_batch_size=1, epochs=2,
                                                shuffle=True, seed=0)
    return pairs.update(ref).rows(index).update({"minibatch": minibatch, "weight": weight})


def update_case(parallel: ParallelConfig, deferred_reference: bool = False) -> dict:
    """Build an actor from a seeded HF model at ``parallel`` and run one update step; with
    ``deferred_reference`` the reference log-probs come as the online loop sends them: a deferred
    result over the step's samples, indexed by each pair's sample rows."""
    config = tiny_config("llama")
    role = RoleConfig(model="tiny", lr=1e-3, micro_batch_size=1, ppo_mini_batch_size=2, clip_grad=0.5)
    worker = ActorWorker(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                         model_config=config, parallel=parallel, role=role, seed=0,
                         loss_spec=AlgorithmConfig().loss_spec(), total_iters=10, eos_token_ids=(1,), pad_token_id=0)
    worker.init_distributed("127.0.0.1", 0)  # the world already exists; this builds model and optimizer
    hf_interop.load_into_current_rank(worker.model, tiny_hf_model(config, seed=11).state_dict(), config)
    rows, reference = fixed_pairs(), None
    if deferred_reference:
        sample_logps = torch.zeros(8)
        sample_logps[rows["chosen_sample"]] = rows["ref_chosen_logps"]
        sample_logps[rows["rejected_sample"]] = rows["ref_rejected_logps"]
        reference = Deferred(_Done(Batch({"sequence_logps": sample_logps})))
        rows = rows.select([k for k in rows.keys() if not k.startswith("ref_")])
    metrics = worker.update(rows, reference)
    second = worker.update(rows, reference)  # after two optimizer steps the policy has moved
    return {"ranks": worker.ranks, "first": metrics, "second": second}


def test_deferred_reference_gives_the_same_update(megatron_single_rank):
    """The online loop's reference arrives as a deferred result over samples: same metrics, bit for bit."""
    carried, deferred = update_case(TP1), update_case(TP1, deferred_reference=True)
    for phase in ("first", "second"):
        assert {k: v for k, v in deferred[phase].items() if k != "compute_s"} == {
            k: v for k, v in carried[phase].items() if k != "compute_s"}


def test_tp2_update_matches_tp1(megatron_single_rank):
    base = update_case(TP1)
    results = run_distributed(update_case, 2, TP2, TP2)
    ours = next(r for r in results if r["ranks"].is_output_rank)
    beta = AlgorithmConfig().beta
    for phase in ("first", "second"):
        # implicit rewards and KL are differences of log-probs: judged against the log-probs' size
        cancelling = {"rewards/chosen": beta, "rewards/rejected": beta, "rewards/margins": beta, "objective/kl": 1.0}
        for key, value in base[phase].items():
            if key == "compute_s":
                continue
            scale = logps_scale(base[phase], beta=cancelling[key]) if key in cancelling else 0.0
            assert_close(ours[phase][key], value, rtol=RTOL_TP, scale=scale, what=f"{phase} update {key}")
    assert base["second"]["loss"] < base["first"]["loss"]  # training lowered the DPO loss


def test_batch_coupled_losses_ignore_padding_rows():
    """aot sorts over the batch: a padding row (weight 0) must not move the real pairs' losses."""
    from dpo_rl.losses import LossSpec, PairLogps, compute_preference_loss
    from dpo_rl.workers.policy import real_rows_loss

    def t(v):
        return torch.tensor(v, dtype=torch.float64)

    real = PairLogps(chosen=t([-1.0, -3.0]), rejected=t([-4.0, -2.0]), chosen_tokens=t([2.0, 3.0]),
                     rejected_tokens=t([2.0, 2.0]), ref_chosen=t([-2.0, -1.0]), ref_rejected=t([-2.0, -3.0]))
    padded = real.select(torch.tensor([0, 1, 0]))  # the layout repeats a real row as padding
    padded.chosen = padded.chosen.clone()
    padded.chosen[2] = 50.0  # whatever the padding holds
    for name in ("aot", "kto_pair", "sft", "sigmoid"):
        spec = LossSpec.create(name)
        expected = compute_preference_loss(real, spec).losses
        got = real_rows_loss(padded, spec, torch.tensor([True, True, False])).losses
        assert torch.allclose(got[:2], expected), name  # the padding row's value is weighted by 0


def test_lr_schedule_reaches_min_lr_however_many_pairs_survive(megatron_single_rank):
    """An online iteration takes one optimizer step per mini-batch of the pairs that survived pairing
    (ties and margins drop some); the schedule counts iterations, so cosine ends at min_lr."""
    config = tiny_config("llama")
    role = RoleConfig(model="tiny", lr=1e-3, min_lr=1e-4, lr_decay_style="cosine", micro_batch_size=1,
                      ppo_mini_batch_size=1)
    worker = ActorWorker(rank=0, world_size=1, model_config=config, parallel=TP1, role=role, seed=0,
                         loss_spec=AlgorithmConfig().loss_spec(), total_iters=3, eos_token_ids=(1,), pad_token_id=0)
    worker.init_distributed("127.0.0.1", 0)
    lrs = []
    for kept in (4, 1, 2):  # pairs left after pairing in each iteration: 4, 1 and 2 optimizer steps
        ids, attention, response = random_batch(2 * kept, 24, prompt_lens=[10] * (2 * kept))
        samples = Batch({"sequences": ids, "attention_mask": attention, "response_mask": response,
                     "rollout_logprobs": torch.zeros(ids.shape)})
        pairs = gather_pairs(samples, torch.arange(0, 2 * kept, 2), torch.arange(1, 2 * kept, 2))
        pairs = pairs.update({"ref_chosen_logps": torch.full((kept,), -60.0), "ref_rejected_logps": torch.full((kept,), -61.0)})
        index, minibatch, weight = minibatch_layout(kept, mini_batch_size=1, dp_size=1, micro_batch_size=1, epochs=1,
                                                    shuffle=False, seed=0)
        lrs.append(worker.update(pairs.rows(index).update({"minibatch": minibatch, "weight": weight}))["actor/lr"])
    # the LR reported after iteration i is the one iteration i + 1 trains with
    cosine = [1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in (1, 2, 3)]
    assert lrs == pytest.approx(cosine, rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-9)


def late_pairing_case(late: bool, scores: list[float]) -> dict:
    """Two updates on 4 prompts x 2 samples paired by ``scores``: rows paired by the driver (``late`` false) or
    each prompt's two samples oriented by the scores inside the update (``LatePairing``), one mini-batch."""
    from dpo_rl.pairing import LatePairing, PairingRule, prompt_pairs

    config = tiny_config("llama")
    role = RoleConfig(model="tiny", lr=1e-3, micro_batch_size=1, ppo_mini_batch_size=4, clip_grad=0.5)
    worker = ActorWorker(rank=0, world_size=1, model_config=config, parallel=TP1, role=role, seed=0,
                         loss_spec=AlgorithmConfig().loss_spec(), total_iters=10, eos_token_ids=(1,), pad_token_id=0)
    worker.init_distributed("127.0.0.1", 0)
    hf_interop.load_into_current_rank(worker.model, tiny_hf_model(config, seed=11).state_dict(), config)
    initial = [p.detach().clone() for p in worker.model.parameters()]
    ids, attention, response = random_batch(8, 24, prompt_lens=[10, 12, 8, 10, 14, 9, 11, 10])
    samples = Batch({"sequences": ids, "attention_mask": attention, "response_mask": response,
                     "rollout_logprobs": torch.zeros(ids.shape), "prompt_index": torch.arange(8) // 2,
                     "ended_with_eos": torch.ones(8, dtype=torch.bool)})
    rule = PairingRule(strategy="best_vs_worst", min_score_margin=0.0, tie_policy="skip", missing_eos_penalty=1.0,
                       seed=0)
    reward = Deferred(_Done(Batch({"scores": torch.tensor(scores)})))
    reference = Deferred(_Done(Batch({"sequence_logps": -60 - torch.rand(8, generator=torch.Generator().manual_seed(3))})))
    if late:
        first, second = prompt_pairs(samples["prompt_index"])
    else:
        pairs = rule.pairs(torch.tensor(scores), samples["ended_with_eos"], samples["prompt_index"])
        first, second = pairs.chosen, pairs.rejected
    index, minibatch, weight = minibatch_layout(len(first), mini_batch_size=len(first), dp_size=1, micro_batch_size=1,
                                                epochs=1, shuffle=False, seed=0)
    rows = gather_pairs(samples, first, second).rows(index).update({"minibatch": minibatch, "weight": weight})
    pairing = LatePairing(reward, rule, samples["prompt_index"], samples["ended_with_eos"], first=rows["chosen_sample"],
                          second=rows["rejected_sample"], minibatch=rows["minibatch"],
                          laid_out=rows["weight"] > 0) if late else None
    out = {"first": worker.update(rows, reference, pairing)}
    out["second"] = worker.update(rows, reference, pairing)
    out["version"] = worker.policy_version
    out["initial"], out["weights"] = initial, [p.detach().clone() for p in worker.model.parameters()]
    return out


#: prompt 0: its second sample wins (swapped), 1: the first wins, 2: a tie (dropped), 3: the second wins
LATE_SCORES = [0.1, 0.9, 0.8, -0.2, 0.5, 0.5, -1.0, 2.0]


def test_late_pairing_gives_the_driver_paired_update(megatron_single_rank):
    """The update that started before the scores (rows = each prompt's two samples, oriented and the tie dropped
    inside the loss) trains as the rows the driver pairs after the scores: the same metrics and weights."""
    paired, late = late_pairing_case(False, LATE_SCORES), late_pairing_case(True, LATE_SCORES)
    for phase in ("first", "second"):
        assert paired[phase].keys() == late[phase].keys()
        for key, value in paired[phase].items():
            if key != "compute_s":
                assert_close(late[phase][key], value, rtol=1e-6, what=f"{phase} update {key}")
    assert paired["version"] == late["version"] == 2
    for p, q in zip(paired["weights"], late["weights"]):  # Adam's normalisation magnifies rounding: a side
        assert_close(q, p, rtol=1e-5, what="trained weights")  # swapped in the micro-batch packs differently
    # control: without the orientation the loss would train the rejected side of prompts 0 and 3
    unoriented = late_pairing_case(False, [0.9, 0.1, 0.8, -0.2, 0.5, 0.5, 2.0, -1.0])
    assert abs(unoriented["first"]["loss"] - paired["first"]["loss"]) > 1e-6


def test_late_pairing_with_every_pair_dropped_applies_nothing(megatron_single_rank):
    late = late_pairing_case(True, [0.5] * 8)  # every prompt a tie: no pair
    assert late["first"] == {"actor/applied": 0.0, "compute_s": late["first"]["compute_s"]}
    assert late["version"] == 0
    assert all(torch.equal(p, q) for p, q in zip(late["initial"], late["weights"]))  # no optimizer step
    trained = late_pairing_case(True, LATE_SCORES)  # control: with pairs the same update moves the weights
    assert not all(torch.equal(p, q) for p, q in zip(trained["initial"], trained["weights"]))
