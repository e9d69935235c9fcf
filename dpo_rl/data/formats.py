"""The on-disk format of a preprocessed dataset, shared by its writer and its readers.

``preprocess_data.py`` (:mod:`dpo_rl.data.preprocess`) writes, for an output prefix ``P``, one
Megatron indexed dataset per field (``P_<field>.bin`` / ``.idx``) and then ``P_meta.json`` (the
handler, its kind, the fields, the template and tokenizer, the counts). The meta file is written
last, so its presence marks a complete dataset. The readers (:mod:`dpo_rl.data.indexed`,
:mod:`dpo_rl.data.prompts`) and the config checks read it through this module, never through the
writer's pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_SUFFIX = "_meta.json"


class InputError(ValueError):
    """A problem with the input, naming file, row and column where they apply."""


def meta_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + META_SUFFIX)


def is_preprocessed(prefix: str | Path) -> bool:
    """True when ``prefix`` is the prefix of a (complete) dataset written by preprocess_data.py."""
    return meta_path(prefix).is_file()


def read_meta(prefix: str | Path) -> dict[str, Any]:
    """The meta record of a preprocessed prefix."""
    return json.loads(meta_path(prefix).read_text())


def preprocessed_kind(prefix: str | Path) -> str:
    """The handler kind (prompt, sft, pairwise, reward) recorded in a preprocessed prefix's meta file."""
    return read_meta(prefix)["kind"]
