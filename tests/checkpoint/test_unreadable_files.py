"""A truncated or corrupted checkpoint file is one ConfigError naming it: convert_ckpt.py exits 2 with a short
message and no traceback (docs/troubleshooting.md, "Checkpoints that cannot be read")."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from dpo_rl.checkpoint.convert import hf_to_megatron
from tests.workers.megatron.common import tiny_config, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]


def _convert_ckpt():
    spec = importlib.util.spec_from_file_location("convert_ckpt", ROOT / "tools/checkpoint/convert_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_ckpt = _convert_ckpt()


def cut_in_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny HF checkpoint (safetensors), the same as pytorch_model.bin, and its Megatron conversion."""
    root = tmp_path_factory.mktemp("sources")
    model = tiny_hf_model(tiny_config("llama"), seed=5)
    model.save_pretrained(root / "hf", safe_serialization=True)
    (root / "bin").mkdir()
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    shutil.copy(root / "hf" / "config.json", root / "bin" / "config.json")
    hf_to_megatron(str(root / "hf"), str(root / "mg"), tp=1, pp=1)
    return root


#: (source directory, file cut in half, --load-model-type, --save-model-type)
CASES = {
    "hf safetensors": ("hf", "model.safetensors", "hf", "mg"),
    "hf pytorch_model.bin": ("bin", "pytorch_model.bin", "hf", "mg"),
    "hf config.json": ("hf", "config.json", "hf", "mg"),
    "megatron rank file -> hf": ("mg", "release/mp_rank_00/model_optim_rng.pt", "mg", "hf"),
    "megatron rank file -> mg": ("mg", "release/mp_rank_00/model_optim_rng.pt", "mg", "mg"),
    "megatron dpo_rl_checkpoint.json": ("mg", "dpo_rl_checkpoint.json", "mg", "hf"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_cut_in_half_is_one_message_naming_it(case, sources, tmp_path, capsys):
    source, relative, load_type, save_type = CASES[case]
    load_dir = tmp_path / source
    shutil.copytree(sources / source, load_dir)
    cut_in_half(load_dir / relative)
    rc = convert_ckpt.main(["--load-model-type", load_type, "--save-model-type", save_type,
                            "--load-dir", str(load_dir), "--save-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert str(load_dir / relative) in err
    assert "truncated or corrupted" in err and "re-copy" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
