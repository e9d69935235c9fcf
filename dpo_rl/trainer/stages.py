"""The stage registry: ``training.stage`` names one :class:`Stage`, which says which roles it places,
checks what only it needs, and runs.

The shipped stages register themselves when their modules are imported
(:mod:`dpo_rl.trainer.online_dpo`: ``ray_online_dpo``; :mod:`dpo_rl.trainer.offline_stages`:
``dpo``, ``reward``, ``sft``); :mod:`dpo_rl.trainer.run` imports them. A new algorithm is one
module with a :class:`Stage` subclass passed to :func:`register_stage` (docs/architecture.md,
"Adding a stage"); nothing else changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from omegaconf import DictConfig

from dpo_rl.config.resolution import ResolvedConfig
from dpo_rl.config.schema import (
    AdapterSettings,
    AlgorithmConfig,
    OptimizerSettings,
    RoleBase,
    TrainingConfig,
)


class Stage(ABC):
    """One training stage: its roles, its own config rules, and how it runs."""

    name: str = ""
    """The ``training.stage`` value that selects it."""
    samples: bool = False
    """The actor samples (online): its data-parallel size counts its training ranks only."""
    key_metrics: tuple[str, ...] = ("loss",)
    """The metrics the progress line (and bar) shows, first to last."""

    @abstractmethod
    def roles(self, training: TrainingConfig, algorithm: AlgorithmConfig) -> tuple[str, ...]:
        """The roles this run places (``actor_rollout``, ``ref``, ``reward``); the first one is trained."""

    def role_settings(self, role: str, placed: tuple[str, ...]) -> tuple[type, ...]:
        """The setting groups (:data:`dpo_rl.config.schema.ROLE_SETTING_GROUPS`) ``role``'s section may set.

        By default every role reads the base settings and the trained role (the first placed) the
        optimizer's and the adapters' too; a key of any other group in a role's section is an error before Ray
        starts."""
        return (RoleBase, OptimizerSettings, AdapterSettings) if role == placed[0] else (RoleBase,)

    def check(self, c: ResolvedConfig, check_paths: bool) -> list[str]:
        """Problems only this stage has with ``c`` (each names key, value, rule and fix)."""
        return []

    @abstractmethod
    def run(self, cfg: DictConfig, c: ResolvedConfig, *, use_ray: bool) -> dict[str, Any]:
        """Place the roles, train, write the run directory; returns the summary."""


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add ``stage`` under its name (a name may be registered once)."""
    if not stage.name:
        raise ValueError(f"{type(stage).__name__} has no name")
    if stage.name in STAGES and type(STAGES[stage.name]) is not type(stage):
        raise ValueError(f"a stage named {stage.name!r} is registered already ({type(STAGES[stage.name]).__name__})")
    STAGES[stage.name] = stage
    return stage


def unregister_stage(name: str) -> None:
    """Remove a stage (tests that register toy stages clean up with it)."""
    STAGES.pop(name, None)
