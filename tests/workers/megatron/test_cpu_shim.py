"""Each CPU-shim patch: the unpatched megatron-core call fails on CPU, the patched one works.

Runs in a fresh interpreter so the "before" half sees megatron-core unpatched. If a
megatron-core upgrade fixes a call, its "before" assertion fails loudly: drop that patch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dpo_rl.workers.megatron.cpu_shim import PATCHES

PROBE = textwrap.dedent(
    """
    import json, warnings
    warnings.simplefilter("ignore")
    import torch
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.optimizer import clip_grads, grad_scaler
    from dpo_rl.workers.megatron import cpu_shim

    def attempt(fn):
        try:
            out = fn()
            return {"ok": True, "value": repr(out)}
        except Exception as exc:
            return {"ok": False, "error": repr(exc)[:200]}

    def fork_tracker():
        with mp_random.get_cuda_rng_tracker().fork():
            return torch.rand(1).shape

    def clip_fp32_grads():
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.full((3,), 2.0)
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
        # clipped by 1/4, and the CPU type names are back once the call returned
        return [round(g, 4) for g in param.grad.tolist()], torch.zeros(1).type()

    def recompute():
        x = torch.ones(2, requires_grad=True)
        mp_random.checkpoint(lambda t: (t * 3).sum(), False, x).backward()
        return x.grad.tolist()

    calls = {
        "torch.cuda.current_device": lambda: torch.cuda.current_device(),
        "transformer.utils.get_default_causal_mask":
            lambda: fused_softmax.get_default_causal_mask(3).int().tolist(),
        "pipeline_parallel.schedules.torch":
            lambda: (schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type,
                     schedules.torch.nn is torch.nn),
        "tensor_parallel.random.rng_tracker": fork_tracker,
        "optimizer_and_ddp.torch": lambda: grad_scaler.ConstantGradScaler(8.0).scale.device.type,
        "optimizer.cuda_type_names": clip_fp32_grads,
        "tensor_parallel.random.cuda_rng_state": recompute,
    }
    report = {"before": {k: attempt(f) for k, f in calls.items()}}
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    report["refused_with_cuda"] = attempt(cpu_shim.apply_cpu_shim)
    torch.cuda.is_available = real
    cpu_shim.apply_cpu_shim()
    cpu_shim.apply_cpu_shim()  # idempotent
    report["after"] = {k: attempt(f) for k, f in calls.items()}
    report["applied"] = list(cpu_shim._APPLIED)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_patch_is_probed(report):
    assert set(report["before"]) == set(PATCHES)
    assert report["applied"] == list(PATCHES)  # each applied exactly once, in order


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for CPU-only torch builds")
@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_unpatched_call_fails_on_cpu(report, patch):
    assert not report["before"][patch]["ok"], (
        f"megatron-core no longer fails at {patch} on CPU; the patch may be dropped"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for CPU-only torch builds")
@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_patched_call_works_on_cpu(report, patch):
    assert report["after"][patch]["ok"], report["after"][patch]


def test_patched_values_are_right(report):
    after = report["after"]
    assert after["torch.cuda.current_device"]["value"] == "device(type='cpu')"
    assert after["transformer.utils.get_default_causal_mask"]["value"] == "[[0, 1, 1], [0, 0, 1], [0, 0, 0]]"
    assert after["pipeline_parallel.schedules.torch"]["value"] == "('cpu', True)"
    assert after["optimizer_and_ddp.torch"]["value"] == "'cpu'"
    assert after["optimizer.cuda_type_names"]["value"] == "([0.5, 0.5, 0.5], 'torch.FloatTensor')"
    assert after["tensor_parallel.random.cuda_rng_state"]["value"] == "[3.0, 3.0]"


def test_refuses_to_patch_a_cuda_process(report):
    assert not report["refused_with_cuda"]["ok"]
    assert "only be applied to CPU runs" in report["refused_with_cuda"]["error"]
