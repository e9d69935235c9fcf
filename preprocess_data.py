"""Raw parquet/json/jsonl -> tokenized Megatron indexed datasets (seed 001's command line).

    python preprocess_data.py --input data.parquet --tokenizer-name-or-path ./tokenizer \\
        --output-prefix ./dataset/name --tokenizer-type PretrainedFromHF \\
        --handler-name AlpacaStylePairwiseHandler --prompt-type chatml --workers 4 \\
        --map-keys '{"prompt": "question", "chosen": "good", "rejected": "bad"}'

Bad input stops the run before anything is written (exit 2) with the file, row and column.
"""

import argparse
import json
import sys

from dpo_rl.data.adapters import ADAPTERS
from dpo_rl.data.handlers import HANDLERS
from dpo_rl.data.formats import InputError
from dpo_rl.data.preprocess import PreprocessOptions, preprocess
from dpo_rl.data.templates import TEMPLATE_NAMES


def parse_args(argv=None) -> PreprocessOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a parquet/json/jsonl file, a directory of them, or a glob")
    p.add_argument("--tokenizer-name-or-path", required=True, help="local HF tokenizer directory")
    p.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"])
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--handler-name", default="AlpacaStylePairwiseHandler", choices=sorted(HANDLERS))
    p.add_argument("--prompt-type", default="chatml", choices=TEMPLATE_NAMES)
    p.add_argument("--map-keys", default="{}", help="JSON: canonical key -> column ('' = the dataset has none)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--max-response-length", type=int, default=None)
    p.add_argument("--overlength", default="drop", choices=["drop", "truncate"],
                   help="what to do with samples over the length limits (counted either way)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    p.add_argument("--dataset-adapter", default=None, choices=sorted(ADAPTERS),
                   help="map a public dataset's real layout onto canonical rows (use an AlpacaStyle* handler)")
    a = p.parse_args(argv)
    try:
        map_keys = json.loads(a.map_keys)
    except json.JSONDecodeError as exc:
        p.error(f"--map-keys is not valid JSON: {exc.msg}")
    if not isinstance(map_keys, dict) or not all(isinstance(v, str) for v in map_keys.values()):
        p.error("--map-keys must be a JSON object of strings")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    return PreprocessOptions(
        input=a.input, tokenizer_name_or_path=a.tokenizer_name_or_path, output_prefix=a.output_prefix,
        handler_name=a.handler_name, prompt_type=a.prompt_type, map_keys=map_keys, workers=a.workers,
        log_interval=a.log_interval, max_prompt_length=a.max_prompt_length,
        max_response_length=a.max_response_length, overlength=a.overlength, skip_bad_rows=a.skip_bad_rows,
        dataset_adapter=a.dataset_adapter,
    )


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        summary = preprocess(options)
    except InputError as err:
        print(f"preprocess_data.py: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
