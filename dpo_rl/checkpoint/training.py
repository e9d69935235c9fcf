"""Training checkpoints: atomic saves every ``save_interval`` steps, the last ``keep_last_k`` kept,
and resumption (``resume: auto`` = the latest one, if any).

```
<save_dir>/iter_0000020/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   model, optimizer, scheduler, RNG
<save_dir>/iter_0000020/mp_rank_{tp:02d}[_{pp:03d}]/distrib_optim_dp{dp:03d}.pt  distributed optimizer: each
                                                                         DP rank's main params + Adam moments
<save_dir>/iter_0000020/trainer_state.json                                step, consumed prompts
<save_dir>/latest_checkpointed_iteration.txt                              "20"
<save_dir>/dpo_rl_checkpoint.json                                         model config (convert_ckpt reads it)
```

Every rank writes into ``iter_XXXXXXX.staging``; the driver then renames that directory and
replaces the tracker file (each an atomic rename). A crash before the tracker is replaced
leaves the previous checkpoint as the latest; staging directories are never read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from dpo_rl.checkpoint.convert import (
    META_FILE,
    TRACKER_FILE,
    load_into_model,
    rank_dir_name,
)
from dpo_rl.checkpoint.hf_weights import local_mcore_state
from dpo_rl.config.model import ModelConfig
from dpo_rl.errors import ConfigError

_ITER = re.compile(r"^iter_(\d{7})$")
STAGING_SUFFIX = ".staging"


def iteration_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def staging_dir(save_dir: str | Path, step: int) -> Path:
    return Path(str(iteration_dir(save_dir, step)) + STAGING_SUFFIX)


def rank_file(directory: str | Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    return Path(directory) / rank_dir_name(tp_rank, pp_rank, pp_size) / "model_optim_rng.pt"


def latest_step(save_dir: str | Path) -> Optional[int]:
    """The step of the latest committed checkpoint, or None."""
    tracker = Path(save_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    step = int(tracker.read_text().strip())
    if not iteration_dir(save_dir, step).is_dir():
        raise ConfigError([f"{tracker} names step {step} but {iteration_dir(save_dir, step)} is missing"])
    return step


def resolve_resume(setting: str, save_dir: str | Path) -> Optional[Path]:
    """``none`` -> None; ``auto`` -> the latest checkpoint or None; else a checkpoint directory."""
    if setting == "none":
        return None
    if setting == "auto":
        step = latest_step(save_dir)
        return None if step is None else iteration_dir(save_dir, step)
    path = Path(setting)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError([f"training.resume={setting!r} is not a checkpoint directory (no trainer_state.json); "
                           "use auto, none, or an iter_XXXXXXX directory"])
    return path


#: Version 4: megatron-core's optimizer (fp32 main parameters; a per-DP-rank shard file with the
#: distributed optimizer). Version 3 held a torch AdamW state, which megatron's optimizer cannot read.
#: A LoRA run's rank file holds the adapters alone and names its settings under ``lora`` (absent: full model).
CHECKPOINT_VERSION = 4.0


def optimizer_shard_file(directory: str | Path, tp_rank: int, pp_rank: int, pp_size: int, dp_rank: int) -> Path:
    return Path(directory) / rank_dir_name(tp_rank, pp_rank, pp_size) / f"distrib_optim_dp{dp_rank:03d}.pt"


def save_training_state(path: Path, model: torch.nn.Module, optimizer: dict[str, Any],
                        scheduler: dict[str, Any], *, adapters: Optional[dict[str, Any]] = None,
                        trainable: Optional[dict[str, torch.Tensor]] = None) -> None:
    """One model-parallel rank's model shard, optimizer and scheduler state dicts, and RNG states.

    With LoRA (``adapters``: the role's lora settings) the model part is ``trainable`` alone, the adapters
    (and a reward model's value head): the frozen base comes from the role's ``load`` again on resume."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _atomic_save(path, {
        # local-spec names, so convert_ckpt reads a full model's part too
        "model": local_mcore_state(model) if adapters is None else trainable,
        "lora": adapters,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": rng,
        "checkpoint_version": CHECKPOINT_VERSION,
    })


def load_training_state(path: Path, model: torch.nn.Module, *, adapters: Optional[dict[str, Any]] = None,
                        load_trainable=None) -> dict[str, Any]:
    """Load the model shard and RNG states of :func:`save_training_state`; returns the whole state
    (``optimizer`` and ``scheduler`` for the caller to restore). With LoRA (``adapters``) the checkpoint must
    hold adapters saved with the same settings, and ``load_trainable(state)`` loads them."""
    if not path.is_file():
        raise ConfigError([f"{path} is missing: the checkpoint was written with a different TP/PP layout"])
    state = safe_load(path)
    version = state.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise ConfigError([f"{path} has checkpoint_version {version}, this dpo_rl reads {CHECKPOINT_VERSION} "
                           "(megatron-core's optimizer); it cannot be resumed: start a new run from its weights "
                           "(tools/checkpoint/convert_ckpt.py to HF, then the role's load)"])
    saved = state.get("lora")
    if saved != adapters:
        held = f"LoRA adapters ({saved})" if saved else "a fully trained model"
        wanted = f"LoRA adapters ({adapters})" if adapters else "full fine-tuning"
        raise ConfigError([f"{path} holds {held} but the role is configured for {wanted}; resume with the lora "
                           "settings the checkpoint was trained with, or start a new run (training.resume: none)"])
    if adapters is None:
        load_into_model(model, state["model"])
    else:
        load_trainable(state["model"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state


def save_optimizer_shard(path: Path, shard: Any) -> None:
    _atomic_save(path, shard)


def load_optimizer_shard(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError([f"{path} is missing: the checkpoint was written with another data-parallel size or "
                           "without use_distributed_optimizer"])
    return safe_load(path)


def safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, so a planted checkpoint cannot
    run code; anything else is a :class:`ConfigError` naming the file."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise ConfigError([f"{path} holds more than tensors and plain data, so it was not loaded (loading it could "
                           f"run code): {reason}; was it written by dpo_rl?"]) from None


def _atomic_save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def commit(save_dir: str | Path, step: int, trainer_state: dict[str, Any], model_config: ModelConfig,
           tp: int, pp: int, keep_last_k: int, reward: bool = False, lora: Optional[dict[str, Any]] = None) -> Path:
    """Make the staged checkpoint of ``step`` the latest; drop all but the last ``keep_last_k``. ``lora``: the
    adapters' settings when the rank files hold adapters alone (recorded so convert_ckpt refuses them clearly)."""
    save_dir = Path(save_dir)
    staged, final = staging_dir(save_dir, step), iteration_dir(save_dir, step)
    (staged / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    meta = {"format_version": 1, "model": asdict(model_config), "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp, "reward": reward}
    if lora is not None:
        meta["lora"] = lora
    _atomic_write(save_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _atomic_write(save_dir / TRACKER_FILE, f"{step}\n")
    if keep_last_k > 0:
        steps = sorted(int(m.group(1)) for p in save_dir.iterdir() if (m := _ITER.match(p.name)))
        for old in steps[:-keep_last_k]:
            shutil.rmtree(iteration_dir(save_dir, old))
    return final


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "trainer_state.json").read_text())


def save_group_checkpoint(group, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                          model_config: ModelConfig, tp: int, pp: int, keep_last_k: int, reward: bool = False,
                          lora: Optional[dict[str, Any]] = None) -> Path:
    """Every rank of a trained worker group writes into a staging directory; then it is committed."""
    staging = staging_dir(save_dir, step)
    shutil.rmtree(staging, ignore_errors=True)
    group.save_checkpoint(str(staging))
    return commit(save_dir, step, trainer_state, model_config, tp, pp, keep_last_k, reward, lora)


def restore_group_checkpoint(group, resume: str, save_dir: str | Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """Load the checkpoint ``resume`` names (auto, none or a directory) into ``group``; (path, trainer state)."""
    path = resolve_resume(resume, save_dir)
    if path is None:
        return None
    group.load_checkpoint(str(path))
    return path, read_trainer_state(path)
