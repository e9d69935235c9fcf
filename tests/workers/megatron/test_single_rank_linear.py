"""The TP = 1 linear layers: megatron's results through a direct forward, and megatron's path where it is needed."""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import layers as megatron_layers

from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from dpo_rl.workers.megatron.single_rank_linear import SingleRankColumnLinear, SingleRankRowLinear, _direct
from tests.tolerance import assert_close
from tests.workers.megatron.common import tiny_config

MEGATRON_CLASS = {SingleRankColumnLinear: megatron_layers.ColumnParallelLinear,
                  SingleRankRowLinear: megatron_layers.RowParallelLinear}


def _linears(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m) in MEGATRON_CLASS}


def _as_megatron(model, family: str = "llama"):
    """A model with ``model``'s weights whose linear layers are megatron's own classes."""
    stock = build_gpt_model(tiny_config(family), ParallelConfig())
    stock.load_state_dict(model.state_dict())
    for module in _linears(stock).values():
        module.__class__ = MEGATRON_CLASS[type(module)]
    return stock


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    position_ids = torch.arange(ids.shape[1]).expand_as(ids)
    logits = model(ids, position_ids, attention_mask=None)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: the qkv layer has a bias
def test_tp1_model_uses_direct_layers_with_megatrons_results(megatron_single_rank, family):
    torch.manual_seed(0)
    model = build_gpt_model(tiny_config(family), ParallelConfig())
    linears = _linears(model)
    # every linear of every layer, and the LM head, takes the direct path
    assert len(linears) == 4 * model.config.num_layers + 1 and "output_layer" in linears
    assert all(m.direct_forward for m in linears.values())
    if family == "qwen2":
        assert linears["decoder.layers.0.self_attention.linear_qkv"].bias is not None
    stock = _as_megatron(model, family)
    ids = torch.randint(3, 1024, (3, 11), generator=torch.Generator().manual_seed(1))
    logits, grads = _loss_and_grads(model, ids)
    stock_logits, stock_grads = _loss_and_grads(stock, ids)
    assert torch.equal(logits, stock_logits)  # the same matmul and bias add as megatron's forward
    assert grads.keys() == stock_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, stock_grads[name], rtol=1e-5, what=f"grad of {name}")


def test_direct_forward_skips_megatrons_linear_function(megatron_single_rank, monkeypatch):
    """The speed-up is the skipped autograd function: a model that still called it would fail here."""
    torch.manual_seed(0)
    model = build_gpt_model(tiny_config(), ParallelConfig())
    ids = torch.randint(3, 1024, (2, 7), generator=torch.Generator().manual_seed(1))

    def refuse(*args, **kwargs):
        raise AssertionError("megatron's linear function was called on a single-rank layer")

    monkeypatch.setattr(megatron_layers, "linear_with_grad_accumulation_and_async_allreduce", refuse)
    _loss_and_grads(model, ids)  # forward and backward without megatron's path
    with pytest.raises(AssertionError, match="was called"):
        _loss_and_grads(_as_megatron(model), ids)  # control: megatron's own layers do call it


@pytest.mark.parametrize("feature", ["gradient_accumulation_fusion", "sequence_parallel", "explicit_expert_comm"])
def test_layer_needing_megatrons_path_keeps_it(megatron_single_rank, monkeypatch, feature):
    """A layer using a feature of megatron's path (fused weight-grad accumulation on GPU, sequence parallelism,
    expert communication) is not given the direct forward, and its calls go through megatron's."""
    torch.manual_seed(0)
    layer = build_gpt_model(tiny_config(), ParallelConfig()).decoder.layers[0].mlp.linear_fc1
    assert _direct(layer)
    setattr(layer, feature, True)
    assert not _direct(layer)
    layer.direct_forward = False
    calls = []
    monkeypatch.setattr(megatron_layers, "linear_with_grad_accumulation_and_async_allreduce",
                        lambda *args, **kwargs: calls.append(1) or torch.zeros(()))
    layer.gradient_accumulation_fusion = layer.sequence_parallel = layer.explicit_expert_comm = False
    layer(torch.ones(2, 1, layer.input_size))
    assert calls == [1]
