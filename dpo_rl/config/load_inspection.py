"""What a role's ``load`` directory holds, read from its metadata alone, checked before Ray starts.

A role's ``load`` is one of two kinds of directory (what :meth:`dpo_rl.workers.base.MegatronWorker._load`
accepts):

* an **HF checkpoint**: ``config.json`` plus weights, ``model.safetensors`` (or shards named by
  ``model.safetensors.index.json``) or ``pytorch_model.bin`` (or its shards and index);
* a **Megatron checkpoint**: ``dpo_rl_checkpoint.json`` (model config, TP, PP, reward flag) and per-rank
  files, written by ``tools/checkpoint/convert_ckpt.py`` or by a training run (its ``save_dir``).

:func:`check_load` says whether it is the kind of model the role needs (:func:`role_needs`: a causal LM,
a reward model with a score head, or either for the reward stage, which loads a causal LM's trunk) and the
architecture the role's ``model`` names. It reads JSON files and safetensors headers only, never a tensor,
so it stays cheap on the driver for an 8B model.

The Megatron layout's file names live here, in the lowest layer that reads them: config validation may
not import :mod:`dpo_rl.checkpoint` (pyproject's import-linter layers), which takes them from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dpo_rl.config.model import ModelConfig, model_config_from_dict
from dpo_rl.errors import ConfigError

META_FILE = "dpo_rl_checkpoint.json"
"""A Megatron checkpoint's metadata: model config, TP, PP, reward flag, format version."""
TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""The iteration a Megatron checkpoint directory holds: ``release`` (converted) or a training step."""
RELEASE = "release"
HF_CONFIG = "config.json"
#: Where an HF directory's weights are, in the order :class:`dpo_rl.checkpoint.hf_files.HFCheckpoint` looks.
HF_WEIGHTS = (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model*.bin"))
#: ModelConfig field -> HF config.json key, for the fields that fix the weights' shapes.
HF_ARCHITECTURE = (("family", "model_type"), ("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                   ("ffn_hidden_size", "intermediate_size"), ("num_attention_heads", "num_attention_heads"),
                   ("num_query_groups", "num_key_value_heads"), ("vocab_size", "vocab_size"))
CAUSAL_LM, REWARD_MODEL = "causal LM", "reward model"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """A Megatron rank's directory: ``mp_rank_{tp:02d}`` or, with PP, ``mp_rank_{tp:02d}_{pp:03d}``."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


@dataclass(frozen=True)
class LoadNeed:
    """What a role's worker can load (see :func:`role_needs`)."""

    who: str
    """The role as messages name it (``the actor``)."""
    value_head: bool
    """The worker builds a scalar value head (a reward model), not an LM head."""
    lm_trunk: bool = False
    """An HF causal LM is accepted too: its trunk is loaded and the value head starts fresh (the reward stage)."""


def role_needs(role: str, trained: bool) -> LoadNeed:
    """The actor and the reference need a causal LM; the reward role scoring samples a reward model; the
    trained reward role (``stage: reward``) a reward model or an HF causal LM (``RewardTrainerWorker``)."""
    if role != "reward":
        return LoadNeed("the actor" if role == "actor_rollout" else "the reference", value_head=False)
    if trained:
        return LoadNeed("the reward stage", value_head=True, lm_trunk=True)
    return LoadNeed("the reward role (it scores samples)", value_head=True)


def check_load(key: str, path: Optional[str], need: LoadNeed, model: ModelConfig, model_name: str,
               tp: int = 1, pp: int = 1) -> list[str]:
    """Problems with ``path`` as the ``load`` of a role (``key`` is the full key, e.g.
    ``actor_rollout_ref.actor_rollout.load``) whose ``model`` is ``model_name`` and which trains at TP x PP.
    ``path`` must exist (resolution checks that first)."""
    if path is None:
        return []
    directory = Path(path)
    if (directory / META_FILE).is_file():
        return _check_megatron(key, directory, need, model, model_name, tp, pp)
    if (directory / "trainer_state.json").is_file() and (directory.parent / META_FILE).is_file():
        return [f"{_where(key, directory)} is one step of a training checkpoint; a load names the whole checkpoint "
                f"directory (it holds {META_FILE} and loads its latest step): set {key}={str(directory.parent)!r}"]
    return _check_hf(key, directory, need, model, model_name)


def _where(key: str, directory: Path) -> str:
    return f"{key}={str(directory)!r}"


def _section(key: str) -> str:
    return key.removesuffix(".load")


# --------------------------------------------------------------------------- HF directories
def _check_hf(key: str, directory: Path, need: LoadNeed, model: ModelConfig, model_name: str) -> list[str]:
    where = _where(key, directory)
    weights, index_problems = hf_weight_files(directory)
    problems = [f"{key}: {problem}" for problem in index_problems]
    if not (directory / HF_CONFIG).is_file():
        if (directory / "adapter_config.json").is_file():
            return [f"{where} is a PEFT (LoRA) adapter, not a model; merge it into its base with "
                    "tools/checkpoint/convert_ckpt.py --load-model-type hf --save-model-type hf --load-dir <base> "
                    f"--lora-adapter-dir {directory} --save-dir <merged> and set {key}=<merged>"]
        return [f"{where} holds no {HF_CONFIG}{'' if weights else ' and no weights'}; it must be an HF checkpoint "
                f"directory ({HF_CONFIG} + model.safetensors) or a Megatron checkpoint directory ({META_FILE}, "
                "from tools/checkpoint/convert_ckpt.py or a training run's save_dir)"]
    try:
        hf = read_json(directory / HF_CONFIG)
    except ConfigError as err:
        return [f"{key}: {problem}" for problem in err.problems]
    if not weights and not problems:
        return [f"{where} holds no weights (no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                "or pytorch_model.bin.index.json, only config.json); point it at a complete checkpoint directory "
                "(save_pretrained and this project's HF exports write both)"]
    tensors: dict[str, Any] = {}
    for name in weights:
        if name.endswith(".safetensors"):
            try:
                tensors.update(safetensors_header(directory / name))
            except ValueError as err:
                problems.append(f"{key}: {damaged(directory / name, 'safetensors', str(err))}")
    kind, label = hf_kind(hf, set(tensors))
    wrong = _wrong_kind(where, need, kind, label)
    if wrong:
        return problems + [wrong]
    labels = _score_labels(hf, tensors)
    if kind == REWARD_MODEL and labels not in (None, 1):
        problems.append(f"{where} is a classifier with {labels} labels; a reward model has one score "
                        "(num_labels: 1): point it at a reward model")
    found = {field: hf.get(hf_key) for field, hf_key in HF_ARCHITECTURE}
    found["num_query_groups"] = found["num_query_groups"] or found["num_attention_heads"]
    if hf.get("head_dim") is not None:
        found["head_dim"] = hf["head_dim"]
    if not need.value_head and "tie_word_embeddings" in hf:
        found["tie_word_embeddings"] = bool(hf["tie_word_embeddings"])
    return problems + _architecture_mismatch(key, directory, found, model, model_name)


def _score_labels(hf: dict[str, Any], tensors: dict[str, Any]) -> Optional[int]:
    """How many scores a classifier head gives: its tensor's rows, else config.json's labels (None: unknown)."""
    if "score.weight" in tensors:
        return tensors["score.weight"]["shape"][0]
    return len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels")


def hf_weight_files(directory: Path) -> tuple[list[str], list[str]]:
    """(weight files present, problems) the way ``HFCheckpoint`` finds them: an index's files, else a glob;
    safetensors first. Problems: an unreadable index, or files it names that are missing."""
    for index_name, pattern in HF_WEIGHTS:
        index = directory / index_name
        if not index.is_file():
            files = sorted(p.name for p in directory.glob(pattern))
            if files:
                return files, []
            continue
        try:
            files = sorted(set(read_json(index)["weight_map"].values()))
        except ConfigError as err:
            return [], err.problems
        except (KeyError, TypeError, AttributeError) as err:
            return [], [damaged(index, "weight index", f"no weight_map ({err!r})")]
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            return [f for f in files if f not in missing], [
                f"{index} names {len(missing)} file(s) that are missing ({', '.join(missing[:3])}); the copy is "
                "incomplete: re-copy it"]
        return files, []
    return [], []


def hf_kind(hf: dict[str, Any], names: set[str]) -> tuple[Optional[str], str]:
    """(:data:`CAUSAL_LM`, :data:`REWARD_MODEL` or None when unknown, what told): ``architectures`` in
    config.json, else the head's tensor in the safetensors headers."""
    arch = (hf.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return REWARD_MODEL, arch
    if arch.endswith("ForCausalLM"):
        return CAUSAL_LM, arch
    if "score.weight" in names:
        return REWARD_MODEL, "a score.weight head"
    if "lm_head.weight" in names:
        return CAUSAL_LM, "an lm_head.weight head"
    return None, arch


def _wrong_kind(where: str, need: LoadNeed, kind: Optional[str], label: str) -> Optional[str]:
    if kind == REWARD_MODEL and not need.value_head:
        return (f"{where} is a reward-model checkpoint ({label}); {need.who} needs a causal LM (*ForCausalLM): "
                "point it at an SFT or base model")
    if kind == CAUSAL_LM and need.value_head and not need.lm_trunk:
        return (f"{where} is a causal-LM checkpoint ({label}); {need.who} needs a reward model with a score head "
                "(*ForSequenceClassification, 1 label): point it at one, e.g. the hf_reward export of a "
                "training.stage: reward run")
    return None


def _architecture_mismatch(key: str, directory: Path, found: dict[str, Any], model: ModelConfig,
                           model_name: str) -> list[str]:
    """One problem listing each field where the checkpoint's value differs from ``model``'s."""
    section = _section(key)
    differ = [name for name, value in found.items() if value != getattr(model, name)]
    if not differ:
        return []
    has = ", ".join(f"{name} {found[name]!r}" for name in differ)
    says = ", ".join(f"{name} {getattr(model, name)!r}" for name in differ)
    return [f"{_where(key, directory)} has {has} but {section}.model {model_name!r} says {says}; set {section}.model "
            f"to the checkpoint's architecture (a model file with its values), or load a checkpoint of {model_name!r}"]


# --------------------------------------------------------------------------- Megatron directories
def _check_megatron(key: str, directory: Path, need: LoadNeed, model: ModelConfig, model_name: str,
                    tp: int, pp: int) -> list[str]:
    where = _where(key, directory)
    try:
        meta = read_json(directory / META_FILE)
        saved = model_config_from_dict(meta["model"], source=str(directory / META_FILE))
        ckpt_tp, ckpt_pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    except (ValueError, KeyError, TypeError) as err:
        reason = err.problems[0] if isinstance(err, ConfigError) else str(err)
        return [f"{key}: {directory / META_FILE} is not a complete checkpoint description ({reason}); re-copy "
                "the checkpoint or convert it again"]
    if meta.get("lora"):
        return [f"{where} is a LoRA training checkpoint: its rank files hold the adapters alone, not a model; "
                "export that run with training.export_hf: true and load its merged HF model"]
    wrong = _wrong_megatron_kind(key, directory, need, bool(meta.get("reward")))
    if wrong:
        return [wrong]
    problems = _architecture_mismatch(key, directory, dataclasses.asdict(saved), model, model_name)
    if (ckpt_tp, ckpt_pp) != (tp, pp):
        problems.append(f"{where} is sharded TP={ckpt_tp}, PP={ckpt_pp} but {_section(key)} runs TP={tp}, PP={pp}; "
                        "reshard it: python tools/checkpoint/convert_ckpt.py --load-model-type mg --save-model-type "
                        f"mg --load-dir {directory} --save-dir <new> --target-tensor-parallel-size {tp} "
                        f"--target-pipeline-parallel-size {pp}")
    return problems + _missing_rank_files(where, directory, ckpt_tp, ckpt_pp)


def _wrong_megatron_kind(key: str, directory: Path, need: LoadNeed, reward: bool) -> Optional[str]:
    """A Megatron checkpoint loads only into a model with the same head (``load_model_shard``)."""
    where = _where(key, directory)
    if reward and not need.value_head:
        return (f"{where} is a reward-model checkpoint (reward: true in {META_FILE}); {need.who} needs a causal "
                "LM: point it at an SFT or base model")
    if not reward and need.value_head and need.lm_trunk:
        return (f"{where} is a causal-LM Megatron checkpoint; {need.who} starts from a causal LM's trunk only "
                "from an HF directory: convert it with tools/checkpoint/convert_ckpt.py --load-model-type mg "
                f"--save-model-type hf --load-dir {directory} --save-dir <hf> and set {key}=<hf>")
    if not reward and need.value_head:
        return (f"{where} is a causal-LM checkpoint (reward: false in {META_FILE}); {need.who} needs a reward "
                "model with a value head: point it at one, e.g. the hf_reward export of a training.stage: reward run")
    return None


def _missing_rank_files(where: str, directory: Path, tp: int, pp: int) -> list[str]:
    tracker = directory / TRACKER_FILE
    iteration = tracker.read_text().strip() if tracker.is_file() else RELEASE
    if iteration != RELEASE:
        if not iteration.isdigit():
            return [f"{where}: {tracker} holds {iteration!r}, not a step or {RELEASE!r}; re-copy the checkpoint"]
        iteration = f"iter_{int(iteration):07d}"
    missing = [f"{iteration}/{rank_dir_name(t, p, pp)}/model_optim_rng.pt" for t in range(tp) for p in range(pp)
               if not (directory / iteration / rank_dir_name(t, p, pp) / "model_optim_rng.pt").is_file()]
    if not missing:
        return []
    return [f"{where} holds no weights for {len(missing)} of its {tp * pp} ranks ({', '.join(missing[:3])} missing); "
            "the copy is incomplete: re-copy it"]


# --------------------------------------------------------------------------- metadata readers
def damaged(path: str | Path, file_format: str, reason: str) -> str:
    """The message for a checkpoint file that cannot be read."""
    return f"{path} is truncated or corrupted ({file_format}: {reason}); re-copy or re-export it"


def read_json(path: str | Path) -> Any:
    """A checkpoint's JSON file (config.json, an index, dpo_rl_checkpoint.json); a ConfigError naming it
    when it is cut short or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([damaged(path, "JSON", str(err))]) from None


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) without reading any tensor;
    ValueError when the file is shorter or longer than its header says (truncated, or not safetensors)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or length > size - 8:
            raise ValueError(f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"its header describes {8 + length + end} bytes but the file has {size}")
    return header


__all__ = ["LoadNeed", "check_load", "role_needs", "hf_kind", "hf_weight_files", "damaged", "read_json",
           "safetensors_header", "rank_dir_name", "META_FILE", "TRACKER_FILE", "RELEASE"]
