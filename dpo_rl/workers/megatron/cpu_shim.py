"""Patches that let megatron-core 0.16.1 run on a CPU-only torch build.

megatron-core assumes CUDA in a handful of places that have nothing to do with the
maths: it allocates scratch tensors on ``torch.cuda.current_device()``, builds the
default causal mask with ``device="cuda"``, counts tokens in the pipeline schedules
on ``device="cuda"``, forks a CUDA RNG tracker around dropout, keeps the optimizer's
loss-scale and norm scalars on ``device="cuda"``, recognises 16-bit parameters by
their ``torch.cuda.*Tensor`` type names and saves the CUDA RNG state around activation
recomputation. On CPU each of those raises "Torch not compiled with CUDA enabled" (or,
for the type names, rejects the CPU parameters).

This module is the *only* place the project works around that. Every patch is:

* applied only when the run's device is ``cpu`` (``apply_cpu_shim`` refuses to run
  when CUDA is available and the caller did not ask for CPU explicitly);
* idempotent (applying twice is a no-op);
* listed in ``PATCHES`` and covered by ``tests/workers/megatron/test_cpu_shim.py``,
  which checks both that the unpatched call still fails (so a megatron-core upgrade
  that fixes it is noticed and the patch can go) and that the patched call works.

Nothing here changes numerics: the patched functions produce the same tensors, on
the CPU instead of a GPU.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

_APPLIED: list[str] = []

#: Name of each patch and what it fixes, in the order they are applied.
PATCHES: dict[str, str] = {
    "torch.cuda.current_device": (
        "megatron-core allocates scratch tensors (attention buffer, RoPE frequencies, TP "
        "gather outputs, KV cache) on torch.cuda.current_device(); on a CPU build it "
        "returns the CPU device instead of raising."
    ),
    "transformer.utils.get_default_causal_mask": (
        "the default causal mask is created with device='cuda'; build it on the CPU."
    ),
    "pipeline_parallel.schedules.torch": (
        "the schedules count tokens in torch.zeros(..., device='cuda'); give the schedules "
        "module a torch whose factory functions map 'cuda' to 'cpu'."
    ),
    "tensor_parallel.random.rng_tracker": (
        "the CUDA RNG tracker forks CUDA generator state around dropout; use megatron's "
        "own inference tracker (a no-op fork). Models here run with dropout 0 on CPU."
    ),
    "optimizer_and_ddp.torch": (
        "the optimizer (loss scale, found-inf flag, grad-norm scalars), the gradient "
        "clipping, the grad scaler, the DDP buffers and megatron.core.utils' local "
        "multi-tensor kernels create scalars with device='cuda'; give those modules the "
        "torch whose factory functions map 'cuda' to 'cpu' (as for the schedules)."
    ),
    "optimizer.cuda_type_names": (
        "Float16OptimizerWithFloat16Params and DistributedOptimizer sort parameters into "
        "16-bit and fp32 ones by tensor.type() == 'torch.cuda.BFloat16Tensor' etc., and "
        "clip_grad_by_total_norm_fp32 asserts 'torch.cuda.FloatTensor' grads; while those "
        "three run (and only then), a CPU tensor's type() reports the CUDA name of the "
        "same dtype."
    ),
    "tensor_parallel.random.cuda_rng_state": (
        "activation recomputation saves and restores the CUDA generator's state next to "
        "the CPU one; with no CUDA generator there is nothing to save: the CUDA part is an "
        "empty tensor and restoring it a no-op (the CPU state is still saved and restored)."
    ),
}


def apply_cpu_shim() -> None:
    """Apply every patch in :data:`PATCHES` to this process (CPU runs only)."""
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "apply_cpu_shim() called in a process that sees a CUDA device; the CPU shim "
            "must only be applied to CPU runs (training.device: cpu on a machine with no GPU)."
        )
    _patch_current_device()
    _patch_causal_mask()
    _patch_schedules_torch()
    _patch_rng_tracker()
    _patch_optimizer_torch()
    _patch_cuda_type_names()
    _patch_cuda_rng_state()
    logger.debug("megatron-core CPU shim applied: %s", ", ".join(_APPLIED))


def _patch_current_device() -> None:
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
    _APPLIED.append("torch.cuda.current_device")


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _patch_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax  # deferred: heavy (megatron-core)
    from megatron.core.transformer import utils as transformer_utils  # deferred: heavy (megatron-core)

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    cached = functools.lru_cache(maxsize=32)(get_default_causal_mask)
    transformer_utils.get_default_causal_mask = cached
    # fused_softmax imported the helper by name; patch that binding too.
    if hasattr(fused_softmax, "get_default_causal_mask"):
        fused_softmax.get_default_causal_mask = cached
    _APPLIED.append("transformer.utils.get_default_causal_mask")


class _CpuFactoryTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside megatron's schedules module only.

    Attribute access falls through to the real torch; the tensor factory functions map
    ``device="cuda"`` to the CPU.
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full")

    def __init__(self, real_torch: types.ModuleType) -> None:
        super().__init__("torch")
        self._real = real_torch

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name in self._FACTORIES:
            return _cuda_to_cpu(attr)
        return attr


def _cuda_to_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


def _patch_schedules_torch() -> None:
    from megatron.core.pipeline_parallel import schedules  # deferred: heavy (megatron-core)

    schedules.torch = _CpuFactoryTorch(torch)
    _APPLIED.append("pipeline_parallel.schedules.torch")


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random  # deferred: heavy (megatron-core)

    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _APPLIED.append("tensor_parallel.random.rng_tracker")


def _patch_optimizer_torch() -> None:
    from megatron.core import utils as mcore_utils  # deferred: heavy (megatron-core)
    from megatron.core.distributed import param_and_grad_buffer  # deferred: heavy (megatron-core)
    from megatron.core.optimizer import (  # deferred: heavy (megatron-core)
        clip_grads,
        distrib_optimizer,
        grad_scaler,
    )
    from megatron.core.optimizer import optimizer as mcore_optimizer  # deferred: heavy (megatron-core)

    for module in (mcore_utils, param_and_grad_buffer, clip_grads, distrib_optimizer, grad_scaler,
                   mcore_optimizer):
        module.torch = _CpuFactoryTorch(torch)
    _APPLIED.append("optimizer_and_ddp.torch")


_REAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_named_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """``Tensor.type()`` that names a CPU tensor's type as the CUDA one (``torch.cuda.FloatTensor``)."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _REAL_TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _REAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _with_cuda_type_names(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        torch.Tensor.type = _cuda_named_type  # type: ignore[method-assign]
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = _REAL_TENSOR_TYPE  # type: ignore[method-assign]

    return wrapper


def _patch_cuda_type_names() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer  # deferred: heavy (megatron-core)
    from megatron.core.optimizer import optimizer as mcore_optimizer  # deferred: heavy (megatron-core)

    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    clipping = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clipping
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clipping  # imported there by name
    _APPLIED.append("optimizer.cuda_type_names")


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    return None


def _patch_cuda_rng_state() -> None:
    from megatron.core.tensor_parallel import random as mp_random  # deferred: heavy (megatron-core)

    mp_random._get_cuda_rng_state = _no_cuda_rng_state
    mp_random._set_cuda_rng_state = _set_no_cuda_rng_state
    _APPLIED.append("tensor_parallel.random.cuda_rng_state")
