"""HF <-> Megatron-core checkpoint conversion with TP/PP resharding, one tensor at a time.

Megatron layout (Megatron-LM's per-rank format):

```
<dir>/latest_checkpointed_iteration.txt          "release" for converted checkpoints
<dir>/release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   {"model": local state dict, ...}
<dir>/dpo_rl_checkpoint.json                     ModelConfig, TP, PP, reward flag, format version
```

Local state dicts use megatron-core's local-spec names with per-stage layer numbering, and
each tensor is this rank's TP shard. The key maps of :mod:`dpo_rl.checkpoint.hf_weights`
say how each tensor is built and split. Conversion goes rule by rule:
- every target rank file is written on its own, holding only that rank's shards in memory;
- sources are memory-mapped (safetensors, and ``torch.load(mmap=True)`` rank files) and read
  one rule at a time, so peak memory stays near one rank's shard plus one full tensor.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from dpo_rl.checkpoint import hf_files, readers
from dpo_rl.checkpoint import hf_weights as hi
from dpo_rl.config.load_inspection import (  # the layout's names, shared with config validation
    META_FILE,
    RELEASE,
    TRACKER_FILE,
    rank_dir_name,
)
from dpo_rl.config.model import ModelConfig, model_config_from_dict
from dpo_rl.errors import ConfigError

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclasses.dataclass
class MegatronCheckpoint:
    """A converted (or training) checkpoint directory and its layout."""

    directory: Path
    config: ModelConfig
    tp: int
    pp: int
    reward: bool
    iteration: str = RELEASE

    def rank_file(self, tp_rank: int, pp_rank: int) -> Path:
        return self.directory / self.iteration / rank_dir_name(tp_rank, pp_rank, self.pp) / "model_optim_rng.pt"

    @staticmethod
    def is_checkpoint(directory: str | Path) -> bool:
        return (Path(directory) / META_FILE).is_file()

    @classmethod
    def open(cls, directory: str | Path) -> "MegatronCheckpoint":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise ConfigError([f"{directory}: no {META_FILE}; not a checkpoint written by tools/checkpoint"])
        meta = readers.read_json(meta_path)
        if meta.get("lora"):
            raise ConfigError([f"{directory} is a LoRA training checkpoint: its rank files hold the adapters alone "
                               f"({meta['lora']}), not a model. Export the run with training.export_hf: true (a "
                               "merged HF model and the PEFT adapter), or merge a PEFT adapter into its base with "
                               "tools/checkpoint/convert_ckpt.py --load-model-type hf --save-model-type hf "
                               "--lora-adapter-dir <adapter>"])
        tracker = directory / TRACKER_FILE
        iteration = tracker.read_text().strip() if tracker.is_file() else RELEASE
        if iteration != RELEASE and not iteration.isdigit():
            raise ConfigError([readers.damaged(tracker, "tracker", f"holds {iteration!r}, not a step or {RELEASE}")])
        iteration = iteration if iteration == RELEASE else f"iter_{int(iteration):07d}"
        try:
            ckpt = cls(directory, model_config_from_dict(meta["model"], source=str(meta_path)),
                       meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"], meta["reward"],
                       iteration)
        except (KeyError, TypeError) as err:
            raise ConfigError([readers.damaged(meta_path, "checkpoint description", f"no {err}")]) from None
        missing = [str(ckpt.rank_file(t, p)) for t in range(ckpt.tp) for p in range(ckpt.pp)
                   if not ckpt.rank_file(t, p).is_file()]
        if missing:
            raise ConfigError([f"{directory}: rank file(s) missing: {missing[:3]}"])
        return ckpt

    def write_meta(self) -> None:
        meta = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(self.config),
                "tensor_model_parallel_size": self.tp, "pipeline_model_parallel_size": self.pp,
                "reward": self.reward}
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (self.directory / TRACKER_FILE).write_text(self.iteration.removeprefix("iter_").lstrip("0") or RELEASE)


def _check_layout(config: ModelConfig, tp: int, pp: int) -> None:
    """TP must divide heads, KV groups, vocabulary and MLP width; PP must divide the layers."""
    problems = [f"--target-tensor-parallel-size {tp} does not divide {name} ({getattr(config, name)}); "
                f"pick a TP size that divides it"
                for name in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size")
                if tp < 1 or getattr(config, name) % tp]
    if pp < 1 or config.num_layers % pp:
        problems.append(f"--target-pipeline-parallel-size {pp} does not divide num_layers ({config.num_layers})")
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- full-tensor streams
FullTensors = Iterator[tuple[hi.TensorRule, Optional[int], torch.Tensor]]
"""(rule, global layer or None, full megatron tensor)."""


def _wanted(rule: hi.TensorRule, pp_rank: int, pp: int) -> bool:
    """Whether a non-layer rule belongs to target stage ``pp_rank`` of ``pp``."""
    return pp_rank == 0 if rule.mcore.startswith("embedding.") else pp_rank == pp - 1


def full_tensors_from_hf(get: Callable[[str], torch.Tensor], names: set[str], config: ModelConfig,
                         reward: bool, pp_rank: int = 0, pp: int = 1) -> FullTensors:
    """The full tensors of target stage ``pp_rank`` of ``pp``, read one rule at a time."""
    rules = hi.key_map(config, reward=reward)
    layers = hi.stage_layers(config, pp_rank, pp)
    chosen = [(r, None) for r in rules if not r.per_layer and _wanted(r, pp_rank, pp)]
    chosen += [(r, layer) for layer in layers for r in rules if r.per_layer]
    for rule, layer in chosen:
        hf_names = [h.format(i=layer) for h in rule.hf]
        missing = [n for n in hf_names if n not in names]
        if missing:
            raise ConfigError([f"HF checkpoint has no tensor {missing[0]!r}; is it a {config.family} "
                               f"{'reward ' if reward else ''}model with {config.num_layers} layers?"])
        yield rule, layer, hi.combine(rule, [get(n) for n in hf_names], config)


def full_tensors_from_megatron(ckpt: MegatronCheckpoint, pp_rank: int = 0, pp: int = 1) -> FullTensors:
    """The full tensors of target stage ``pp_rank`` of ``pp``; source rank files are memory-mapped."""
    rules = hi.key_map(ckpt.config, reward=ckpt.reward)
    wanted_layers = set(hi.stage_layers(ckpt.config, pp_rank, pp))
    for source_stage in range(ckpt.pp):
        entries = [(rule, layer, name) for rule, layer, name in
                   hi.local_tensor_names(rules, ckpt.config, source_stage, ckpt.pp)
                   if (layer in wanted_layers if rule.per_layer else _wanted(rule, pp_rank, pp))]
        if not entries:
            continue
        shards = [readers.torch_load(ckpt.rank_file(t, source_stage), mmap=True)["model"] for t in range(ckpt.tp)]
        for rule, layer, local_name in entries:
            parts = []
            for t, shard in enumerate(shards):
                if local_name not in shard:
                    raise ConfigError([f"{ckpt.rank_file(t, source_stage)}: no tensor {local_name!r}"])
                parts.append(shard[local_name])
            yield rule, layer, hi.unshard(parts, rule.tp_split)
        del shards


SourceFactory = Callable[[int, int], FullTensors]
"""(target pp_rank, target pp) -> that stage's full tensors."""


# --------------------------------------------------------------------------- writers
def write_megatron(make_source: SourceFactory, config: ModelConfig, directory: str | Path, tp: int, pp: int,
                   reward: bool) -> MegatronCheckpoint:
    """One rank file at a time: stream the rank's stage and keep only its TP shards in memory."""
    _check_layout(config, tp, pp)
    ckpt = MegatronCheckpoint(Path(directory), config, tp, pp, reward)
    per_stage = config.num_layers // pp
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            state: dict[str, torch.Tensor] = {}
            for rule, layer, full in make_source(pp_rank, pp):
                _check_shape(rule, layer, full, config, reward)
                name = rule.mcore.format(i=layer - pp_rank * per_stage) if rule.per_layer else rule.mcore
                state[name] = hi.shard(full, rule.tp_split, tp_rank, tp).clone()
            path = ckpt.rank_file(tp_rank, pp_rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": state, "checkpoint_version": 3.0, "iteration": 0}, path)
            del state
    ckpt.write_meta()
    return ckpt


def _check_shape(rule: hi.TensorRule, layer: Optional[int], full: torch.Tensor, config: ModelConfig,
                 reward: bool) -> None:
    expected = expected_shape(rule, config, reward)
    if tuple(full.shape) != expected:
        where = rule.mcore.format(i=layer) if layer is not None else rule.mcore
        raise ConfigError([f"{where}: checkpoint tensor has shape {tuple(full.shape)} but the config implies "
                           f"{expected}; the checkpoint's shapes disagree with its config"])


def expected_shape(rule: hi.TensorRule, config: ModelConfig, reward: bool) -> tuple[int, ...]:
    h, d = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_query_groups) * d
    name = rule.mcore
    if name.startswith("embedding."):
        return (config.vocab_size, h)
    if name == "output_layer.weight":
        return (1, h) if reward else (config.vocab_size, h)
    if name.endswith("linear_qkv.weight"):
        return (qkv, h)
    if name.endswith("linear_qkv.bias"):
        return (qkv,)
    if name.endswith("linear_proj.weight"):
        return (h, config.num_attention_heads * d)
    if name.endswith("linear_fc1.weight"):
        return (2 * config.ffn_hidden_size, h)
    if name.endswith("linear_fc2.weight"):
        return (h, config.ffn_hidden_size)
    return (h,)  # norms


def write_hf(source: FullTensors, config: ModelConfig, directory: str | Path, reward: bool,
             tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 2**30) -> Path:
    """HF safetensors shards (+ index), config.json and tokenizer files, loadable by transformers."""
    from safetensors.torch import save_file  # deferred: only reading or writing checkpoints needs it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    dtype = None
    for rule, layer, full in source:
        _check_shape(rule, layer, full, config, reward)
        dtype = dtype or full.dtype
        for name, tensor in zip([h.format(i=layer) for h in rule.hf], hi.decompose(rule, full, config)):
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
            shard[name] = tensor.contiguous()  # fresh from unshard/decompose, or a read-only mapped source tensor
            size += nbytes
    flush()
    if len(files) == 1:
        (directory / files[0]).rename(directory / "model.safetensors")
    else:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    (directory / "config.json").write_text(
        json.dumps(hf_files.hf_config_dict(config, reward=reward, torch_dtype=dtype_name), indent=2, sort_keys=True) + "\n")
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, directory / name)
    return directory


# --------------------------------------------------------------------------- entry points
def hf_to_megatron(load_dir: str, save_dir: str, tp: int, pp: int, reward: bool = False) -> MegatronCheckpoint:
    source = hf_files.HFCheckpoint(load_dir)
    config = source.config()
    _check_layout(config, tp, pp)
    return write_megatron(lambda stage, stages: full_tensors_from_hf(source.get, source.names, config, reward,
                                                                      stage, stages),
                          config, save_dir, tp, pp, reward)


def megatron_to_hf(load_dir: str, save_dir: str, tokenizer_dir: Optional[str] = None) -> Path:
    ckpt = MegatronCheckpoint.open(load_dir)
    return write_hf(full_tensors_from_megatron(ckpt), ckpt.config, save_dir, ckpt.reward, tokenizer_dir)


def megatron_to_megatron(load_dir: str, save_dir: str, tp: int, pp: int) -> MegatronCheckpoint:
    ckpt = MegatronCheckpoint.open(load_dir)
    return write_megatron(lambda stage, stages: full_tensors_from_megatron(ckpt, stage, stages), ckpt.config,
                          save_dir, tp, pp, ckpt.reward)


def load_model_shard(directory: str | Path, config: ModelConfig, tp_rank: int, tp: int, pp_rank: int, pp: int,
                    reward: bool) -> dict[str, torch.Tensor]:
    """This rank's local state dict from a Megatron checkpoint whose layout must match."""
    ckpt = MegatronCheckpoint.open(directory)
    if (ckpt.tp, ckpt.pp) != (tp, pp):
        raise ConfigError([f"{directory} is sharded TP={ckpt.tp}, PP={ckpt.pp} but the role runs TP={tp}, PP={pp}; "
                           f"reshard it: python tools/checkpoint/convert_ckpt.py --load-model-type mg "
                           f"--save-model-type mg --load-dir {directory} --save-dir <new> "
                           f"--target-tensor-parallel-size {tp} --target-pipeline-parallel-size {pp}"])
    if ckpt.config != config or ckpt.reward != reward:
        raise ConfigError([f"{directory}: its model config or reward flag differs from the role's model"])
    return readers.torch_load(ckpt.rank_file(tp_rank, pp_rank))["model"]


def load_into_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a rank's local-spec state dict into ``model``; every weight must be filled."""
    hi.copy_local_state(model, state)
