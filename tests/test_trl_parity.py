"""Parity with TRL's DPOTrainer (TRL is a test dependency; it runs on CPU with ``use_cpu=True``).

A tiny Llama is built locally (seeded) as the policy and another as the reference. TRL tokenizes
a handful of preference examples; our Megatron-core model path scores the same token ids, and
every loss both projects define is computed both ways on the same batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from dpo_rl.config.model import ParallelConfig
from dpo_rl.data.indexed import collate_pairs
from dpo_rl.losses import LossSpec, PairLogps, compute_preference_loss
from tests.tolerance import assert_close, assert_differs, first_order_bound
from tests.workers.megatron.common import tiny_config, tiny_hf_model

#: Losses TRL's DPOTrainer implements (all of ours but LLaMA-Factory's kto_pair, orpo, simpo), with options.
SHARED = {
    "sigmoid": {}, "hinge": {}, "ipo": {}, "exo_pair": {"label_smoothing": 1e-3}, "nca_pair": {},
    "robust": {"label_smoothing": 0.1}, "bco_pair": {}, "sppo_hard": {}, "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1}, "apo_zero": {}, "apo_down": {}, "discopop": {}, "sft": {},
    "sigmoid_norm": {},
}
BETA = 0.5
#: Summed log-probs (about -100 here) agree to this fraction of their size: ~13 float32 spacings, for
#: two implementations that fuse the LM head, the softmax and the sums differently.
RTOL_LOGPS = 1e-6
#: What the loss arithmetic itself may add, relative to the loss, once its inputs agree.
RTOL_LOSS = 1e-6


@pytest.fixture(scope="module")
def parity(megatron_single_rank, tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from examples.tiny_world import build, world

    tmp = tmp_path_factory.mktemp("trl")
    tokenizer = build.build_tokenizer(tmp / "tokenizer")
    rng = random.Random(0)
    prompts = world.split_prompts(build.SEED)[0][:6]
    rows = []
    for p in prompts:
        chosen, rejected = world.preference_pair(p, rng)
        rows.append({"prompt": p + "\n", "chosen": chosen, "rejected": rejected})
    config = tiny_config("llama")

    def trainer_for(**options):
        """A DPOTrainer over fresh copies of the policy (seed 11) and the reference (seed 12): TRL patches the
        models' forward for the outputs its options need."""
        args = DPOConfig(output_dir=str(tmp / "out"), use_cpu=True, per_device_train_batch_size=len(rows),
                         max_length=None, report_to=[], beta=BETA, bf16=False, fp16=False, dataset_num_proc=None,
                         logging_steps=1, disable_tqdm=True, **options)
        return DPOTrainer(model=tiny_hf_model(config, seed=11), ref_model=tiny_hf_model(config, seed=12), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

    trainer = trainer_for()
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(examples)
    return {"trainer": trainer, "batch": batch, "examples": examples, "config": config,
            "policy": tiny_hf_model(config, seed=11), "reference": tiny_hf_model(config, seed=12),
            "trainer_for": trainer_for}


def trl_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed completion log-probs through TRL's fused-LM-head forward (as its _compute_loss)."""
    mask = batch["completion_mask"]
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    logps = out.log_probs[:, -(mask.shape[1] - 1):].sum(dim=1)
    return logps.chunk(2)


def our_logps(hf_model, config, examples, wpo: bool = False, ld_alpha=None) -> PairLogps:
    """The same token ids through our Megatron-core model path (as the workers' sequence_logprobs); with ``wpo``
    also WPO's aligned log-probs; with ``ld_alpha`` LD-DPO's sums."""
    import numpy as np

    from dpo_rl.workers.megatron.forward import run_microbatches
    from dpo_rl.workers.megatron.hf_interop import load_into_current_rank
    from dpo_rl.workers.megatron.model_factory import build_gpt_model
    from dpo_rl.trainer.offline import pairs_as_samples
    from dpo_rl.workers.base import sequence_microbatch
    from dpo_rl.workers.policy import logprobs_compute

    model = build_gpt_model(config, ParallelConfig())
    load_into_current_rank(model, hf_model.state_dict(), config)
    model.eval()
    items = [{k: np.asarray(e[f"{k}_ids"], dtype=np.int32) for k in ("prompt", "chosen", "rejected")}
             for e in examples]
    pairs = collate_pairs(items, pad_id=0)
    from dpo_rl.batch import Batch

    with torch.no_grad():
        samples = pairs_as_samples(Batch(pairs))  # as the workers' sequence_logprobs sees a pair batch
        micro = sequence_microbatch(samples, extras={"response_mask": "response_mask",
                                                     "shared_response_tokens": "shared_response_tokens"})
        out = run_microbatches(model, [micro], logprobs_compute(wpo, ld_alpha), forward_only=True)
    logps = out[0]["logps"]
    n = len(items)
    tokens = torch.cat([pairs["chosen_response"], pairs["rejected_response"]])[:, 1:].sum(-1).float()
    lp = PairLogps(chosen=logps[:n], rejected=logps[n:], chosen_tokens=tokens[:n], rejected_tokens=tokens[n:])
    if wpo:
        lp.chosen_wpo, lp.rejected_wpo = out[0]["wpo"][:n], out[0]["wpo"][n:]
    return lp


def test_per_example_logps_equal_trl(parity):
    batch, examples, config = parity["batch"], parity["examples"], parity["config"]
    trainer = parity["trainer"]
    for model, hf in ((trainer.model, parity["policy"]), (trainer.ref_model, parity["reference"])):
        trl_chosen, trl_rejected = trl_logps(model, batch)
        ours = our_logps(hf, config, examples)
        # each example against its own size (scale=0): the sums vary from example to example
        assert_close(ours.chosen, trl_chosen, rtol=RTOL_LOGPS, scale=0.0, what="chosen log-probs")
        assert_close(ours.rejected, trl_rejected, rtol=RTOL_LOGPS, scale=0.0, what="rejected log-probs")
    # a negative control: shifting the completion boundary by one token changes the log-probs
    shifted = [dict(e, prompt_ids=e["prompt_ids"][:-1], chosen_ids=e["prompt_ids"][-1:] + e["chosen_ids"])
               for e in examples]
    moved = our_logps(parity["policy"], config, shifted)
    assert_differs(moved.chosen, trl_logps(trainer.model, batch)[0], rtol=RTOL_LOGPS, scale=0.0,
                   what="completion boundary shifted by one token")


def loss_tolerance(logps: PairLogps, spec: LossSpec) -> float:
    """How far the batch loss may move when every log-prob moves by ``RTOL_LOGPS`` of itself.

    Losses amplify log-prob noise differently (sppo_hard squares the log-ratios, sigmoid damps them
    by beta), so the bound comes from each loss's own derivative rather than one number for all.
    """
    names = ("chosen", "rejected", "ref_chosen", "ref_rejected")
    inputs = [getattr(logps, n) for n in names]

    def batch_loss(*values):
        wpo = {k: getattr(logps, k).double() for k in ("chosen_wpo", "rejected_wpo") if getattr(logps, k) is not None}
        moved = PairLogps(**dict(zip(names, values)), chosen_tokens=logps.chosen_tokens.double(),
                          rejected_tokens=logps.rejected_tokens.double(), **wpo)
        return compute_preference_loss(moved, spec).losses.mean()

    return first_order_bound(batch_loss, inputs, [RTOL_LOGPS * x.abs() for x in inputs])


@pytest.mark.parametrize("name", sorted(SHARED))
def test_every_shared_loss_equals_trl(parity, name):
    trainer, batch = parity["trainer"], parity["batch"]
    options = SHARED[name]
    trainer.loss_types, trainer.loss_weights = [name], [1.0]
    trainer.label_smoothing = options.get("label_smoothing", 0.0)
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    policy = our_logps(parity["policy"], parity["config"], parity["examples"])
    reference = our_logps(parity["reference"], parity["config"], parity["examples"])
    policy.ref_chosen, policy.ref_rejected = reference.chosen, reference.rejected
    spec = LossSpec.create(name, beta=BETA, discopop_tau=trainer.args.discopop_tau, **options)
    ours = compute_preference_loss(policy, spec).losses.mean()
    derived = loss_tolerance(policy, spec)
    assert_close(float(ours), float(trl_loss), rtol=RTOL_LOSS, derived=derived, what=f"{name} loss")
    # a negative control: the same loss with chosen and rejected swapped is far outside that tolerance
    swapped = PairLogps(chosen=policy.rejected, rejected=policy.chosen, chosen_tokens=policy.rejected_tokens,
                        rejected_tokens=policy.chosen_tokens, ref_chosen=policy.ref_rejected,
                        ref_rejected=policy.ref_chosen)
    assert_differs(float(compute_preference_loss(swapped, spec).losses.mean()), float(trl_loss), rtol=RTOL_LOSS,
                   derived=derived, factor=10.0, what=f"{name} with chosen and rejected swapped")


#: The DPO-style losses TRL 1.16 lets an f-divergence replace the log-ratios in (sft reads none), with options.
F_DIVERGENCE_LOSSES = {"sigmoid": {}, "hinge": {}, "ipo": {}, "exo_pair": {"label_smoothing": 1e-3},
                       "robust": {"label_smoothing": 0.1}, "discopop": {}, "sigmoid_norm": {}}


def trl_per_example_losses(trainer, examples) -> torch.Tensor:
    """TRL's loss of each example on its own (a batch of one), with the trainer's current options."""
    trainer.model.eval()
    with torch.no_grad():
        return torch.stack([trainer.compute_loss(trainer.model, dict(trainer.data_collator([e]))).detach()
                            for e in examples])


@pytest.mark.parametrize("name", sorted(F_DIVERGENCE_LOSSES))
@pytest.mark.parametrize("divergence, coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                              ("alpha_divergence", 0.5), ("alpha_divergence", 2.0)])
def test_f_divergence_losses_equal_trl_per_example(parity, name, divergence, coef):
    """f-DPO (arXiv:2309.16240): TRL's ``f_divergence_type`` / ``f_alpha_divergence_coef``, example by example."""
    trainer, options = parity["trainer"], F_DIVERGENCE_LOSSES[name]
    trainer.loss_types, trainer.loss_weights = [name], [1.0]
    trainer.label_smoothing = options.get("label_smoothing", 0.0)
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = divergence, coef
    try:
        trl = trl_per_example_losses(trainer, parity["examples"])
    finally:
        trainer.f_divergence_type, trainer.f_alpha_divergence_coef = "reverse_kl", 0.5
    policy = our_logps(parity["policy"], parity["config"], parity["examples"])
    reference = our_logps(parity["reference"], parity["config"], parity["examples"])
    policy.ref_chosen, policy.ref_rejected = reference.chosen, reference.rejected
    spec = LossSpec.create(name, beta=BETA, discopop_tau=trainer.args.discopop_tau, f_divergence_type=divergence,
                           f_alpha_divergence_coef=coef, **options)
    ours = compute_preference_loss(policy, spec).losses
    dpo = compute_preference_loss(policy, LossSpec.create(name, beta=BETA, discopop_tau=trainer.args.discopop_tau,
                                                          **options)).losses
    for i in range(len(ours)):
        derived = loss_tolerance(policy.select(torch.tensor([i])), spec)
        assert_close(float(ours[i]), float(trl[i]), rtol=RTOL_LOSS, derived=derived,
                     what=f"{name} under {divergence} (coef {coef}), example {i}")
    # a negative control: the divergence changes the loss (else the option would be ignored on both sides)
    assert float((ours - dpo).abs().max()) > 100 * RTOL_LOSS * float(ours.abs().max())


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sft"])
def test_wpo_weighted_losses_equal_trl_per_example(parity, name):
    """WPO (arXiv:2406.11827): TRL's ``use_weighting``, example by example."""
    trainer = parity["trainer_for"](use_weighting=True, loss_type=[name])
    trl = trl_per_example_losses(trainer, parity["examples"])
    policy = our_logps(parity["policy"], parity["config"], parity["examples"], wpo=True)
    reference = our_logps(parity["reference"], parity["config"], parity["examples"])
    policy.ref_chosen, policy.ref_rejected = reference.chosen, reference.rejected
    spec = LossSpec.create(name, beta=BETA, use_weighting=True)
    # each example as TRL sees it, a batch of one (sft's token mean is over the batch)
    ours = torch.cat([compute_preference_loss(policy.select(torch.tensor([i])), spec).losses
                      for i in range(len(trl))])
    unweighted = torch.cat([compute_preference_loss(policy.select(torch.tensor([i])),
                                                    LossSpec.create(name, beta=BETA)).losses for i in range(len(trl))])
    weights = torch.exp(policy.chosen_wpo + policy.rejected_wpo)
    for i in range(len(ours)):
        # the weight's exponent sums two length-averaged log-probs: its error is their rounding, not the sums'
        derived = loss_tolerance(policy.select(torch.tensor([i])), spec) + float(ours[i].abs()) * 1e-5
        assert_close(float(ours[i]), float(trl[i]), rtol=RTOL_LOSS, derived=derived, what=f"WPO {name}, example {i}")
    assert bool(((weights < 0.99) & (weights > 0)).all())  # a real down-weighting (tiny random models: p << 1)
    assert_close(ours, unweighted * weights, rtol=1e-6, scale=0.0, what="the weighted loss")


@pytest.mark.parametrize("name", ["sigmoid", "ipo"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
def test_ld_dpo_losses_equal_trl_per_example(parity, name, ld_alpha):
    """LD-DPO (arXiv:2409.06411): TRL's ``ld_alpha``, example by example: policy and reference sums both count
    the tokens beyond the pair's shorter response at ``ld_alpha``."""
    trainer = parity["trainer_for"](ld_alpha=ld_alpha, loss_type=[name])
    trl = trl_per_example_losses(trainer, parity["examples"])
    policy = our_logps(parity["policy"], parity["config"], parity["examples"], ld_alpha=ld_alpha)
    reference = our_logps(parity["reference"], parity["config"], parity["examples"], ld_alpha=ld_alpha)
    policy.ref_chosen, policy.ref_rejected = reference.chosen, reference.rejected
    spec = LossSpec.create(name, beta=BETA, ld_alpha=ld_alpha)
    ours = compute_preference_loss(policy, spec).losses
    for i in range(len(ours)):
        derived = loss_tolerance(policy.select(torch.tensor([i])), spec)
        assert_close(float(ours[i]), float(trl[i]), rtol=RTOL_LOSS, derived=derived,
                     what=f"LD-DPO {name} (ld_alpha {ld_alpha}), example {i}")
    plain = our_logps(parity["policy"], parity["config"], parity["examples"])
    unequal = policy.chosen_tokens != policy.rejected_tokens
    assert bool(unequal.any())  # the examples have pairs of different lengths: LD-DPO changes their sums
    longer = torch.where(policy.chosen_tokens > policy.rejected_tokens, policy.chosen - plain.chosen,
                         policy.rejected - plain.rejected)
    assert bool((longer[unequal] > 0).all())  # the longer side's tail (negative log-probs) is down-weighted
