"""What tests/workers/test_vllm_engine.py checks, run in one spawned process (vLLM starts once).

vLLM's engine shares the process's torch.distributed world and tears it down on shutdown, so it
never runs inside the pytest process itself.
"""

from __future__ import annotations

import glob
import os

import torch

from dpo_rl.checkpoint.hf_stream import buckets, stage_hf_groups
from dpo_rl.config.model import ParallelConfig
from dpo_rl.workers.megatron import hf_interop
from dpo_rl.workers.megatron.forward import Microbatch, model_forward
from dpo_rl.workers.megatron.generation import SamplingParams, generate
from dpo_rl.workers.megatron.logprobs import sequence_logprobs
from dpo_rl.workers.megatron.model_factory import build_gpt_model
from tests.workers.megatron.common import VOCAB, tiny_config, tiny_hf_model

PROMPT_LENGTHS = (5, 11, 3, 8, 6, 9)


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def stream(model, config):
    return buckets(stage_hf_groups(model, config, tp_group=None, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1),
                   64 * 2**10)  # small buckets: several per load


def trainer_logprobs(model, out):
    """The trainer's log-probs of the sampled tokens, aligned with ``out.rollout_logprobs``."""
    with torch.no_grad():
        logits = model_forward(model, Microbatch(out.sequences, out.attention_mask))
    lp = sequence_logprobs(logits, out.sequences, out.response_mask).token_logprobs
    return lp[:, out.prompt_length - 1:]


def trainer_logprobs_of(model, sequences):
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logits = model_forward(model, Microbatch(ids, torch.ones_like(ids)))
    return sequence_logprobs(logits, ids, torch.ones_like(ids)).token_logprobs


def hf_greedy(hf_model, batch, max_new_tokens, eos):
    from dpo_rl.batch import left_pad

    ids, mask = left_pad(batch, 0)
    return hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=0)


def engine_case() -> dict:
    from dpo_rl.workers.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    dist_files_before = set(glob.glob("/tmp/vllm_dist_*"))
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config, seed=3)
    model = build_gpt_model(config, ParallelConfig())
    hf_interop.load_into_current_rank(model, hf_model.state_dict(), config)
    model.eval()
    engine = VLLMEngine(config, params_dtype="fp32", device="cpu", seed=0, max_model_len=64, kv_cache_mb=32)
    results: dict = {"directory": engine.directory}
    results["tensors_loaded"] = engine.load_weights(stream(model, config))
    probe = torch.tensor(prompts()[:1] * 2)[:, :5].tolist()  # equal-length sequences
    results["probe"] = {"engine": engine.token_logprobs(probe), "trainer": trainer_logprobs_of(model, probe)}

    batch = prompts()
    free_run = hf_greedy(hf_model, batch, 12, eos=(1,))[:, max(PROMPT_LENGTHS):]
    eos = (int(free_run[0, 3]), int(free_run[2, 6]))  # ids greedy emits early in some rows
    greedy = SamplingParams(max_new_tokens=16, do_sample=False, eos_token_ids=eos, pad_token_id=0)
    vllm_greedy = engine.generate(batch, greedy, [0] * len(batch))
    native_greedy = generate(model, batch, greedy)
    results["greedy"] = {"vllm": vllm_greedy, "native": native_greedy,
                         "hf": hf_greedy(hf_model, batch, 16, eos)}

    sampled = SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, top_p=0.95,
                             eos_token_ids=eos, pad_token_id=0)
    seeds = list(range(100, 100 + len(batch)))
    first = engine.generate(batch, sampled, seeds)
    again = engine.generate(batch, sampled, seeds)
    reversed_order = engine.generate(batch[::-1], sampled, seeds[::-1])
    other = engine.generate(batch, sampled, [s + 7 for s in seeds])
    results["sampled"] = {"first": first, "again": again, "reversed": reversed_order, "other": other,
                          "trainer_logprobs": trainer_logprobs(model, first)}

    # an update: new weights in the Megatron model, streamed in place into the engine
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    updated_native = generate(model, batch, greedy)
    engine.load_weights(stream(model, config))
    results["updated"] = {"vllm": engine.generate(batch, greedy, [0] * len(batch)), "native": updated_native,
                          "version": engine.version,
                          "probe": {"engine": engine.token_logprobs(probe),
                                    "trainer": trainer_logprobs_of(model, probe),
                                    "before": results["probe"]["engine"]}}
    try:
        engine.load_weights(iter([list(next(iter(stream(model, config))))]))
        results["partial_load_error"] = None
    except RuntimeError as err:
        results["partial_load_error"] = str(err)
    engine.shutdown()
    results["directory_left"] = os.path.exists(results["directory"])
    results["set_num_threads_works"] = _set_num_threads_works()
    results["vllm_dist_files"] = sorted(set(glob.glob("/tmp/vllm_dist_*")) - dist_files_before)
    return results


def _set_num_threads_works() -> bool:
    torch.set_num_threads(2)
    works = torch.get_num_threads() == 2
    torch.set_num_threads(1)
    return works


def sample_once() -> int:
    """Start an engine, load weights, sample, shut down: what the network test traces. Runs in a plain
    process (no torch.distributed rendezvous of ours), so the trace shows vLLM's own traffic only."""
    from dpo_rl.workers.vllm_engine import VLLMEngine

    config = tiny_config("llama")
    state = tiny_hf_model(config, seed=1).state_dict()
    engine = VLLMEngine(config, params_dtype="fp32", device="cpu", seed=0, max_model_len=64, kv_cache_mb=16)
    engine.load_weights([[(name, state[name]) for name in engine.names]])
    out = engine.generate(prompts()[:2], SamplingParams(max_new_tokens=4, do_sample=True, seed=1), [1, 2])
    engine.shutdown()
    return int(out.response_mask.sum())


def tp2_case() -> dict:
    """One TP-2 engine over two ranks (each holding full HF tensors; vLLM takes its shard): greedy, sampling
    and probe log-probs, to compare with HF's and across the ranks."""
    import torch.distributed as dist

    from dpo_rl.workers.vllm_engine import VLLMEngine

    torch.set_num_threads(1)
    config = tiny_config("llama")
    hf_model = tiny_hf_model(config, seed=4)
    state = hf_model.state_dict()
    engine = VLLMEngine(config, params_dtype="fp32", device="cpu", seed=0, max_model_len=64, kv_cache_mb=16,
                        tensor_parallel_size=2, rank=dist.get_rank())
    engine.load_weights([[(name, state[name]) for name in engine.names]])
    batch = prompts()[:4]
    greedy = engine.generate(batch, SamplingParams(max_new_tokens=8, do_sample=False), [0] * len(batch))
    sampled = engine.generate(batch, SamplingParams(max_new_tokens=8, do_sample=True, seed=3), [5, 6, 7, 8])
    probe = torch.tensor(prompts()[:1] * 2)[:, :5].tolist()
    engine_probe = engine.token_logprobs(probe)
    with torch.no_grad():
        hf_probe = hf_model(torch.tensor(probe)).logits.log_softmax(-1)[:, :-1].gather(
            -1, torch.tensor(probe)[:, 1:, None])[..., 0]
    engine.shutdown()
    return {"greedy": greedy.sequences, "hf": hf_greedy(hf_model, batch, 8, eos=()), "sampled": sampled.sequences,
            "probe": engine_probe, "hf_probe": hf_probe}
