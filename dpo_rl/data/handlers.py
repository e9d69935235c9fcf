"""Handlers: one raw dataset row -> a conversation and the responses to tokenize.

Rows are read through ``map_keys`` (canonical name -> the dataset's column; ``""`` means the
dataset has no such column). A canonical name that ``map_keys`` leaves out is read from its
default column (:data:`DEFAULT_COLUMNS`). Canonical names:

* alpaca style: ``prompt`` (default column ``instruction``), ``query`` (``input``, appended to
  the instruction on a new line), ``response`` (``output``), ``system``, ``history``
  ([[query, answer], ...]), ``chosen``, ``rejected`` -- the defaults are the columns
  LLaMA-Factory's and MindSpeed-LLM's alpaca format uses, so such a file needs no
  ``--map-keys``;
* sharegpt style: ``messages`` (a list of ``{"from"|"role": ..., "value"|"content": ...}``
  turns ending with the user's), ``system``, ``chosen``/``rejected`` (a turn or a string),
  ``response`` (for SFT: the final assistant turn may also close ``messages``).

Each handler has a kind: ``prompt`` (online DPO prompts), ``sft``, ``pairwise`` (DPO) or
``reward`` (reward-model pairs), and the fields it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dpo_rl.data.templates import Conversation

CANONICAL_KEYS = ("prompt", "query", "response", "system", "history", "chosen", "rejected", "messages")
#: Rows already under the canonical names (what dataset adapters yield).
CANONICAL_COLUMNS = {key: key for key in CANONICAL_KEYS}
#: Style -> where each canonical name is read from when ``--map-keys`` does not say. Alpaca:
#: LLaMA-Factory's columns (``instruction``, ``input``, ``output``, ``system``, ``history``,
#: ``chosen``, ``rejected``), as in its DPO tutorial and MindSpeed-LLM's handlers.
DEFAULT_COLUMNS = {
    "alpaca": {**CANONICAL_COLUMNS, "prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": CANONICAL_COLUMNS,
}

FIELDS_BY_KIND = {
    "prompt": ("prompt",),
    "sft": ("prompt", "response"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "reward": ("prompt", "chosen", "rejected"),
}


class RowError(ValueError):
    """A bad row: names the column and what is wrong (the reader adds file and row)."""

    def __init__(self, column: str, message: str) -> None:
        self.column, self.message = column, message
        super().__init__(f"column {column!r}: {message}")


@dataclass(frozen=True)
class Handler:
    """How rows of one dataset shape become a conversation and responses."""

    name: str
    kind: str
    style: str  # "alpaca" or "sharegpt"

    @property
    def fields(self) -> tuple[str, ...]:
        return FIELDS_BY_KIND[self.kind]

    def parse(self, row: dict[str, Any], map_keys: dict[str, str]) -> tuple[Conversation, dict[str, str]]:
        """(conversation, {field: response text}) for one row; RowError when it is malformed.

        ``map_keys`` overrides :data:`DEFAULT_COLUMNS` of this handler's style key by key."""
        get = _Getter(row, {**DEFAULT_COLUMNS[self.style], **map_keys})
        conv = self._conversation(get)
        responses: dict[str, str] = {}
        if self.kind == "sft":
            responses["response"] = get.text("response", required=True)
        elif self.kind in ("pairwise", "reward"):
            for side in ("chosen", "rejected"):
                responses[side] = _turn_text(get.value(side, required=True), get.column(side))
                if not responses[side].strip():
                    raise RowError(get.column(side), f"{side} response is empty")
        return conv, responses

    def _conversation(self, get: "_Getter") -> Conversation:
        system = get.text("system")
        if self.style == "alpaca":
            prompt = get.text("prompt", required=True)
            query = get.text("query")
            text = f"{prompt}\n{query}" if query else prompt
            if not text.strip():
                raise RowError(get.column("prompt"), "prompt is empty")
            history = get.value("history") or []
            if not isinstance(history, list) or not all(
                isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
            ):
                raise RowError(get.column("history"), "history must be a list of [query, answer] string pairs")
            return Conversation(text, system, [tuple(t) for t in history])
        turns = get.value("messages", required=True)
        if not isinstance(turns, list) or not turns:
            raise RowError(get.column("messages"), "messages must be a non-empty list of turns")
        parsed = [_role_and_text(t, get.column("messages")) for t in turns]
        if parsed and parsed[0][0] == "system":
            system = system or parsed[0][1]
            parsed = parsed[1:]
        if self.kind == "sft" and parsed and parsed[-1][0] == "assistant" and not get.has("response"):
            get.extra_response = parsed[-1][1]
            parsed = parsed[:-1]
        if not parsed or parsed[-1][0] != "user":
            raise RowError(get.column("messages"), "the last turn before the answer must be the user's")
        return Conversation(parsed[-1][1], system, history_pairs(parsed[:-1]))


def history_pairs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(user, assistant) pairs from alternating (role, text) turns, in order."""
    history, pending = [], None
    for role, text in turns:
        if role == "user":
            pending = text
        elif role == "assistant" and pending is not None:
            history.append((pending, text))
            pending = None
    return history


class _Getter:
    """Reads canonical keys of a row through map_keys."""

    def __init__(self, row: dict[str, Any], map_keys: dict[str, str]) -> None:
        self.row, self.map_keys = row, map_keys
        self.extra_response: Optional[str] = None

    def column(self, key: str) -> str:
        return self.map_keys.get(key, key)

    def has(self, key: str) -> bool:
        column = self.column(key)
        return bool(column) and self.row.get(column) is not None

    def value(self, key: str, required: bool = False) -> Any:
        column = self.column(key)
        if not column or column not in self.row or self.row[column] is None:
            if key == "response" and self.extra_response is not None:
                return self.extra_response
            if required:
                raise RowError(column or key, "is missing; map it with --map-keys "
                               f"'{{\"{key}\": \"<column>\"}}'")
            return None
        return self.row[column]

    def text(self, key: str, required: bool = False) -> str:
        value = self.value(key, required)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise RowError(self.column(key), f"must be a string, got {type(value).__name__}")
        return value


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _role_and_text(turn: Any, column: str) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise RowError(column, f"each turn must be an object with from/value (or role/content), got {turn!r:.60}")
    role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
    text = turn.get("value", turn.get("content"))
    if role is None or not isinstance(text, str):
        raise RowError(column, f"turn {turn!r:.80} needs a known role (human/gpt/user/assistant/system) and text")
    return role, text


def _turn_text(value: Any, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _role_and_text(value, column)[1]
    raise RowError(column, f"must be a string or a turn object, got {type(value).__name__}")


HANDLERS: dict[str, Handler] = {}
for _handler in (
    Handler("PPOAlpacaStyleInstructionHandler", "prompt", "alpaca"),
    Handler("AlpacaStylePromptHandler", "prompt", "alpaca"),
    Handler("SharegptStylePromptHandler", "prompt", "sharegpt"),
    Handler("AlpacaStyleInstructionHandler", "sft", "alpaca"),
    Handler("SharegptStyleInstructionHandler", "sft", "sharegpt"),
    Handler("AlpacaStylePairwiseHandler", "pairwise", "alpaca"),
    Handler("SharegptStylePairwiseHandler", "pairwise", "sharegpt"),
    Handler("AlpacaStyleRewardHandler", "reward", "alpaca"),
    Handler("SharegptStyleRewardHandler", "reward", "sharegpt"),
):
    HANDLERS[_handler.name] = _handler


def get_handler(name: str) -> Handler:
    if name not in HANDLERS:
        raise ValueError(f"--handler-name {name!r} is unknown; use one of {sorted(HANDLERS)}")
    return HANDLERS[name]
