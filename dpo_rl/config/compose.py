"""Compose a trainer config with Hydra's compose API (tests, benchmarks, tools).

``ray_gpt.py`` uses ``@hydra.main``; this gives the same composition without taking over
the process (no run directory, no logging set-up). Both make every documented key settable as
written (:mod:`dpo_rl.config.overrides`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "rlxf"


def compose(config_name: str, overrides: Sequence[str] = (), config_dir: Optional[str | Path] = None) -> DictConfig:
    """The composed config ``config_name`` (no ``.yaml``) from ``config_dir`` (default configs/rlxf)."""
    from hydra import compose as hydra_compose  # deferred: Hydra is needed only to compose
    from hydra import initialize_config_dir  # deferred: Hydra is needed only to compose

    from dpo_rl.config.overrides import settable_as_written

    directory = Path(config_dir or CONFIG_DIR).resolve()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=settable_as_written(overrides))
