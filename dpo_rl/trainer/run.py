"""``run(cfg)``: resolve the config for its stage, then let the stage place its roles and train.

    c = resolve(cfg)                      # every problem before Ray starts (ConfigError)
    plan_run_directory(c)                 # never overwrite a finished run; nothing to do (NothingToDo)
    STAGES[c.stage].run(cfg, c)           # groups -> TrainingLoop.fit -> run directory

The shipped stages register themselves on import (below); see :mod:`dpo_rl.trainer.stages`.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from dpo_rl.config import resolution
from dpo_rl.config.resolution import ResolvedConfig
from dpo_rl.trainer import offline_stages, online_dpo  # noqa: F401  (register the shipped stages)
from dpo_rl.trainer.common import config_yaml
from dpo_rl.trainer.run_directory import clear_previous_run, plan_run_directory
from dpo_rl.trainer.stages import STAGES

logger = logging.getLogger("dpo_rl")


def resolve(cfg: DictConfig, *, check_paths: bool = True) -> ResolvedConfig:
    """Validate ``cfg`` for the registered stage it names (:func:`dpo_rl.config.resolution.resolve_config`)."""
    return resolution.resolve_config(cfg, STAGES, check_paths=check_paths)


def run(cfg: DictConfig, *, use_ray: bool = True) -> dict[str, Any]:
    """Validate ``cfg`` and its output directory (:mod:`dpo_rl.trainer.run_directory`), then run its stage;
    returns the final summary (also in summary.json)."""
    c = resolve(cfg)
    if plan_run_directory(c, config_yaml(cfg)).clear_previous:
        clear_previous_run(c)
    for message in c.unused:
        logger.warning("unused config key: %s", message)
    for note in c.notes:
        logger.warning("%s", note)
    return STAGES[c.stage].run(cfg, c, use_ray=use_ray)
