"""megatron-core's DDP and optimizer as the trained roles use them (:mod:`dpo_rl.workers.megatron.optimizer`).

* parameter groups: matrices decay, norms/biases do not, frozen parameters are in no group;
* bf16 parameters train through fp32 main parameters: at the shipped real-model LR (5e-7) the
  updates land as they do in fp32, where AdamW on the bf16 parameters themselves (the old path,
  kept here as the negative control) rounds almost all of them away; the bf16 loss curve tracks fp32's;
* the distributed optimizer (and overlapped gradient reduction) with DP=2 gives DP=1's weights;
* activation recomputation gives the same update as none.
"""

from __future__ import annotations

import pytest
import torch

from dpo_rl.batch import Batch
from dpo_rl.config.model import ParallelConfig
from dpo_rl.config.schema import RoleConfig
from dpo_rl.trainer.loop import minibatch_layout
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.policy import ActorWorker
from tests.tolerance import assert_close
from tests.workers.megatron.common import (
    random_batch,
    run_distributed,
    tiny_config,
    tiny_hf_model,
)

#: The LR of every shipped real-model config (llama32-1b, llama3-8b, qwen25-7b).
SHIPPED_LR = 5e-7


def sft_rows(rows: int = 8, mini_batch: int = 4, dp_size: int = 1, seed: int = 1) -> Batch:
    """SFT rows in two optimizer steps (mini-batches of ``mini_batch``), weights = 1 / response tokens."""
    ids, attention, response = random_batch(rows, 24, seed=seed, prompt_lens=[8 + r % 5 for r in range(rows)])
    batch = Batch({"sequences": ids, "attention_mask": attention, "response_mask": response})
    index, minibatch, _ = minibatch_layout(rows, mini_batch_size=mini_batch, dp_size=dp_size, micro_batch_size=1,
                                           epochs=1, shuffle=False, seed=0)
    batch = batch.rows(index)
    tokens = batch["response_mask"].sum(-1).double()
    per_step = torch.zeros(int(minibatch.max()) + 1, dtype=torch.float64).index_add_(0, minibatch, tokens)
    return batch.update({"minibatch": minibatch, "weight": (1.0 / per_step[minibatch]).float()})


def sft_actor(parallel: ParallelConfig, **role_settings) -> ActorWorker:
    config = tiny_config("llama")
    role = RoleConfig(model="tiny", micro_batch_size=1, clip_grad=1.0, **role_settings)
    worker = ActorWorker(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                         model_config=config, parallel=parallel, role=role, seed=0, objective="sft",
                         total_iters=10, eos_token_ids=(1,), pad_token_id=0)
    worker.init_distributed("127.0.0.1", 0)  # the world exists; this builds model and engine
    hf_interop.load_into_current_rank(worker.model, tiny_hf_model(config, seed=11).state_dict(), config)
    worker.engine.optimizer.reload_model_params()  # the fp32 main parameters copy the loaded weights
    return worker


def main_weights(worker: ActorWorker) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer updates: main parameters of 16-bit models, else the parameters."""
    out = {}
    for name, p in worker.model.named_parameters():
        main = getattr(p, "main_param", None)
        out[name] = (main.detach().view(p.shape) if main is not None else p.detach()).float().clone()
    return out


def changed_fraction(before: dict, after: dict) -> float:
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def delta_cosine(a0: dict, a1: dict, b0: dict, b1: dict) -> float:
    da = torch.cat([(a1[n] - a0[n]).flatten().double() for n in a0])
    db = torch.cat([(b1[n] - b0[n]).flatten().double() for n in b0])
    return float(torch.nn.functional.cosine_similarity(da, db, dim=0))


# --------------------------------------------------------------------------- parameter groups
def test_norms_do_not_decay_and_frozen_parameters_are_in_no_group(megatron_single_rank):
    from dpo_rl.workers.megatron.model_factory import build_gpt_model
    from dpo_rl.workers.megatron.optimizer import build_training_engine

    model = build_gpt_model(tiny_config("llama"), ParallelConfig())
    frozen = model.embedding.word_embeddings.weight
    frozen.requires_grad_(False)
    engine = build_training_engine(model, RoleConfig(model="tiny", lr=0.5, weight_decay=0.1), ParallelConfig(),
                                   total_iters=1)
    groups = engine.optimizer.param_groups
    in_groups = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the distributed optimizer holds (shards of) main parameters: count elements, one group each
    assert sum(p.numel() for p in in_groups) == sum(p.numel() for p in trainable)
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.zero_grad()  # zero gradients: only AdamW's decoupled decay moves weights
    for p in trainable:
        p.main_grad.zero_()
    engine.step()
    after = dict(model.named_parameters())
    for name, value in before.items():
        if after[name] is frozen or value.ndim < 2:  # frozen, norms
            assert torch.equal(after[name].detach(), value), name
        else:
            assert_close(after[name].detach(), value * (1 - 0.5 * 0.1), rtol=1e-6, what=name)


# --------------------------------------------------------------------------- bf16 with fp32 main params
def train_steps(worker: ActorWorker, steps: int, same_batch: bool = False) -> list[float]:
    return [worker.update(sft_rows(seed=1 if same_batch else 1 + step))["loss"] for step in range(steps)]


def test_bf16_trains_through_fp32_main_params_at_the_shipped_lr(megatron_single_rank):
    fp32 = sft_actor(ParallelConfig(params_dtype="fp32"), lr=SHIPPED_LR)
    bf16 = sft_actor(ParallelConfig(params_dtype="bf16"), lr=SHIPPED_LR)
    f0, b0 = main_weights(fp32), main_weights(bf16)
    train_steps(fp32, 5)
    train_steps(bf16, 5)  # 10 optimizer steps each (two mini-batches per update)
    f1, b1 = main_weights(fp32), main_weights(bf16)
    # embedding rows of tokens no batch holds get no gradient (no weight decay either): they stay in both
    fp32_changed = changed_fraction(f0, f1)
    assert fp32_changed > 0.9
    assert changed_fraction(b0, b1) >= 0.99 * fp32_changed  # the fp32 main weights take every update
    # and the same updates: bf16 gradients differ a little, Adam's normalised steps point the same way
    assert delta_cosine(f0, f1, b0, b1) > 0.9

    # negative control, the old path: AdamW stepping the bf16 parameters themselves rounds them away
    model = bf16.model
    params = [p for p in model.parameters() if p.requires_grad]
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    old = torch.optim.AdamW(params, lr=SHIPPED_LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        old.step()
    end = {n: p.detach().float() for n, p in model.named_parameters()}
    assert changed_fraction(start, end) < 0.1


def test_bf16_loss_curve_tracks_fp32(megatron_single_rank):
    # one batch learnt step after step (random tokens: a new batch each step has nothing to learn)
    fp32 = train_steps(sft_actor(ParallelConfig(params_dtype="fp32"), lr=2e-3), 6, same_batch=True)
    bf16 = train_steps(sft_actor(ParallelConfig(params_dtype="bf16"), lr=2e-3), 6, same_batch=True)
    assert fp32[-1] < fp32[0] - 0.05  # it trains
    # bf16 logits carry ~3 significant digits; 2 % of the loss bounds their effect over 12 steps
    assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.02, scale=0.0, what="bf16 vs fp32 SFT loss")


# --------------------------------------------------------------------------- DP=2, recompute
def dp_case(settings: dict) -> dict:
    from dpo_rl.runtime.worker_group import split_for_dp

    world = torch.distributed.get_world_size()
    worker = sft_actor(ParallelConfig(), lr=1e-3, weight_decay=0.01, **settings)
    # each DP rank gets its shard, as the worker group dispatches it
    metrics = [worker.update(split_for_dp(sft_rows(dp_size=world, seed=1 + step), world)[0][worker.ranks.dp_rank])
               for step in range(2)]
    return {"metrics": metrics, "weights": {n: p.detach().clone() for n, p in worker.model.named_parameters()},
            "initial": {n: p.detach().clone() for n, p in sft_actor(ParallelConfig(), lr=0.0).model.named_parameters()},
            "dp_rank": worker.ranks.dp_rank}


@pytest.mark.parametrize("settings", [
    {"use_distributed_optimizer": True},
    {"use_distributed_optimizer": True, "overlap_grad_reduce": True},
    {"use_distributed_optimizer": False},
], ids=["distributed", "distributed+overlap", "replicated"])
def test_dp2_gives_dp1_weights(settings):
    one = run_distributed(dp_case, 1, ParallelConfig(), settings)[0]
    two = run_distributed(dp_case, 2, ParallelConfig(), settings)
    for name, expected in one["weights"].items():
        assert torch.equal(two[0]["weights"][name], two[1]["weights"][name]), f"DP replicas differ at {name}"
        # DP sums the two halves' gradients in another order; Adam normalises each element's step, so on an
        # element with a near-zero gradient that rounding moves the update by a fraction of the LR: judge the
        # updates (weights minus the shared start) against their own size plus the LR
        start = one["initial"][name]
        assert_close(two[0]["weights"][name] - start, expected - start, rtol=1e-2, scale=1e-3, what=f"DP=2 {name}")
    for step in range(2):
        for key in ("loss", "actor/grad_norm"):
            assert_close(two[0]["metrics"][step][key], one["metrics"][step][key], rtol=1e-5, scale=0.0,
                         what=f"step {step} {key}")


@pytest.mark.parametrize("recompute", [
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    {"recompute_granularity": "selective"},
], ids=["full", "selective"])
def test_activation_recomputation_gives_the_same_update(megatron_single_rank, recompute):
    plain = sft_actor(ParallelConfig(), lr=1e-3)
    again = sft_actor(ParallelConfig(), lr=1e-3, **recompute)
    assert again.model.config.recompute_granularity == recompute["recompute_granularity"]
    first, second = plain.update(sft_rows()), again.update(sft_rows())
    assert_close(second["actor/grad_norm"], first["actor/grad_norm"], rtol=1e-6, scale=0.0, what="grad norm")
    for (name, a), b in zip(plain.model.named_parameters(), again.model.parameters()):
        assert_close(b.detach(), a.detach(), rtol=1e-6, what=name)


def test_all_finite_is_exact_where_its_fast_sum_overflows():
    from dpo_rl.workers.megatron.optimizer import _all_finite

    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert _all_finite(values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = values.clone()
        broken[517] = bad
        assert not _all_finite(broken), bad
    huge = torch.full((10,), 3e38)  # finite values whose sum overflows to inf
    assert not torch.isfinite(huge.sum()) and _all_finite(huge)
