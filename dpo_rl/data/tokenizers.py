"""Tokenizers come from local directories only: never the Hub, and a missing one is a clear error.

Every tokenizer the project loads (the trainers, the reward worker's re-tokenizing, ``preprocess_data.py``)
goes through :func:`load_local_tokenizer`, which checks the directory first and passes
``local_files_only=True``, so a relative name that happens to look like a Hub repo id is never
fetched and a typo names the setting instead of failing inside transformers.
"""

from __future__ import annotations

from pathlib import Path

from dpo_rl.errors import ConfigError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_dir(path: object, key: str) -> list[str]:
    """Problems with ``path`` (the value of setting ``key``) as a local tokenizer directory."""
    if not path:
        return [f"{key} is not set; give a local HF tokenizer directory"]
    directory = Path(str(path))
    if not directory.is_dir():
        return [f"{key}={str(path)!r} is not a local directory; give the directory of an HF tokenizer "
                "(tokenizers and models are never downloaded)"]
    if not any((directory / name).is_file() for name in TOKENIZER_MARKERS):
        return [f"{key}={str(path)!r} holds no tokenizer files (none of {', '.join(TOKENIZER_MARKERS)})"]
    return []


def load_local_tokenizer(path: object, key: str):
    """``AutoTokenizer`` from the local directory ``path`` (setting ``key``), ``local_files_only=True``."""
    problems = check_tokenizer_dir(path, key)
    if problems:
        raise ConfigError(problems)
    from transformers import AutoTokenizer  # deferred: transformers is heavy to import

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError([f"{key}={str(path)!r}: transformers could not load a tokenizer from it: "
                           f"{str(err).strip().splitlines()[0]}"]) from None
