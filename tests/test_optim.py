"""LR schedule and the optimizer's parameter groups."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.config.schema import RoleConfig
from dpo_rl.optim import build_optimizer, lr_factor, parameter_groups


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert [lr_factor(s, warmup=4, total=10, style="constant", min_ratio=0.1) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    assert lr_factor(4, warmup=4, total=10, style="linear", min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(10, warmup=4, total=10, style="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, warmup=4, total=10, style="cosine", min_ratio=0.0) == pytest.approx(0.5)


def test_norms_and_biases_do_not_decay_and_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad_(False)
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    assert [p is model[0].weight for p in groups["decay"]["params"]] == [True]
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # one step with zero gradients: only decayed weights shrink (AdamW's decoupled decay)
    optimizer, _ = build_optimizer(model, RoleConfig(model="m", lr=0.5, weight_decay=0.1), total_iters=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], before["0.weight"] * (1 - 0.5 * 0.1))
    assert all(torch.equal(after[n], before[n]) for n in ("0.bias", "1.weight", "1.bias", "2.weight"))


def test_every_trainable_megatron_parameter_is_in_exactly_one_group(megatron_single_rank):
    from dpo_rl.config.model import ParallelConfig, shipped_model_config
    from dpo_rl.workers.megatron.model_factory import build_gpt_model

    model = build_gpt_model(shipped_model_config("tiny"), ParallelConfig())
    groups = parameter_groups(model, 0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    no_decay = {id(p) for g in groups if g["name"] == "no_decay" for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in no_decay]
    assert names and all("norm" in n or n.endswith("bias") for n in names)
