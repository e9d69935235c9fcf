"""preprocess_data.py: read-back, determinism, --workers parity, length limits, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpo_rl.data.formats import InputError
from dpo_rl.data.indexed import (
    TokenizedDataset,
    collate_pairs,
)
from dpo_rl.data.preprocess import PreprocessOptions, preprocess

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"instruction": f"Describe the harbor at dawn {i}.", "good": "The harbor had cold wind." * (1 + i % 3),
         "bad": "It was fine."} for i in range(40)]
KEYS = {"prompt": "instruction", "chosen": "good", "rejected": "bad"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(tokenizer_dir, input_path, prefix, **kw) -> PreprocessOptions:
    return PreprocessOptions(input=str(input_path), tokenizer_name_or_path=str(tokenizer_dir), output_prefix=str(prefix),
                             handler_name=kw.pop("handler_name", "AlpacaStylePairwiseHandler"),
                             prompt_type=kw.pop("prompt_type", "chatml"), map_keys=kw.pop("map_keys", KEYS), **kw)


def output_bytes(prefix: Path) -> dict[str, bytes]:
    return {p.name[len(prefix.name):]: p.read_bytes() for p in sorted(prefix.parent.glob(prefix.name + "_*"))}


def test_read_back_equals_what_was_written(tokenizer, tokenizer_dir, tmp_path):
    from dpo_rl.data.templates import Conversation, tokenize_example

    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    summary = preprocess(options(tokenizer_dir, src, tmp_path / "out" / "pairs"), progress=False)
    assert summary.written == 40 and summary.rows_read == 40
    data = TokenizedDataset(tmp_path / "out" / "pairs")
    assert len(data) == 40 and data.kind == "pairwise"
    for i in (0, 17, 39):
        expected = tokenize_example(tokenizer, "chatml", Conversation(ROWS[i]["instruction"]),
                                    {"chosen": ROWS[i]["good"], "rejected": ROWS[i]["bad"]})
        item = data[i]
        assert {k: item[k].tolist() for k in item} == expected
    pairs = collate_pairs([data[0], data[1]], pad_id=0)
    p0, c0 = len(data[0]["prompt"]), len(data[0]["chosen"])
    assert pairs["chosen_response"][0, :p0].sum() == 0 and pairs["chosen_response"][0, p0 : p0 + c0].all()


def test_same_input_gives_byte_identical_output_and_workers_agree(tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    preprocess(options(tokenizer_dir, src, tmp_path / "a" / "d"), progress=False)
    preprocess(options(tokenizer_dir, src, tmp_path / "b" / "d"), progress=False)
    preprocess(options(tokenizer_dir, src, tmp_path / "c" / "d", workers=2), progress=False)
    a, b, c = (output_bytes(tmp_path / x / "d") for x in "abc")
    assert set(a) == {"_prompt.bin", "_prompt.idx", "_chosen.bin", "_chosen.idx", "_rejected.bin", "_rejected.idx",
                      "_meta.json"}
    assert a == b == c


def test_parquet_directory_and_prompt_handler_with_seed_map_keys(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "dir").mkdir()
    pq.write_table(pa.table({"prompt": [r["instruction"] for r in ROWS[:10]]}), tmp_path / "dir" / "a.parquet")
    pq.write_table(pa.table({"prompt": [r["instruction"] for r in ROWS[10:15]]}), tmp_path / "dir" / "b.parquet")
    seed_keys = {"prompt": "prompt", "query": "", "response": "prompt", "system": ""}  # seed 001's example
    summary = preprocess(options(tokenizer_dir, tmp_path / "dir", tmp_path / "p", map_keys=seed_keys,
                                 handler_name="PPOAlpacaStyleInstructionHandler"), progress=False)
    assert summary.written == 15
    assert TokenizedDataset(tmp_path / "p").fields == ("prompt",)


def test_length_limits_drop_or_truncate_and_count(tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    dropped = preprocess(options(tokenizer_dir, src, tmp_path / "d", max_response_length=12), progress=False)
    truncated = preprocess(options(tokenizer_dir, src, tmp_path / "t", max_response_length=12, overlength="truncate"),
                           progress=False)
    assert dropped.dropped_overlength > 0 and dropped.written == 40 - dropped.dropped_overlength
    assert truncated.truncated == dropped.dropped_overlength and truncated.written == 40
    assert max(len(TokenizedDataset(tmp_path / "t")[i]["chosen"]) for i in range(40)) == 12


def bad_input_cases(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(ROWS[:5])
    cases = {}
    missing = [dict(r) for r in rows]
    del missing[3]["bad"]
    cases["missing column"] = (write_jsonl(tmp_path / "missing.jsonl", missing), r"missing\.jsonl: line 4: column 'bad': is missing")
    wrong = [dict(r) for r in rows]
    wrong[1]["good"] = ["a list"]
    cases["wrong type"] = (write_jsonl(tmp_path / "wrong.jsonl", wrong), r"wrong\.jsonl: line 2: column 'good': must be a string")
    empty_side = [dict(r) for r in rows]
    empty_side[2]["good"] = ""
    cases["empty chosen"] = (write_jsonl(tmp_path / "empty_side.jsonl", empty_side), r"line 3: column 'good': chosen response is empty")
    (tmp_path / "empty.jsonl").write_text("")
    cases["empty file"] = (tmp_path / "empty.jsonl", r"empty\.jsonl: the file is empty")
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    cases["invalid json"] = (tmp_path / "broken.jsonl", r"broken\.jsonl: line 2: invalid JSON")
    (tmp_path / "latin.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n" + '{"instruction": "caf\xe9"}'.encode("latin-1"))
    cases["not utf-8"] = (tmp_path / "latin.jsonl", r"latin\.jsonl: line 2: not UTF-8 text")
    pq.write_table(pa.table({"instruction": ["x"]}), tmp_path / "ok.parquet")
    data = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "corrupt.parquet").write_bytes(data[: len(data) // 2])
    cases["corrupt parquet"] = (tmp_path / "corrupt.parquet", r"corrupt\.parquet: not a readable parquet file")
    return cases


def test_every_bad_input_is_named_and_writes_nothing(tokenizer_dir, tmp_path):
    for name, (path, message) in bad_input_cases(tmp_path).items():
        prefix = tmp_path / "out" / name.replace(" ", "_")
        with pytest.raises(InputError, match=message):
            preprocess(options(tokenizer_dir, path, prefix), progress=False)
        assert not list(prefix.parent.glob(prefix.name + "*")), f"{name}: output was written"


def test_skip_bad_rows_counts_and_reports(tokenizer_dir, tmp_path):
    rows = [dict(r) for r in ROWS[:10]]
    del rows[3]["bad"]
    rows[7]["good"] = 5
    summary = preprocess(options(tokenizer_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o",
                                 skip_bad_rows=True), progress=False)
    assert summary.skipped_bad_rows == 2 and summary.written == 8
    assert "line 4: column 'bad'" in summary.skipped_examples[0]


def test_an_incomplete_dataset_is_refused(tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    preprocess(options(tokenizer_dir, src, tmp_path / "d"), progress=False)
    (tmp_path / "d_meta.json").unlink()  # as if the run died before its last write
    with pytest.raises(InputError, match="not a complete preprocessed dataset"):
        TokenizedDataset(tmp_path / "d")


def test_cli_exit_code_and_summary(tokenizer_dir, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS[:5])
    ok = subprocess.run([sys.executable, str(ROOT / "preprocess_data.py"), "--input", str(src),
                         "--tokenizer-name-or-path", str(tokenizer_dir), "--output-prefix", str(tmp_path / "o"),
                         "--tokenizer-type", "PretrainedFromHF", "--handler-name", "AlpacaStylePairwiseHandler",
                         "--prompt-type", "llama3", "--map-keys", json.dumps(KEYS), "--workers", "1"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "rows read 5, written 5" in ok.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "preprocess_data.py"), "--input", str(src),
                          "--tokenizer-name-or-path", str(tokenizer_dir), "--output-prefix", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "column 'chosen': is missing" in bad.stderr  # ROWS name it "good"
    assert np.asarray(TokenizedDataset(tmp_path / "o")[0]["prompt"]).size > 0


HANDLER_ROWS = {
    "PPOAlpacaStyleInstructionHandler": ({"instruction": "Describe the harbor at dawn."}, {}),
    "AlpacaStyleInstructionHandler": ({"instruction": "Describe the harbor at dawn.", "output": "It was fine."},
                                      {"response": "It was fine."}),
    "SharegptStyleInstructionHandler": ({"messages": [{"from": "human", "value": "Describe the harbor at dawn."},
                                                      {"from": "gpt", "value": "It was fine."}]},
                                        {"response": "It was fine."}),
    "AlpacaStylePairwiseHandler": ({"instruction": "Describe the harbor at dawn.", "chosen": "It was fine.",
                                    "rejected": "Cold wind."}, {"chosen": "It was fine.", "rejected": "Cold wind."}),
    "SharegptStylePairwiseHandler": ({"messages": [{"from": "human", "value": "Describe the harbor at dawn."}],
                                      "chosen": {"from": "gpt", "value": "It was fine."},
                                      "rejected": {"from": "gpt", "value": "Cold wind."}},
                                     {"chosen": "It was fine.", "rejected": "Cold wind."}),
    "AlpacaStyleRewardHandler": ({"instruction": "Describe the harbor at dawn.", "chosen": "It was fine.",
                                  "rejected": "Cold wind."}, {"chosen": "It was fine.", "rejected": "Cold wind."}),
}
ONE_TURN_PROMPT = {
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDescribe the harbor at dawn.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": "<|im_start|>user\nDescribe the harbor at dawn.<|im_end|>\n<|im_start|>assistant\n",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nDescribe the harbor at dawn.\n\n### Response:\n"),
    "empty": "Describe the harbor at dawn.",
}
ONE_TURN_RESPONSE = {"llama3": "{}<|eot_id|>", "chatml": "{}<|im_end|>\n", "alpaca": "{}\n\n</s>", "empty": "{}</s>"}


@pytest.mark.parametrize("template", sorted(ONE_TURN_PROMPT))
@pytest.mark.parametrize("handler", sorted(HANDLER_ROWS))
def test_each_handler_and_template_through_the_pipeline(tokenizer, tokenizer_dir, tmp_path, handler, template):
    row, responses = HANDLER_ROWS[handler]
    src = write_jsonl(tmp_path / "in.jsonl", [row])
    preprocess(options(tokenizer_dir, src, tmp_path / "o", handler_name=handler, prompt_type=template, map_keys={}),
               progress=False)
    item = TokenizedDataset(tmp_path / "o")[0]
    assert item["prompt"].tolist() == tokenizer.encode(ONE_TURN_PROMPT[template], add_special_tokens=False)
    assert set(item) == {"prompt", *responses}
    for key, text in responses.items():
        assert item[key].tolist() == tokenizer.encode(ONE_TURN_RESPONSE[template].format(text), add_special_tokens=False)


def test_online_dpo_refuses_a_dataset_of_the_wrong_kind(tokenizer, tokenizer_dir, tmp_path):
    from dpo_rl.data.prompts import load_prompt_source
    from dpo_rl.errors import ConfigError

    preprocess(options(tokenizer_dir, write_jsonl(tmp_path / "in.jsonl", ROWS), tmp_path / "pairs"), progress=False)
    with pytest.raises(ConfigError, match="a 'pairwise' dataset .* online DPO needs prompts"):
        load_prompt_source(tmp_path / "pairs", tokenizer, prompt_key="prompt", max_prompt_length=512)


def test_llama_factory_alpaca_files_need_no_map_keys(tokenizer, tokenizer_dir, tmp_path):
    """LLaMA-Factory's alpaca format (its DPO tutorial's columns) preprocesses with the default columns."""
    pairs = [{"instruction": "Describe the harbor", "input": "at dawn.", "chosen": "Cold wind.", "rejected": "Fine.",
              "system": "Be vivid.", "history": [["Hello", "Hi"]]},
             {"instruction": "Describe the square.", "input": "", "chosen": "Warm stone.", "rejected": "Fine."}]
    preprocess(options(tokenizer_dir, write_jsonl(tmp_path / "dpo.jsonl", pairs), tmp_path / "dpo", map_keys={}),
               progress=False)
    first = TokenizedDataset(tmp_path / "dpo")[0]
    assert tokenizer.decode(first["prompt"].tolist()) == (
        "<|im_start|>system\nBe vivid.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n"
        "<|im_start|>user\nDescribe the harbor\nat dawn.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(first["chosen"].tolist()) == "Cold wind.<|im_end|>\n"
    sft = [{"instruction": "Describe the harbor.", "input": "", "output": "Cold wind."},
           {"instruction": "Describe the square.", "input": "briefly", "output": "Warm stone."}]
    (tmp_path / "sft.json").write_text(json.dumps(sft))  # a JSON array, as LLaMA-Factory ships its datasets
    summary = preprocess(options(tokenizer_dir, tmp_path / "sft.json", tmp_path / "sft", map_keys={},
                                 handler_name="AlpacaStyleInstructionHandler"), progress=False)
    assert summary.written == 2
    assert tokenizer.decode(TokenizedDataset(tmp_path / "sft")[1]["response"].tolist()) == "Warm stone.<|im_end|>\n"
    # a broken line of a JSON-lines file is named by its line number
    lines = [json.dumps(pairs[0]), "", json.dumps(pairs[1]), '{"instruction": "Describe", "chosen": "x"}']
    (tmp_path / "broken.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"broken\.jsonl: line 4: column 'rejected': is missing"):
        preprocess(options(tokenizer_dir, tmp_path / "broken.jsonl", tmp_path / "b", map_keys={}), progress=False)


def test_a_missing_tokenizer_is_named_before_any_input_is_read(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "b"}])
    prefix = tmp_path / "out" / "pairs"
    with pytest.raises(InputError, match=r"--tokenizer-name-or-path='no/such/tokenizer' is not a local directory"):
        preprocess(options("no/such/tokenizer", path, prefix), progress=False)
    assert not prefix.parent.exists()
