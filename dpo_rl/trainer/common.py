"""What every stage's set-up uses: the tokenizer and its special ids, the run directory, the metrics tracker,
HF export."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dpo_rl.checkpoint.convert import TOKENIZER_FILES
from dpo_rl.config.resolution import ROLE_SECTIONS, ResolvedConfig
from dpo_rl.data.tokenizers import load_local_tokenizer
from dpo_rl.errors import ConfigError
from dpo_rl.tracking import MetricsTracker

logger = logging.getLogger("dpo_rl")


def logprob_options(ld_alpha: Optional[float]) -> dict[str, Any]:
    """What a ``sequence_logprobs`` call needs for the objective's summed log-probs: LD-DPO's ``ld_alpha``."""
    return {} if ld_alpha is None else {"ld_alpha": ld_alpha}


def load_tokenizer(path: str, key: str = "training.tokenizer_name_or_path"):
    """The tokenizer of setting ``key`` (a local directory; never the Hub); ``key`` names it in errors."""
    return load_local_tokenizer(path, key)


def tokenizer_key(role: str) -> str:
    """The full key of a role's tokenizer setting, for messages."""
    return f"{ROLE_SECTIONS[role]}.tokenizer_name_or_path"


def special_ids(tokenizer, *, require_eos: bool = True) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a tokenizer; pad falls back to EOS, then 0.

    Generation needs EOS (``require_eos``); the offline stages only pad.
    """
    eos = tokenizer.eos_token_id
    if eos is None and require_eos:
        raise ConfigError(["the actor tokenizer has no eos_token; generation could never stop"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return ((int(eos),) if eos is not None else ()), int(pad)


def config_yaml(cfg: DictConfig) -> str:
    """The run's config as its ``config.yaml`` holds it (interpolations resolved)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def prepare_output(cfg: DictConfig, c: ResolvedConfig) -> Path:
    out = Path(c.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml(cfg))
    logger.info("resolved config:\n%s", config_yaml(cfg))
    return out


def metrics_tracker(cfg: DictConfig, c: ResolvedConfig, out: Path, key_metrics: tuple[str, ...]) -> MetricsTracker:
    """The stage's tracker: the jsonl files and the trackers ``training.report_to`` lists (W&B gets the resolved
    config); the progress line shows ``key_metrics``."""
    t = c.training
    return MetricsTracker(out, t.train_iters, log_interval=t.log_interval, report_to=t.report_to,
                          key_metrics=key_metrics, run_config=OmegaConf.to_container(cfg, resolve=True),
                          wandb_project=t.wandb_project, run_name=t.run_name, label=c.stage)


def export_model(c: ResolvedConfig, group, directory: Path, role: str, tokenizer) -> dict[str, str]:
    """A trained role's model as an HF checkpoint (safetensors, config.json, tokenizer files); with LoRA the
    adapters merged in, and the adapters alone in PEFT's format beside it (``<directory>_adapter``). Returns
    ``{"<name>": directory}`` and ``{"<name>_adapter": ...}`` (name = the directory's)."""
    rc = c.roles[role]
    adapter_dir = Path(f"{directory}_adapter") if rc.lora.enabled else None
    group.save_hf(str(directory), {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                   "pad_token_id": tokenizer.pad_token_id},
                  str(adapter_dir) if adapter_dir else None, rc.load)
    tokenizer_dir = Path(rc.tokenizer_name_or_path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, directory / name)
    exported = {directory.name: str(directory)}
    if adapter_dir is not None:
        exported[adapter_dir.name] = str(adapter_dir)
        logger.info("LoRA adapters written in PEFT's format to %s (base: %s); the merged model to %s", adapter_dir,
                    rc.load, directory)
    return exported
