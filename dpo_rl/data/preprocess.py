"""Raw parquet / json / jsonl -> tokenized Megatron indexed datasets (``preprocess_data.py``).

Two passes, so a bad input never leaves output behind: every row is read, parsed by the
handler and tokenized with the template (in ``--workers`` processes, order kept) before
anything is written. A bad row is an error naming file, row and column, unless
``--skip-bad-rows`` counts and reports it. Over-long samples are dropped (seed 004's
behaviour) or truncated, and counted.

Output for prefix ``P``: one indexed dataset per field (``P_prompt``, ``P_chosen``, ...:
``.bin``/``.idx`` written by ``megatron.core.datasets.indexed_dataset``) and ``P_meta.json``,
written last. Readers (:mod:`dpo_rl.data.indexed`) refuse a prefix without a meta file whose
counts match, so a run that died mid-write is never mistaken for a dataset.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from dpo_rl.data.adapters import get_adapter
from dpo_rl.data.formats import META_SUFFIX, InputError
from dpo_rl.data.handlers import CANONICAL_COLUMNS, Handler, RowError, get_handler
from dpo_rl.data.templates import get_template, tokenize_example
from dpo_rl.data.tokenizers import check_tokenizer_dir, load_local_tokenizer

INPUT_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass
class PreprocessOptions:
    """What ``preprocess_data.py`` was asked to do."""

    input: str
    tokenizer_name_or_path: str
    output_prefix: str
    handler_name: str = "AlpacaStylePairwiseHandler"
    prompt_type: str = "chatml"
    map_keys: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    log_interval: int = 1000
    max_prompt_length: Optional[int] = None
    max_response_length: Optional[int] = None
    overlength: str = "drop"
    skip_bad_rows: bool = False
    dataset_adapter: Optional[str] = None


@dataclass
class Summary:
    """Counts of what happened to every row."""

    rows_read: int = 0
    written: int = 0
    skipped_bad_rows: int = 0
    dropped_overlength: int = 0
    truncated: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"rows read {self.rows_read}, written {self.written}, dropped as over-long {self.dropped_overlength}, "
               f"truncated {self.truncated}, skipped as bad {self.skipped_bad_rows}"]
        out += [f"  skipped: {e}" for e in self.skipped_examples[:10]]
        return out


# --------------------------------------------------------------------------- reading
def input_files(spec: str) -> list[Path]:
    """A file, a directory (its parquet/json/jsonl files) or a glob, sorted."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in INPUT_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix in INPUT_SUFFIXES)
    if not files:
        raise InputError(f"--input {spec!r} matches no {'/'.join(INPUT_SUFFIXES)} file")
    for f in files:
        if f.suffix not in INPUT_SUFFIXES:
            raise InputError(f"{f}: unsupported file type {f.suffix!r}; use one of {INPUT_SUFFIXES}")
    return files


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of one input file: where is ``line N`` in JSON lines (the file's own line
    number, blank lines counted), ``row N`` in a JSON array or parquet file (1-based); an
    InputError names the file and that place."""
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _json_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {number}: each line must be a JSON object, got {type(row).__name__}")
            yield f"line {number}", row


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            yield from _jsonl_rows(path)
            return
        raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json input must hold a list of objects (or JSON lines)")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {number}: must be a JSON object, got {type(row).__name__}")
        yield f"row {number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq  # deferred: only parquet input needs it

    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    number = 0
    for batch in reader.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", row


# --------------------------------------------------------------------------- tokenizing (workers)
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, handler_name: str, prompt_type: str, map_keys: dict[str, str],
                 adapter: Optional[str]) -> None:
    _WORKER.update(tokenizer=load_local_tokenizer(tokenizer_path, "--tokenizer-name-or-path"),
                   handler=get_handler(handler_name),
                   prompt_type=prompt_type, map_keys=map_keys, adapter=get_adapter(adapter) if adapter else None)


def _tokenize_row(item: tuple[str, str, dict[str, Any]]) -> tuple[str, str, Any]:
    """(file, where, token dict) or (file, where, error text); ``where`` is ``line N`` or ``row N``."""
    file, where, row = item
    handler: Handler = _WORKER["handler"]
    try:
        if _WORKER["adapter"] is not None:  # adapters yield rows under the canonical names
            row = _WORKER["adapter"](row)
            conv, responses = handler.parse(row, CANONICAL_COLUMNS)
        else:
            conv, responses = handler.parse(row, _WORKER["map_keys"])
        tokens = tokenize_example(_WORKER["tokenizer"], _WORKER["prompt_type"], conv, responses)
    except RowError as err:
        return file, where, f"{file}: {where}: {err}"
    except ValueError as err:
        return file, where, f"{file}: {where}: {err}"
    return file, where, {k: np.asarray(v, dtype=np.int32) for k, v in tokens.items()}


def _rows(files: list[Path]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path in files:
        for where, row in read_rows(path):
            yield str(path), where, row


# --------------------------------------------------------------------------- length limits
def apply_length_limits(tokens: dict[str, np.ndarray], options: PreprocessOptions) -> tuple[Optional[dict], bool]:
    """(tokens or None if dropped, truncated?). Prompts keep their end, responses their start."""
    over = []
    if options.max_prompt_length and len(tokens["prompt"]) > options.max_prompt_length:
        over.append("prompt")
    if options.max_response_length:
        over += [k for k in tokens if k != "prompt" and len(tokens[k]) > options.max_response_length]
    if not over:
        return tokens, False
    if options.overlength == "drop":
        return None, False
    out = dict(tokens)
    for key in over:
        out[key] = tokens[key][-options.max_prompt_length:] if key == "prompt" else tokens[key][: options.max_response_length]
    return out, True


# --------------------------------------------------------------------------- writing
def output_paths(prefix: str, fields: tuple[str, ...]) -> dict[str, str]:
    return {f: f"{prefix}_{f}" for f in fields}


def write_indexed(prefix: str, fields: tuple[str, ...], examples: list[dict[str, np.ndarray]], meta: dict) -> None:
    """Write one indexed dataset per field, then the meta file; atomic per file, meta last."""
    import torch  # deferred: the preprocessing workers import torch only to write
    from megatron.core.datasets.indexed_dataset import (  # deferred: heavy (megatron-core)
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    meta_path = Path(prefix + META_SUFFIX)
    if meta_path.exists():
        meta_path.unlink()  # an old meta must never describe the new .bin/.idx
    staged = []
    try:
        for name, path_prefix in output_paths(prefix, fields).items():
            tmp_prefix = f"{path_prefix}.tmp{os.getpid()}"
            builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=np.int32)
            for example in examples:
                builder.add_document(torch.from_numpy(example[name]), [len(example[name])])
            builder.finalize(get_idx_path(tmp_prefix))
            staged.append((tmp_prefix, path_prefix))
        for tmp_prefix, path_prefix in staged:
            os.replace(get_bin_path(tmp_prefix), get_bin_path(path_prefix))
            os.replace(get_idx_path(tmp_prefix), get_idx_path(path_prefix))
        staged = []
        tmp_meta = meta_path.with_suffix(f".tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_meta, meta_path)
    finally:
        for tmp_prefix, _ in staged:
            for p in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
                if os.path.exists(p):
                    os.remove(p)


# --------------------------------------------------------------------------- the pipeline
def preprocess(options: PreprocessOptions, progress: bool = True) -> Summary:
    """Read, tokenize, check and write; returns the counts (raises InputError on bad input)."""
    handler = get_handler(options.handler_name)
    get_template(options.prompt_type)
    if options.overlength not in ("drop", "truncate"):
        raise InputError(f"--overlength {options.overlength!r}: use drop or truncate")
    unknown = sorted(set(options.map_keys) - {"prompt", "query", "response", "system", "history", "chosen",
                                                "rejected", "messages"})
    if unknown:
        raise InputError(f"--map-keys has unknown keys {unknown}; canonical keys are prompt, query, response, "
                         "system, history, chosen, rejected, messages")
    if options.dataset_adapter:
        get_adapter(options.dataset_adapter)
        if handler.style != "alpaca" or options.map_keys:
            raise InputError(f"--dataset-adapter {options.dataset_adapter} yields canonical alpaca-style rows: use an "
                             "AlpacaStyle* handler and no --map-keys")
    problems = check_tokenizer_dir(options.tokenizer_name_or_path, "--tokenizer-name-or-path")
    if problems:
        raise InputError(problems[0])
    files = input_files(options.input)
    summary = Summary()
    examples: list[dict[str, np.ndarray]] = []
    bar = _progress(progress)
    start = time.perf_counter()
    init_args = (options.tokenizer_name_or_path, options.handler_name, options.prompt_type, options.map_keys,
                 options.dataset_adapter)
    if options.workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(options.workers, _init_worker, init_args)
        results = pool.imap(_tokenize_row, _rows(files), chunksize=64)
    else:
        pool = None
        _init_worker(*init_args)
        results = map(_tokenize_row, _rows(files))
    try:
        for file, _where, result in results:
            summary.rows_read += 1
            if isinstance(result, str):
                if not options.skip_bad_rows:
                    raise InputError(result + " (fix the row, or pass --skip-bad-rows to skip and count such rows)")
                summary.skipped_bad_rows += 1
                summary.skipped_examples.append(result)
                continue
            limited, truncated = apply_length_limits(result, options)
            if limited is None:
                summary.dropped_overlength += 1
                continue
            summary.truncated += int(truncated)
            examples.append(limited)
            if bar is not None:
                bar.update(1)
            if options.log_interval and summary.rows_read % options.log_interval == 0 and bar is None:
                rate = summary.rows_read / (time.perf_counter() - start)
                print(f"processed {summary.rows_read} rows ({rate:.0f} rows/s)", flush=True)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    if not examples:
        raise InputError(f"no examples left to write from {options.input} ({summary.lines()[0]})")
    summary.written = len(examples)
    meta = {
        "handler": handler.name, "kind": handler.kind, "fields": list(handler.fields),
        "prompt_type": options.prompt_type, "tokenizer": str(options.tokenizer_name_or_path),
        "dataset_adapter": options.dataset_adapter,
        "num_examples": summary.written, "summary": summary.lines()[0],
    }
    write_indexed(options.output_prefix, handler.fields, examples, meta)
    return summary


def _progress(enabled: bool):
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm  # deferred: only an interactive terminal needs it

    return tqdm(desc="preprocess", unit="row", file=sys.stderr)
