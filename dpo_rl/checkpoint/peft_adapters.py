"""LoRA adapters in PEFT's on-disk format: written from a LoRA-trained role, merged into an HF base.

```
<dir>/adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules (HF names), task_type
<dir>/adapter_model.safetensors    base_model.model.<hf module>.lora_A.weight [r, in], ...lora_B.weight [out, r];
                                   a reward model's value head as a module to save: base_model.model.score.weight
```

``peft.PeftModel.from_pretrained(<HF base>, <dir>)`` loads it onto the HF model (tested). megatron's
fused layers map to HF's separate ones exactly: q/k/v of ``linear_qkv`` (and gate/up of
``linear_fc1``) each get the shared A and their own rows of B, so ``B_q A`` is q's part of the
fused update. :func:`merge_peft_adapter` folds such an adapter (ours, or any plain LoRA one PEFT
wrote) into its HF base: ``W + alpha / r * B A`` per adapted module (``alpha / sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from dpo_rl.checkpoint import readers
from dpo_rl.checkpoint.hf_files import HFCheckpoint
from dpo_rl.config.schema import LoRASettings
from dpo_rl.errors import ConfigError

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: The value head of a reward model (HF ``*ForSequenceClassification.score``), saved whole beside the adapters.
SCORE_MODULE = "score"
#: PEFT options a plain LoRA merge cannot honour: present and not at their default, the merge is refused.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}}

AdapterTensors = dict[str, Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]


def save_peft_adapter(directory: str | Path, adapters: AdapterTensors, settings: LoRASettings, *, reward: bool,
                      base_model: Optional[str]) -> Path:
    """Write ``adapters`` (HF module name -> (A, B); ``score`` -> the value head) in PEFT's format."""
    from safetensors.torch import save_file  # deferred: only reading or writing checkpoints needs it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, targets = {}, set()
    for module, value in adapters.items():
        if module == SCORE_MODULE:
            tensors[f"{PEFT_PREFIX}{SCORE_MODULE}.weight"] = value.contiguous()
            continue
        a, b = value
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        targets.add(module.rsplit(".", 1)[-1])
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM", "r": settings.rank,
        "lora_alpha": settings.alpha, "lora_dropout": settings.dropout, "target_modules": sorted(targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": [SCORE_MODULE] if reward else None, "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConfigError([f"{directory}: no {CONFIG_FILE}; not a PEFT adapter directory"])
    config = readers.read_json(path)
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"{path}: peft_type={config.get('peft_type')!r}; only LORA adapters can be merged")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None):
            problems.append(f"{path}: {key}={config[key]!r} is not plain LoRA; merge it with peft's "
                            "merge_and_unload instead")
    if problems:
        raise ConfigError(problems)
    return config


def merge_peft_adapter(base_dir: str | Path, adapter_dir: str | Path, save_dir: str | Path) -> Path:
    """Write ``base_dir`` (an HF checkpoint) with the LoRA adapter of ``adapter_dir`` merged in, to ``save_dir``
    (one ``model.safetensors``; config.json and the tokenizer files copied as they are)."""
    from safetensors.torch import save_file  # deferred: only reading or writing checkpoints needs it

    base_dir, adapter_dir, save_dir = Path(base_dir), Path(adapter_dir), Path(save_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError([f"{adapter_dir}: no {WEIGHTS_FILE}"])
    base = HFCheckpoint(base_dir)
    rank = int(config["r"])
    scale = float(config["lora_alpha"]) / (rank ** 0.5 if config.get("use_rslora") else rank)
    adapter = readers.load_safetensors(weights)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    problems = []
    for key, tensor in adapter.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                factors.setdefault(name[: -len(f".{part}.weight")] + ".weight", {})[part] = tensor
                break
        else:
            if name in base.names and name.split(".")[0] in (config.get("modules_to_save") or ()):
                replaced[name] = tensor
            else:
                problems.append(f"{weights}: {key!r} is neither a LoRA factor nor a module to save of the base")
    for weight, pair in factors.items():
        if weight not in base.names:
            problems.append(f"{weights}: adapts {weight.removesuffix('.weight')!r}, which {base_dir} does not have; "
                            "is this the adapter's base model?")
        elif set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{weights}: {weight.removesuffix('.weight')!r} has only {sorted(pair)}")
    if problems:
        raise ConfigError(problems)
    state = {}
    for name in sorted(base.names):
        tensor = replaced.get(name, base.get(name))
        if name in factors:
            a, b = factors[name]["lora_A"].float(), factors[name]["lora_B"].float()
            if (b.shape[0], a.shape[1]) != tuple(tensor.shape):
                raise ConfigError([f"{weights}: B A of {name!r} is {(b.shape[0], a.shape[1])}, the base weight "
                                   f"{tuple(tensor.shape)}; is this the adapter's base model?"])
            tensor = (tensor.float() + scale * (b @ a)).to(tensor.dtype)
        state[name] = tensor.contiguous()
    save_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(save_dir / "model.safetensors"), metadata={"format": "pt"})
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(path, save_dir / path.name)
    return save_dir
