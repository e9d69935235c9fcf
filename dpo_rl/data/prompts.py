"""Prompts for online DPO: a JSONL file tokenized at start-up, or a dataset preprocessed by
``preprocess_data.py`` (prompt handler); sampled in seeded epochs.

Each line is a JSON object whose ``prompt_key`` field holds the prompt text. When the
tokenizer has a chat template the prompt is wrapped as one user turn with the generation
prompt appended; otherwise the text is encoded as is. Every bad line (invalid JSON, a
missing or empty prompt, a prompt over ``max_prompt_length`` tokens) is an error naming
file and line, reported before any worker starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dpo_rl import seeds
from dpo_rl.batch import Batch, left_pad
from dpo_rl.data.formats import is_preprocessed
from dpo_rl.data.indexed import TokenizedDataset
from dpo_rl.errors import ConfigError

#: The setting that bounds prompt length (the data layer cannot import the config's section names).
MAX_PROMPT_LENGTH_KEY = "actor_rollout_ref.actor_rollout.max_prompt_length"


@dataclass
class PromptSet:
    """Prompt texts and their token ids."""

    texts: list[str]
    token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


def encode_prompt(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer.encode(text, add_special_tokens=True)


def load_prompts(path: str | Path, tokenizer, *, prompt_key: str, max_prompt_length: int) -> PromptSet:
    """Read and tokenize a JSONL prompt file; all problems reported at once (first 20)."""
    path = Path(path)
    texts, ids, problems = [], [], []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{line_no}: invalid JSON ({exc.msg}); each line must be one JSON object")
                continue
            text = row.get(prompt_key) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{path}:{line_no}: field {prompt_key!r} is missing or empty; set data.prompt_key "
                                "to the column holding the prompt")
                continue
            tokens = encode_prompt(tokenizer, text)
            if len(tokens) > max_prompt_length:
                problems.append(f"{path}:{line_no}: prompt has {len(tokens)} tokens, over {MAX_PROMPT_LENGTH_KEY}="
                                f"{max_prompt_length}; shorten it or raise {MAX_PROMPT_LENGTH_KEY}")
                continue
            texts.append(text)
            ids.append(tokens)
    if not texts and not problems:
        problems.append(f"{path}: no prompts found")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConfigError(shown)
    return PromptSet(texts, ids)


def load_prompt_source(path: str | Path, tokenizer, *, prompt_key: str, max_prompt_length: int) -> PromptSet:
    """Prompts from a JSONL file, or from a preprocessed dataset prefix (its ``prompt`` field)."""
    if not is_preprocessed(path):
        return load_prompts(path, tokenizer, prompt_key=prompt_key, max_prompt_length=max_prompt_length)
    data = TokenizedDataset(path)
    if data.kind != "prompt":
        raise ConfigError([f"{path}: a {data.kind!r} dataset (handler {data.meta['handler']}); online DPO needs "
                           "prompts: preprocess with --handler-name PPOAlpacaStyleInstructionHandler"])
    ids = [data[i]["prompt"].tolist() for i in range(len(data))]
    too_long = [i for i, t in enumerate(ids) if len(t) > max_prompt_length]
    if too_long:
        raise ConfigError([f"{path}: {len(too_long)} prompts exceed {MAX_PROMPT_LENGTH_KEY}={max_prompt_length} "
                           f"(first: example {too_long[0]}, {len(ids[too_long[0]])} tokens); re-run preprocess_data.py "
                           f"with --max-prompt-length or raise {MAX_PROMPT_LENGTH_KEY}"])
    return PromptSet([tokenizer.decode(t) for t in ids], ids)


class PromptSampler:
    """Draws prompt indices in seeded epochs (reshuffled each epoch when ``shuffle``)."""

    def __init__(self, size: int, *, seed: int, shuffle: bool) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.consumed = 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(seeds.epoch_order(self.seed, epoch)))

    def next(self, count: int) -> list[int]:
        """The next ``count`` indices, wrapping into new epochs."""
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.consumed, self.size)
            take = min(count - len(out), self.size - offset)
            out.extend(self._order(epoch)[offset : offset + take].tolist())
            self.consumed += take
        return out


def prompt_batch(prompts: PromptSet, indices: Sequence[int], repeats: int, pad_token_id: int) -> Batch:
    """Rows ``prompt_ids``/``prompt_mask`` [len(indices) * repeats, P] left-padded, and ``prompt_index``.

    Each prompt's ``repeats`` rows are adjacent; ``prompt_index`` numbers prompts 0..B-1.
    """
    token_lists = [prompts.token_ids[i] for i in indices]
    ids, mask = left_pad([tokens for tokens in token_lists for _ in range(repeats)], pad_token_id)
    index = torch.arange(len(token_lists)).repeat_interleave(repeats)
    return Batch({"prompt_ids": ids, "prompt_mask": mask, "prompt_index": index})
