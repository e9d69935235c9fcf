"""Opening checkpoint files so that a truncated or corrupted one is one :class:`ConfigError` naming it.

Every read of a checkpoint file (HF safetensors and ``.bin`` weights, Megatron and training rank files,
their JSON descriptions) goes through here: a file cut short by a full disk or an interrupted copy is
then "<path> is truncated or corrupted (<format>: <reason>); re-copy or re-export it", not a
traceback from the format's library. ``torch`` files are read with ``weights_only=True``: tensors and
plain data only, so a planted checkpoint cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from dpo_rl.config.load_inspection import damaged, read_json
from dpo_rl.errors import ConfigError

#: What torch.load raises for a file that is not a whole checkpoint: miniz's zip errors (RuntimeError), a
#: short read (OSError, EOFError), a damaged pickle (UnpicklingError, ValueError and its UnicodeDecodeError).
_TORCH_READ_ERRORS = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)


def short_reason(err: BaseException) -> str:
    """The first sentence of an exception's message (miniz's errors go on for a paragraph)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(". ")[0]


def torch_load(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (memory-mapped with ``mmap``: no tensor data is read);
    a missing, damaged or code-carrying file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path} is missing; re-copy the checkpoint"])
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        code = [line for line in str(err).splitlines() if "GLOBAL" in line]
        if code:  # weights_only refused a global: the file asks to run code
            raise ConfigError([f"{path} holds more than tensors and plain data, so it was not loaded (loading it "
                               f"could run code): {code[0].strip()}; was it written by dpo_rl?"]) from None
        raise ConfigError([damaged(path, "torch", short_reason(err))]) from None
    except _TORCH_READ_ERRORS as err:
        raise ConfigError([damaged(path, "torch", short_reason(err))]) from None


def open_safetensors(path: str | Path):
    """A lazy ``safe_open`` handle; its header is checked against the file's size at once."""
    from safetensors import SafetensorError, safe_open  # deferred: only reading checkpoints needs it

    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path} is missing; re-copy the checkpoint"])
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ConfigError([damaged(path, "safetensors", short_reason(err))]) from None


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) safetensors file, e.g. a PEFT adapter."""
    handle = open_safetensors(path)
    return {name: handle.get_tensor(name) for name in handle.keys()}


__all__ = ["damaged", "load_safetensors", "open_safetensors", "read_json", "short_reason", "torch_load"]
