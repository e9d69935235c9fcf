"""Adapters: public preference datasets' real column layouts -> canonical alpaca-style rows.

Each adapter turns one row of its dataset into ``{"prompt", "system", "history",
"chosen", "rejected"}`` (canonical keys, see :mod:`dpo_rl.data.handlers`), so the Alpaca
handlers take it from there (``--dataset-adapter NAME`` with an ``AlpacaStyle*`` handler).
A row that does not fit the layout is a :class:`RowError` naming the column.

| adapter | dataset | layout |
|---|---|---|
| ``trl_style`` | trl-internal-testing/descriptiveness-sentiment-trl-style (seed 001) | ``prompt`` str; ``chosen``/``rejected`` message lists |
| ``hh_rlhf`` | Anthropic/hh-rlhf | ``chosen``/``rejected`` full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts |
| ``hh_rlhf_cn`` | hh-rlhf-cn (ms-swift, seed 002) | ``context`` [{role, text}]; ``chosen``/``rejected`` {role, text} |
| ``ultrafeedback_binarized`` | HuggingFaceH4/ultrafeedback_binarized | ``prompt``; ``chosen``/``rejected`` message lists |
| ``orca_dpo_pairs`` | Intel/orca_dpo_pairs | ``system``, ``question``, ``chosen``, ``rejected`` strings |
| ``nectar`` | berkeley-nest/Nectar | ``prompt`` transcript; ``answers`` [{answer, model, rank}]: rank 1 vs the worst rank |
| ``dpo_en_zh`` | DPO-En-Zh-20k (seed 003, handbook parquet) | ``prompt``; ``chosen``/``rejected`` message lists |
"""

from __future__ import annotations

import re
from typing import Any, Callable

from dpo_rl.data.handlers import RowError, history_pairs

Canonical = dict[str, Any]


def _require(row: dict[str, Any], column: str, kind: type) -> Any:
    if column not in row or row[column] is None:
        raise RowError(column, "is missing from this row (the adapter expects the dataset's real layout)")
    value = row[column]
    if not isinstance(value, kind):
        raise RowError(column, f"must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _last_assistant(messages: Any, column: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise RowError(column, "must be a non-empty list of {role, content} messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
    raise RowError(column, "has no assistant message")


def _history_of(messages: list) -> list[tuple[str, str]]:
    """(user, assistant) pairs before the final user turn and answer of a message list."""
    turns = [(m.get("role"), m.get("content")) for m in messages if isinstance(m, dict)]
    return history_pairs(turns[:-2])


def _message_lists(row: dict[str, Any]) -> Canonical:
    prompt = _require(row, "prompt", str)
    chosen = _require(row, "chosen", list)
    return {"prompt": prompt, "history": _history_of(chosen),
            "chosen": _last_assistant(chosen, "chosen"),
            "rejected": _last_assistant(_require(row, "rejected", list), "rejected")}


_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_transcript(text: str, column: str) -> list[tuple[str, str]]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." -> [(role, text), ...] (roles user / assistant)."""
    parts = _TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(column, "is not a \\n\\nHuman: / \\n\\nAssistant: transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _from_turns(turns: list[tuple[str, str]], column: str) -> Canonical:
    """Prompt (last user turn) and history from alternating turns."""
    if not turns or turns[-1][0] != "user":
        raise RowError(column, "the prompt must end with a Human turn")
    return {"prompt": turns[-1][1], "history": history_pairs(turns[:-1])}


def hh_rlhf(row: dict[str, Any]) -> Canonical:
    chosen = parse_transcript(_require(row, "chosen", str), "chosen")
    rejected = parse_transcript(_require(row, "rejected", str), "rejected")
    if chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant":
        raise RowError("chosen", "both transcripts must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "chosen and rejected transcripts do not share the same conversation before the answer")
    return {**_from_turns(chosen[:-1], "chosen"), "chosen": chosen[-1][1], "rejected": rejected[-1][1]}


def hh_rlhf_cn(row: dict[str, Any]) -> Canonical:
    context = _require(row, "context", list)
    roles = {"human": "user", "assistant": "assistant"}
    turns = []
    for turn in context:
        if not isinstance(turn, dict) or turn.get("role") not in roles or not isinstance(turn.get("text"), str):
            raise RowError("context", "each turn must be {role: human|assistant, text}")
        turns.append((roles[turn["role"]], turn["text"]))
    out = _from_turns(turns, "context")
    for side in ("chosen", "rejected"):
        value = _require(row, side, dict)
        if not isinstance(value.get("text"), str):
            raise RowError(side, "must be {role, text}")
        out[side] = value["text"]
    return out


def orca_dpo_pairs(row: dict[str, Any]) -> Canonical:
    return {"system": row.get("system") or "", "prompt": _require(row, "question", str),
            "chosen": _require(row, "chosen", str), "rejected": _require(row, "rejected", str)}


def nectar(row: dict[str, Any]) -> Canonical:
    turns = parse_transcript(_require(row, "prompt", str), "prompt")
    if turns and turns[-1][0] == "assistant" and not turns[-1][1]:
        turns = turns[:-1]  # Nectar prompts end with an empty "Assistant:" cue
    answers = _require(row, "answers", list)
    ranked = [a for a in answers if isinstance(a, dict) and isinstance(a.get("answer"), str)
              and isinstance(a.get("rank"), (int, float))]
    if len(ranked) < 2:
        raise RowError("answers", "needs at least two {answer, rank} entries")
    ranked.sort(key=lambda a: a["rank"])
    return {**_from_turns(turns, "prompt"), "chosen": ranked[0]["answer"], "rejected": ranked[-1]["answer"]}


ADAPTERS: dict[str, Callable[[dict[str, Any]], Canonical]] = {
    "trl_style": _message_lists,
    "hh_rlhf": hh_rlhf,
    "hh_rlhf_cn": hh_rlhf_cn,
    "ultrafeedback_binarized": _message_lists,
    "orca_dpo_pairs": orca_dpo_pairs,
    "nectar": nectar,
    "dpo_en_zh": _message_lists,
}


def get_adapter(name: str) -> Callable[[dict[str, Any]], Canonical]:
    if name not in ADAPTERS:
        raise ValueError(f"--dataset-adapter {name!r} is unknown; use one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]
