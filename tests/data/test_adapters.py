"""Each adapter on a small fixture written in its dataset's real column layout."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_rl.data.adapters import ADAPTERS, parse_transcript
from dpo_rl.data.formats import InputError
from dpo_rl.data.handlers import RowError
from dpo_rl.data.indexed import TokenizedDataset
from dpo_rl.data.preprocess import PreprocessOptions, preprocess


def msgs(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


FIXTURES = {
    "trl_style": ("parquet", [{"prompt": "Describe the harbor.", "chosen": msgs("Describe the harbor.", "Cold wind."),
                               "rejected": msgs("Describe the harbor.", "Fine.")}]),
    "hh_rlhf": ("jsonl", [{"chosen": "\n\nHuman: Hello there\n\nAssistant: Hi\n\nHuman: Describe the harbor.\n\nAssistant: Cold wind.",
                           "rejected": "\n\nHuman: Hello there\n\nAssistant: Hi\n\nHuman: Describe the harbor.\n\nAssistant: Fine."}]),
    "hh_rlhf_cn": ("jsonl", [{"context": [{"role": "human", "text": "Hello there"}, {"role": "assistant", "text": "Hi"},
                                          {"role": "human", "text": "Describe the harbor."}],
                              "chosen": {"role": "assistant", "text": "Cold wind."},
                              "rejected": {"role": "assistant", "text": "Fine."}}]),
    "ultrafeedback_binarized": ("parquet", [{"prompt": "Describe the harbor.", "prompt_id": "abc",
                                             "chosen": msgs("Describe the harbor.", "Cold wind."),
                                             "rejected": msgs("Describe the harbor.", "Fine."),
                                             "messages": msgs("Describe the harbor.", "Cold wind."),
                                             "score_chosen": 8.0, "score_rejected": 3.0}]),
    "orca_dpo_pairs": ("parquet", [{"system": "Be vivid.", "question": "Describe the harbor.", "chosen": "Cold wind.",
                                    "rejected": "Fine."}]),
    "nectar": ("json", [{"prompt": "\n\nHuman: Describe the harbor.\n\nAssistant: ",
                         "answers": [{"answer": "Fine.", "model": "a", "rank": 3.0},
                                     {"answer": "Cold wind.", "model": "b", "rank": 1.0},
                                     {"answer": "Okay.", "model": "c", "rank": 2.0}],
                         "turns": 1, "num_responses": 3, "source": ["x"], "good_natured": True}]),
    "dpo_en_zh": ("parquet", [{"prompt": "Describe the harbor.", "chosen": msgs("Describe the harbor.", "Cold wind."),
                               "rejected": msgs("Describe the harbor.", "Fine."), "language": "en"}]),
}
HISTORY = {"hh_rlhf", "hh_rlhf_cn"}


def write(path, kind, rows):
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_adapter_has_a_fixture():
    assert set(FIXTURES) == set(ADAPTERS)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_adapter_end_to_end(name, tokenizer, tokenizer_dir, tmp_path):
    kind, rows = FIXTURES[name]
    src = write(tmp_path / f"data.{kind}", kind, rows)
    preprocess(PreprocessOptions(input=str(src), tokenizer_name_or_path=str(tokenizer_dir),
                                 output_prefix=str(tmp_path / "o"), handler_name="AlpacaStylePairwiseHandler",
                                 prompt_type="chatml", dataset_adapter=name), progress=False)
    item = TokenizedDataset(tmp_path / "o")[0]
    prompt = tokenizer.decode(item["prompt"].tolist())
    assert prompt.endswith("<|im_start|>user\nDescribe the harbor.<|im_end|>\n<|im_start|>assistant\n")
    assert ("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>" in prompt) == (name in HISTORY)
    assert ("Be vivid." in prompt) == (name == "orca_dpo_pairs")
    assert tokenizer.decode(item["chosen"].tolist()) == "Cold wind.<|im_end|>\n"
    assert tokenizer.decode(item["rejected"].tolist()) == "Fine.<|im_end|>\n"


def test_hh_rlhf_transcripts_must_share_the_conversation():
    row = dict(FIXTURES["hh_rlhf"][1][0])
    row["rejected"] = row["rejected"].replace("Hello there", "Bye")
    with pytest.raises(RowError, match="do not share the same conversation"):
        ADAPTERS["hh_rlhf"](row)
    with pytest.raises(RowError, match="not a .* transcript"):
        parse_transcript("no turns here", "chosen")


def test_adapter_row_error_names_file_row_and_column(tokenizer_dir, tmp_path):
    rows = [FIXTURES["orca_dpo_pairs"][1][0], {"system": "", "question": "Q", "chosen": "A"}]
    src = write(tmp_path / "d.jsonl", "jsonl", rows)
    with pytest.raises(InputError, match=r"d\.jsonl: line 2: column 'rejected': is missing"):
        preprocess(PreprocessOptions(input=str(src), tokenizer_name_or_path=str(tokenizer_dir),
                                     output_prefix=str(tmp_path / "o"), dataset_adapter="orca_dpo_pairs"), progress=False)
