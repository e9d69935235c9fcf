"""Command-line overrides: every key the schema documents is settable as written.

Hydra refuses ``key=value`` for a key the composed YAML lacks (it wants ``+key=value``), yet the
docs list every schema key, most of which a shipped config leaves at its default. So before Hydra
composes, :func:`settable_as_written` turns ``key=value`` for a documented key into
``++key=value`` (set it, or add it when the YAML lacks it). Anything else is left to Hydra: a
typo'd key still fails there, and explicit ``+``/``++``/``~`` overrides pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Optional, Sequence

from dpo_rl.config.schema import (
    MOVED_KEYS,
    AlgorithmConfig,
    DataConfig,
    RayConfig,
    ResourcePoolConfig,
    RoleConfig,
    TrainingConfig,
)

#: Config section -> the schema of its keys.
SECTION_SCHEMAS = {
    "training": TrainingConfig,
    "actor_rollout_ref.actor_rollout": RoleConfig,
    "actor_rollout_ref.ref": RoleConfig,
    "reward": RoleConfig,
    "algorithm": AlgorithmConfig,
    "data": DataConfig,
    "resource_pool": ResourcePoolConfig,
    "ray": RayConfig,
}
_PLAIN_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=")


def _keys(prefix: str, cls: type) -> list[str]:
    """``prefix.field`` for every field of ``cls``, and ``prefix.field.sub`` for a nested section (``lora``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out.append(f"{prefix}.{f.name}")
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(f"{prefix}.{f.name}", hints[f.name])
    return out


def documented_keys() -> frozenset[str]:
    """Every ``section.field`` (and ``section.field.sub`` of a nested section) the schema documents
    (docs/config_reference.md)."""
    return frozenset(key for section, cls in SECTION_SCHEMAS.items() for key in _keys(section, cls))


def settable_as_written(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with each plain ``key=value`` of a documented key made ``++key=value``."""
    known = documented_keys()
    out = []
    for item in overrides:
        match = _PLAIN_OVERRIDE.match(item)
        out.append(f"++{item}" if match and match.group(1) in known else item)
    return out


_COULD_NOT_OVERRIDE = re.compile(r"Could not (?:override|append to) '([\w.]+)'|Key '([\w.]+)' (?:is )?not in")


def did_you_mean(message: str) -> Optional[str]:
    """For Hydra's "Could not override 'key'" on a key the schema does not document, what to say instead (Hydra's
    "use +key" would only fail validation): that the key is unknown, and the documented key it was probably meant
    to be, or for a replaced key (:data:`~dpo_rl.config.schema.MOVED_KEYS`) what to write instead. ``None`` for any
    other message."""
    import difflib

    match = _COULD_NOT_OVERRIDE.search(message)
    key = match and (match.group(1) or match.group(2))
    if not key or key in documented_keys():
        return None
    if key in MOVED_KEYS:
        return MOVED_KEYS[key]
    close = difflib.get_close_matches(key, sorted(documented_keys()), n=1, cutoff=0.8)
    return (f"{key} is not a documented key (docs/config_reference.md)" +
            (f"; did you mean {close[0]}?" if close else "; check its section and spelling"))
