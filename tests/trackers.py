"""Read back what the experiment trackers wrote, and an offline W&B environment for tests (no network, nothing
written outside the test's directory)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple, Optional

#: W&B's ``.wandb`` file: a LevelDB-style log (wandb-core writes it; wandb 0.31 ships no Python reader): a 7-byte
#: file header, then 32 KiB blocks of records, each a 7-byte header (CRC32, length, kind) and a chunk of one
#: serialized ``wandb_internal_pb2.Record``, split over blocks as FIRST, MIDDLE..., LAST chunks.
_BLOCK, _HEADER, _FULL, _LAST = 32768, 7, 1, 4
_FILE_HEADER = (b":W&B", 0xBEE1, 0)


def wandb_offline_env(root: Path) -> dict[str, str]:
    """Environment variables for a quiet offline W&B run whose every file lies under ``root``."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true", "WANDB_ERROR_REPORTING": "false",
            "WANDB_CONFIG_DIR": str(root / "config"), "WANDB_CACHE_DIR": str(root / "cache"),
            "WANDB_DATA_DIR": str(root / "data"), "WANDB_ARTIFACT_DIR": str(root / "artifacts")}


def wandb_records(run_file: Path):
    """The ``Record`` messages of one ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert struct.unpack("<4sHB", data[:_HEADER]) == _FILE_HEADER, f"{run_file} is not a W&B run file"
    pos, chunks = _HEADER, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


class WandbRun(NamedTuple):
    directory: Path
    history: dict[int, dict[str, float]]
    """step -> the metrics logged (W&B's own ``_step``, ``_runtime``, ... left out)"""
    config: dict
    name: str
    project: str
    exit_code: Optional[int]
    """``None``: the run was not finished"""


def wandb_run(output_dir: Path) -> WandbRun:
    """The one offline W&B run under ``output_dir/wandb``, read from its ``.wandb`` file."""
    runs = sorted((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    history: dict[int, dict[str, float]] = {}
    config: dict = {}
    name = project = ""
    exit_code = None
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "exit":
            exit_code = record.exit.exit_code
        elif kind == "run":
            name, project = record.run.display_name, record.run.project
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = int(items.get("_step", record.history.step.num))  # W&B's own keys start with "_"
            history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    config = {k: v for k, v in config.items() if not k.startswith("_wandb")}
    return WandbRun(runs[0], history, config, name, project, exit_code)


def tensorboard_scalars(output_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {tag: value} of the event files in ``output_dir/tensorboard`` (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def jsonl_metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """step -> every metric of metrics.jsonl and timing.jsonl."""
    out: dict[int, dict[str, float]] = {}
    for name in ("metrics.jsonl", "timing.jsonl"):
        for line in (output_dir / name).read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row.pop("step"), {}).update(row)
    return out


def assert_same_metrics(logged: dict[int, dict[str, float]], jsonl: dict[int, dict[str, float]], what: str,
                        rel: float = 1e-6) -> None:
    """Every step and key of the jsonl files, and nothing else, with equal values: to float32 (TensorBoard stores
    float32, metrics.jsonl keeps 8 significant digits) and to 1e-6 (timing.jsonl keeps 6 decimals)."""
    assert sorted(logged) == sorted(jsonl), f"{what}: steps {sorted(logged)} vs the jsonl files' {sorted(jsonl)}"
    for step, row in jsonl.items():
        assert set(logged[step]) == set(row), f"{what} step {step}: keys differ: {set(logged[step]) ^ set(row)}"
        for key, value in row.items():
            got = logged[step][key]
            assert abs(got - value) <= rel * abs(value) + 1e-6, f"{what} step {step} {key}: {got} vs {value}"
