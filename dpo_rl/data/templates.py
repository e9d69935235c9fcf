"""Chat templates: a conversation -> prompt text (ending where the model answers) + response text.

A :class:`Conversation` holds an optional system prompt, earlier ``(query, answer)`` turns
and the final query. ``render_prompt`` gives the text the model is conditioned on, ending
with the assistant header; ``render_response`` gives the answer with the template's
end-of-turn marker. Prompt and response are tokenized separately, so the boundary the
trainers mask at is exact.

Templates: ``llama3``, ``chatml`` (seed 004's default), ``qwen`` (Qwen2.5: chatml with its
default system prompt), ``alpaca``, ``empty``, and ``auto`` (the tokenizer's own chat
template, see :func:`auto_prompt_and_response_ids`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Conversation:
    """One example's dialogue up to the answer being trained or generated."""

    query: str
    system: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Template:
    """Text pieces of a chat format."""

    name: str
    prefix: str
    system: str
    user: str
    assistant: str
    end_of_turn: str
    default_system: str = ""
    append_eos: bool = False
    """Append the tokenizer's EOS id after the response (formats with no end-of-turn token)."""

    def render_prompt(self, conv: Conversation) -> str:
        system = conv.system or self.default_system
        text = self.prefix + (self.system.format(content=system) if system else "")
        for query, answer in conv.history:
            text += self.user.format(content=query) + self.assistant + answer + self.end_of_turn
        return text + self.user.format(content=conv.query) + self.assistant

    def render_response(self, response: str) -> str:
        return response + self.end_of_turn


LLAMA3 = Template(
    name="llama3",
    prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
)
CHATML = Template(
    name="chatml",
    prefix="",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>\n",
)
QWEN = dataclasses.replace(
    CHATML, name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
)
ALPACA = Template(
    name="alpaca",
    prefix="",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant="### Response:\n",
    end_of_turn="\n\n",
    default_system=("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request."),
    append_eos=True,
)
EMPTY = Template(name="empty", prefix="", system="{content}\n", user="{content}", assistant="", end_of_turn="",
                 append_eos=True)

TEMPLATES: dict[str, Template] = {t.name: t for t in (LLAMA3, CHATML, QWEN, ALPACA, EMPTY)}
TEMPLATE_NAMES = tuple(TEMPLATES) + ("auto",)


def get_template(name: str) -> Optional[Template]:
    """The named template; ``None`` for ``auto`` (the tokenizer's chat template)."""
    if name == "auto":
        return None
    if name not in TEMPLATES:
        raise ValueError(f"--prompt-type {name!r} is unknown; use one of {TEMPLATE_NAMES}")
    return TEMPLATES[name]


def messages_of(conv: Conversation) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    for query, answer in conv.history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": conv.query}]


def auto_prompt_and_response_ids(tokenizer, conv: Conversation, response: Optional[str]) -> tuple[list[int], list[int]]:
    """Prompt / response ids from the tokenizer's own chat template.

    The response ids are the full conversation's ids past the prompt; a template that does
    not render the prompt as a prefix of the full conversation is an error.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--prompt-type auto needs a tokenizer with a chat_template")
    messages = messages_of(conv)
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False))
    if response is None:
        return prompt, []
    full = list(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=True, return_dict=False))
    if full[: len(prompt)] != prompt:
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the "
                         "conversation; use an explicit --prompt-type")
    return prompt, full[len(prompt):]


def tokenize_example(
    tokenizer, template_name: str, conv: Conversation, responses: dict[str, str]
) -> dict[str, list[int]]:
    """Token ids: ``prompt`` plus one list per named response (e.g. chosen, rejected)."""
    template = get_template(template_name)
    if template is None:
        out = {"prompt": auto_prompt_and_response_ids(tokenizer, conv, None)[0]}
        for key, text in responses.items():
            out[key] = auto_prompt_and_response_ids(tokenizer, conv, text)[1]
        return out
    encode: Callable[[str], list[int]] = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    out = {"prompt": encode(template.render_prompt(conv))}
    for key, text in responses.items():
        ids = encode(template.render_response(text))
        if template.append_eos:
            ids.append(tokenizer.eos_token_id)
        out[key] = ids
    return out
