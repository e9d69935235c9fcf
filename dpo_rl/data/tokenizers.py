"""Tokenizers come from local directories only: never the Hub, and a missing one is a clear error.

Every tokenizer the project loads (the trainers, the reward worker's re-tokenizing, ``preprocess_data.py``)
goes through :func:`load_local_tokenizer`, which checks the directory first and passes
``local_files_only=True``, so a relative name that happens to look like a Hub repo id is never
fetched and a typo names the setting instead of failing inside transformers.

Whether two settings name *the same tokenizer* is decided by :func:`tokenizer_dirs_difference`, never by
comparing path strings: a byte-identical copy, a trailing slash or a ``./`` prefix is the same tokenizer.
What counts is what token ids mean (:class:`TokenizerFingerprint`): the vocabulary and the special ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

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


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_EXAMPLES = 3  # tokens quoted per kind of difference


@dataclass(frozen=True)
class TokenizerFingerprint:
    """What a model scoring a tokenizer's ids depends on."""

    vocab: Mapping[str, int]
    """Token -> id, added tokens included."""
    special_ids: Mapping[str, Optional[int]]
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``unk_token_id`` (``None`` where unset)."""


def tokenizer_fingerprint(tokenizer) -> TokenizerFingerprint:
    """The vocabulary (``get_vocab()``, added tokens included) and special ids of an HF tokenizer."""
    return TokenizerFingerprint(dict(tokenizer.get_vocab()),
                                {name: getattr(tokenizer, name, None) for name in SPECIAL_IDS})


def _quoted(tokens: list[str], ids: Mapping[str, int]) -> str:
    shown = ", ".join(f"{t!r}={ids[t]}" for t in tokens[:_EXAMPLES])
    return shown + (f", ... ({len(tokens)} in all)" if len(tokens) > _EXAMPLES else "")


def tokenizer_difference(a: TokenizerFingerprint, b: TokenizerFingerprint,
                         names: tuple[str, str] = ("the first", "the second")) -> Optional[str]:
    """``None`` when ``a`` and ``b`` give every token the same id and have the same special ids; else what
    differs, values in the order "a vs b" (e.g. ``vocabulary sizes 1025 vs 1024; only in the first: '<x>'=1024``);
    ``names`` label the tokenizers in the text."""
    diffs = []
    if len(a.vocab) != len(b.vocab):
        diffs.append(f"vocabulary sizes {len(a.vocab)} vs {len(b.vocab)}")
    for name, mine, other in ((names[0], a.vocab, b.vocab), (names[1], b.vocab, a.vocab)):
        only = sorted(set(mine) - set(other), key=mine.__getitem__)
        if only:
            diffs.append(f"only in {name}: {_quoted(only, mine)}")
    moved = sorted((t for t in set(a.vocab) & set(b.vocab) if a.vocab[t] != b.vocab[t]), key=a.vocab.__getitem__)
    if moved:
        shown = ", ".join(f"{t!r} {a.vocab[t]} vs {b.vocab[t]}" for t in moved[:_EXAMPLES])
        diffs.append(f"{len(moved)} token(s) with other ids: {shown}" + (", ..." if len(moved) > _EXAMPLES else ""))
    for name in SPECIAL_IDS:
        if a.special_ids.get(name) != b.special_ids.get(name):
            diffs.append(f"{name} {a.special_ids.get(name)} vs {b.special_ids.get(name)}")
    return "; ".join(diffs) or None


def same_directory(a: object, b: object) -> bool:
    """``a`` and ``b`` resolve to one directory (``tok``, ``tok/`` and ``./tok`` do)."""
    return Path(str(a)).resolve() == Path(str(b)).resolve()


def tokenizer_dirs_difference(a: object, a_key: str, b: object, b_key: str,
                              names: tuple[str, str] = ("the first", "the second")) -> Optional[str]:
    """What differs between the tokenizers in directories ``a`` (setting ``a_key``) and ``b`` (``b_key``), as
    :func:`tokenizer_difference` says; ``None`` when they are the same tokenizer. Paths that resolve to one
    directory are the same without loading anything; otherwise both are loaded (locally) and compared.
    Raises :class:`ConfigError` when one cannot be loaded."""
    if same_directory(a, b):
        return None
    return tokenizer_difference(tokenizer_fingerprint(load_local_tokenizer(a, a_key)),
                                tokenizer_fingerprint(load_local_tokenizer(b, b_key)), names)
