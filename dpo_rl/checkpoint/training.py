"""Training checkpoints: atomic saves every ``save_interval`` steps, the last ``keep_last_k`` kept,
and resumption (``resume: auto`` = the latest one, if any).

```
<save_dir>/iter_0000020/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   model, optimizer, scheduler, RNG
<save_dir>/iter_0000020/mp_rank_{tp:02d}[_{pp:03d}]/distrib_optim_dp{dp:03d}.pt  distributed optimizer: each
                                                                         DP rank's main params + Adam moments
<save_dir>/iter_0000020/reference/mp_rank_{tp:02d}[_{pp:03d}]/model.pt    a TR-DPO run's refreshed reference (its
                                                                         own TP/PP layout; weights only)
<save_dir>/iter_0000020/trainer_state.json                                step, consumed prompts (online: also
                                                                         in-flight prompts, policy version),
                                                                         reference version
<save_dir>/iter_0000020/manifest.json                                     every file's size at commit
<save_dir>/latest_checkpointed_iteration.txt                              "20"
<save_dir>/dpo_rl_checkpoint.json                                         model config (convert_ckpt reads it)
```

Every rank writes into ``iter_XXXXXXX.staging``; the driver then renames that directory and
replaces the tracker file (each an atomic rename). A crash before the tracker is replaced
leaves the previous checkpoint as the latest; staging directories are never read.

Before any worker loads a checkpoint, the driver checks it (:func:`checkpoint_problems`): every file
the manifest lists has its committed size, and every rank file opens (torch's zip reader, memory-mapped:
no tensor data is read). A damaged checkpoint named by ``training.resume`` is an error offering the
previous intact step; ``resume: auto`` falls back to the newest intact one with a warning. Checkpoints
from before the manifest get the open check alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dpo_rl.checkpoint import readers
from dpo_rl.checkpoint.convert import (
    META_FILE,
    TRACKER_FILE,
    load_into_model,
    rank_dir_name,
)
from dpo_rl.checkpoint.hf_weights import local_mcore_state
from dpo_rl.config.model import ModelConfig
from dpo_rl.errors import ConfigError

logger = logging.getLogger(__name__)

_ITER = re.compile(r"^iter_(\d{7})$")
STAGING_SUFFIX = ".staging"
MANIFEST_FILE = "manifest.json"
"""Each committed file's size (path relative to the iteration directory -> bytes), written by :func:`commit`."""


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
    """``none`` -> None; ``auto`` -> the newest intact checkpoint (a warning names the damaged ones skipped) or
    None; else that checkpoint directory, which must be intact. A damaged or missing choice is a ConfigError."""
    if setting == "none":
        return None
    if setting == "auto":
        step = latest_step(save_dir)
        return None if step is None else _newest_intact(save_dir, step)
    path = Path(setting)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError([f"training.resume={setting!r} is not a checkpoint directory (no trainer_state.json); "
                           "use auto, none, or an iter_XXXXXXX directory"])
    problems = checkpoint_problems(path)
    if problems:
        step = _step_of(path)
        previous = _newest_intact(path.parent, step - 1, quiet=True) if step is not None else None
        offer = (f"resume from the previous intact checkpoint with training.resume={previous}" if previous else
                 f"there is no earlier intact checkpoint in {path.parent}; start afresh with training.resume=none")
        raise ConfigError([f"training.resume={setting!r} is damaged: {'; '.join(problems)}. Re-copy the file(s), "
                           f"or {offer}"])
    return path


def _step_of(directory: Path) -> Optional[int]:
    match = _ITER.match(directory.name)
    return int(match.group(1)) if match else None


def _newest_intact(save_dir: str | Path, step: int, quiet: bool = False) -> Optional[Path]:
    """The newest checkpoint in ``save_dir`` at ``step`` or before that passes :func:`checkpoint_problems`.
    Unless ``quiet``, a damaged one skipped is a warning and none intact a ConfigError."""
    damaged: list[str] = []
    steps = sorted((s for p in Path(save_dir).iterdir() if (s := _step_of(p)) is not None and s <= step),
                   reverse=True) if Path(save_dir).is_dir() else []
    for candidate in steps:
        directory = iteration_dir(save_dir, candidate)
        problems = checkpoint_problems(directory)
        if not problems:
            if damaged and not quiet:
                logger.warning("training.resume=auto: %s; resuming from step %d (%s) instead",
                               "; ".join(damaged), candidate, directory)
            return directory
        damaged.extend(problems)
    if quiet:
        return None
    raise ConfigError([f"training.resume=auto: no intact checkpoint in {save_dir}: {'; '.join(damaged)}. Re-copy "
                       "the damaged file(s), or start afresh with training.resume=none"])


def checkpoint_problems(directory: str | Path) -> list[str]:
    """What is wrong with one committed checkpoint (an ``iter_XXXXXXX`` directory), cheaply: each file the
    manifest lists must have its size, ``trainer_state.json`` must parse and every ``.pt`` file must open
    memory-mapped (no tensor data is read). Empty when it looks intact."""
    directory = Path(directory)
    problems = []
    manifest = directory / MANIFEST_FILE
    if manifest.is_file():
        try:
            sizes = readers.read_json(manifest)["files"]
        except ConfigError as err:
            return err.problems
        except (KeyError, TypeError):
            return [readers.damaged(manifest, "manifest", "it lists no files")]
        for relative, size in sorted(sizes.items()):
            path = directory / relative
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{path} has {path.stat().st_size} bytes but had {size} when it was committed: it is "
                                "truncated or corrupted")
    if problems:
        return problems
    try:
        readers.read_json(directory / "trainer_state.json")
        for path in sorted(directory.rglob("*.pt")):
            readers.torch_load(path, mmap=True)
    except ConfigError as err:
        problems.extend(err.problems)
    return problems


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


#: The directory of a checkpoint that holds a refreshed reference's weights (TR-DPO: ``algorithm.ref_update``).
REFERENCE_DIR = "reference"


def reference_file(directory: str | Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    return Path(directory) / REFERENCE_DIR / rank_dir_name(tp_rank, pp_rank, pp_size) / "model.pt"


def save_model_shard(path: Path, model: torch.nn.Module) -> None:
    """One model-parallel rank's weights alone (a refreshed reference: no optimizer, no RNG)."""
    _atomic_save(path, {"model": local_mcore_state(model), "checkpoint_version": CHECKPOINT_VERSION})


def load_model_shard(path: Path, model: torch.nn.Module) -> None:
    """Load what :func:`save_model_shard` wrote into ``model`` (same TP/PP layout)."""
    if not path.is_file():
        raise ConfigError([f"{path} is missing: the reference was saved with a different TP/PP layout"])
    load_into_model(model, safe_load(path)["model"])


def save_optimizer_shard(path: Path, shard: Any) -> None:
    _atomic_save(path, shard)


def load_optimizer_shard(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError([f"{path} is missing: the checkpoint was written with another data-parallel size or "
                           "without use_distributed_optimizer"])
    return safe_load(path)


def safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, so a planted checkpoint cannot
    run code; that, or a truncated or corrupted file, is a :class:`ConfigError` naming the file."""
    return readers.torch_load(path)


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
    (staged / MANIFEST_FILE).write_text(json.dumps({"files": file_sizes(staged)}, indent=2, sort_keys=True) + "\n")
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


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` but the manifest (relative POSIX path -> bytes)."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE and p.suffix != ".tmp"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "trainer_state.json").read_text())


def save_group_checkpoint(group, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                          model_config: ModelConfig, tp: int, pp: int, keep_last_k: int, reward: bool = False,
                          lora: Optional[dict[str, Any]] = None, extra: Optional[Callable[[Path], Any]] = None) -> Path:
    """Every rank of a trained worker group writes into a staging directory (and ``extra`` with it, e.g. a
    refreshed reference's weights); then it is committed."""
    staging = staging_dir(save_dir, step)
    shutil.rmtree(staging, ignore_errors=True)
    group.save_checkpoint(str(staging))
    if extra is not None:
        extra(staging)
    return commit(save_dir, step, trainer_state, model_config, tp, pp, keep_last_k, reward, lora)


def restore_group_checkpoint(group, resume: str, save_dir: str | Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """Load the checkpoint ``resume`` names (auto, none or a directory) into ``group``; (path, trainer state)."""
    path = resolve_resume(resume, save_dir)
    if path is None:
        return None
    group.load_checkpoint(str(path))
    return path, read_trainer_state(path)
