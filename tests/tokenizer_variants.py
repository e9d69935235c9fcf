"""The tiny world's tokenizer and variants of it, for tests of "is this the same tokenizer?".

:func:`build_variants` writes, under ``root``:

* ``base``:  the tiny world's tokenizer (``examples.tiny_world.build.build_tokenizer``);
* ``copy``:  a byte-identical copy of ``base`` at another path (the same tokenizer);
* ``extra``: ``base`` with one added token, ``<extra>``, at the end of the vocabulary;
* ``eos``:   ``base`` with ``<pad>`` as its EOS token (an other ``eos_token_id``, same vocabulary).
"""

from __future__ import annotations

import shutil
from pathlib import Path

EXTRA_TOKEN = "<extra>"


def build_variants(root: Path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from examples.tiny_world.build import build_tokenizer

    paths = {name: root / name for name in ("base", "copy", "extra", "eos")}
    build_tokenizer(paths["base"])
    shutil.copytree(paths["base"], paths["copy"])
    extra = AutoTokenizer.from_pretrained(paths["base"], local_files_only=True)
    assert extra.add_tokens([EXTRA_TOKEN]) == 1
    extra.save_pretrained(paths["extra"])
    eos = AutoTokenizer.from_pretrained(paths["base"], local_files_only=True)
    eos.eos_token = "<pad>"
    eos.save_pretrained(paths["eos"])
    return paths
