"""TP=2 and PP=2 over gloo (2 processes) give TP=1's logits, log-probs, gradients and samples."""

from __future__ import annotations

import pytest
import torch

from dpo_rl.config.model import ParallelConfig
from tests.tolerance import assert_close, assert_differs
from tests.workers.megatron import dist_cases
from tests.workers.megatron.common import run_distributed

TP1 = ParallelConfig()
TP2 = ParallelConfig(tensor_model_parallel_size=2)
PP2 = ParallelConfig(pipeline_model_parallel_size=2)
#: TP/PP split the matmuls and the vocabulary softmax: the same sums in another order (float32),
#: relative to each tensor's largest value (summed log-probs: to each row's own size).
RTOL = 1e-5
#: Gradients accumulate over two micro-batches and the backward's reductions: a looser bound.
RTOL_GRAD = 1e-4


def output_rank(results):
    """The result of TP rank 0 on the last pipeline stage (where outputs are collected)."""
    return next(r for r in results if r["ranks"].is_output_rank)


def stacked(outputs, key):
    return torch.cat([o[key] for o in outputs])


def assert_same_forward_backward(reference, results):
    ours = output_rank(results)["outputs"]
    base = reference["outputs"]
    assert len(ours) == len(base) == 2
    for key in ("logits", "token_logprobs", "entropy", "summed"):
        scale = 0.0 if key == "summed" else None
        assert_close(stacked(ours, key), stacked(base, key), rtol=RTOL, scale=scale, what=key)
    grads = output_rank(results)["grads"]
    assert set(grads) == set(reference["grads"])
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, f"{name} got no gradient"
        assert_close(grads[name], grad, rtol=RTOL_GRAD, what=f"gradient of {name}")


@pytest.fixture(scope="module")
def reference(megatron_single_rank):
    return {family: dist_cases.forward_backward_case(family, TP1) for family in ("llama", "qwen2")}


def test_tp2_matches_tp1(reference):
    results = run_distributed(dist_cases.forward_backward_case, 2, TP2, "qwen2", TP2)
    assert [r["ranks"].tp_rank for r in results] == [0, 1]
    assert_same_forward_backward(reference["qwen2"], results)
    # Round trip HF -> mcore (TP=2) -> HF returns identical tensors, on the output rank.
    export, source = output_rank(results)["export"], output_rank(results)["source"]
    assert set(export) == set(source) and len(export) > 0
    assert all(torch.equal(export[k], source[k]) for k in source)


def test_pp2_matches_tp1(reference):
    results = run_distributed(dist_cases.forward_backward_case, 2, PP2, "llama", PP2)
    assert [r["ranks"].pp_rank for r in results] == [0, 1]
    assert results[0]["outputs"] == []  # outputs only on the last stage
    assert_same_forward_backward(reference["llama"], results)
    assert results[0]["export"] is None  # the export too is owned by the output rank
    export, source = output_rank(results)["export"], output_rank(results)["source"]
    assert set(export) == set(source)
    assert all(torch.equal(export[k], source[k]) for k in source)


def test_negative_control_wrong_gate_up_split_breaks_tp2(reference):
    results = run_distributed(dist_cases.wrong_gate_up_split_case, 2, TP2, "qwen2", TP2)
    ours = stacked(output_rank(results)["outputs"], "logits")
    assert_differs(ours, stacked(reference["qwen2"]["outputs"], "logits"), rtol=RTOL, what="gate/up split as one")


def test_tp2_generation_matches_tp1(megatron_single_rank):
    base = dist_cases.generation_case("llama", TP1)
    results = run_distributed(dist_cases.generation_case, 2, TP2, "llama", TP2)
    for rank_result in results:  # every TP rank agrees, and agrees with TP=1
        assert torch.equal(rank_result["greedy"], base["greedy"])
        assert torch.equal(rank_result["sampled"], base["sampled"])
        assert_close(rank_result["logprobs"], base["logprobs"], rtol=RTOL, what="sampled tokens' log-probs")
