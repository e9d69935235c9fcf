"""The layer rules of pyproject.toml's [tool.importlinter] hold, and a back-import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]  # import-linter's own command


def lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # analyse the dpo_rl under cwd, not the installed one
    return subprocess.run(LINT, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_layer_contract_is_kept():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_back_import_from_config_into_the_trainer_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "dpo_rl", tmp_path / "dpo_rl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    schema = tmp_path / "dpo_rl" / "config" / "schema.py"
    schema.write_text(schema.read_text() + "\n\ndef _back():\n    from dpo_rl.trainer import stages  # noqa: F401\n")
    out = lint(tmp_path)
    assert out.returncode == 1, out.stdout
    # the layers contract and the no-cycles contract both catch it, naming the import and its line
    assert "Contracts: 2 kept, 2 broken." in out.stdout
    assert "dpo_rl.config is not allowed to import dpo_rl.trainer" in out.stdout
    assert "dpo_rl.config.schema -> dpo_rl.trainer.stages" in out.stdout


def test_the_driver_side_imports_no_megatron_ray_or_transformers():
    """The deferred imports are real: importing the driver's entry modules loads none of the heavy packages."""
    code = ("import sys; import dpo_rl.trainer.run, dpo_rl.runtime.groups; "
            "print(sorted(m for m in ('megatron', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
