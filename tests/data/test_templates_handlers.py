"""Each handler x template: exact token ids at the prompt/response boundary."""

from __future__ import annotations

import pytest

from dpo_rl.data.handlers import RowError, get_handler
from dpo_rl.data.templates import Conversation, tokenize_example

CONV = Conversation(query="Describe the harbor at dawn.", system="Be vivid.",
                    history=[("Hello there", "how are you?")])
EXPECTED_PROMPT = {
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe vivid.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nhow are you?<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nDescribe the harbor at dawn.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>system\nBe vivid.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
               "<|im_start|>assistant\nhow are you?<|im_end|>\n<|im_start|>user\nDescribe the harbor at dawn.<|im_end|>\n"
               "<|im_start|>assistant\n"),
    "qwen": ("<|im_start|>system\nBe vivid.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
             "<|im_start|>assistant\nhow are you?<|im_end|>\n<|im_start|>user\nDescribe the harbor at dawn.<|im_end|>\n"
             "<|im_start|>assistant\n"),
    "alpaca": ("Be vivid.\n\n### Instruction:\nHello there\n\n### Response:\nhow are you?\n\n"
               "### Instruction:\nDescribe the harbor at dawn.\n\n### Response:\n"),
    "empty": "Be vivid.\nHello therehow are you?Describe the harbor at dawn.",
    "auto": ("<|im_start|>system\nBe vivid.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
             "<|im_start|>assistant\nhow are you?<|im_end|>\n<|im_start|>user\nDescribe the harbor at dawn.<|im_end|>\n"
             "<|im_start|>assistant\n"),
}
RESPONSE_END = {"llama3": ["<|eot_id|>"], "chatml": ["<|im_end|>", "\n"], "qwen": ["<|im_end|>", "\n"],
                "alpaca": ["\n\n", "</s>"], "empty": ["</s>"], "auto": ["<|im_end|>", "\n"]}


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("template", sorted(EXPECTED_PROMPT))
def test_prompt_and_response_ids_are_exact(tokenizer, template):
    out = tokenize_example(tokenizer, template, CONV, {"chosen": "It was fine.", "rejected": "Cold wind."})
    assert out["prompt"] == ids(tokenizer, EXPECTED_PROMPT[template])
    for side, text in (("chosen", "It was fine."), ("rejected", "Cold wind.")):
        answer = ids(tokenizer, text)
        assert out[side][: len(answer)] == answer  # the response starts right at the boundary
        tail = [i for t in RESPONSE_END[template]
                for i in ([tokenizer.convert_tokens_to_ids(t)] if t.startswith("<") else ids(tokenizer, t))]
        assert out[side][-len(tail):] == tail
        assert len(out[side]) == len(answer) + len(tail)


def test_qwen_adds_its_default_system_prompt(tokenizer):
    out = tokenize_example(tokenizer, "qwen", Conversation(query="Hi"), {})
    assert tokenizer.decode(out["prompt"]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")


def test_alpaca_pairwise_row_with_query_history_and_map_keys():
    handler = get_handler("AlpacaStylePairwiseHandler")
    row = {"instruction": "Describe", "input": "the harbor", "good": "Vivid.", "bad": "Fine.",
           "hist": [["Hello", "Hi"]], "sys": "Be vivid."}
    conv, responses = handler.parse(row, {"prompt": "instruction", "query": "input", "chosen": "good",
                                          "rejected": "bad", "history": "hist", "system": "sys"})
    assert conv == Conversation("Describe\nthe harbor", "Be vivid.", [("Hello", "Hi")])
    assert responses == {"chosen": "Vivid.", "rejected": "Fine."}


def test_sharegpt_rows_for_pairwise_and_sft():
    turns = [{"from": "system", "value": "Be vivid."}, {"from": "human", "value": "Hello"},
             {"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Describe the harbor."}]
    conv, responses = get_handler("SharegptStylePairwiseHandler").parse(
        {"conversations": turns, "chosen": {"from": "gpt", "value": "Vivid."}, "rejected": {"from": "gpt", "value": "Fine."}},
        {"messages": "conversations"})
    assert conv == Conversation("Describe the harbor.", "Be vivid.", [("Hello", "Hi")])
    assert responses == {"chosen": "Vivid.", "rejected": "Fine."}
    sft_turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    conv, responses = get_handler("SharegptStyleInstructionHandler").parse({"messages": sft_turns}, {})
    assert conv.query == "Hi" and responses == {"response": "Hello!"}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"instruction": "Q", "chosen": "A"}, "column 'rejected': is missing"),
        ({"instruction": "Q", "chosen": "A", "rejected": 3}, "column 'rejected': must be a string or a turn object"),
        ({"instruction": 5, "chosen": "A", "rejected": "B"}, "column 'instruction': must be a string"),
        ({"instruction": "Q", "chosen": "  ", "rejected": "B"}, "column 'chosen': chosen response is empty"),
        ({"instruction": "Q", "chosen": "A", "rejected": "B", "history": "x"}, "history must be a list"),
        ({"prompt": "Q", "chosen": "A", "rejected": "B"}, "column 'instruction': is missing; map it with --map-keys"),
    ],
)
def test_bad_rows_name_the_column(row, message):
    with pytest.raises(RowError, match=message):
        get_handler("AlpacaStylePairwiseHandler").parse(row, {})
