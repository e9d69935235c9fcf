"""``python ray_gpt.py``: Hydra's --config-dir and overrides; bad configs exit 2 before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "ray_gpt.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_own_config_dir_with_all_problems_reported_and_exit_2(tmp_path):
    shipped = (ROOT / "configs/rlxf/online_dpo_trainer_tiny.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(shipped.replace("  lr: 5.0e-5", "  lrr: 5.0e-5"))
    proc = run_cli("--config-dir", str(tmp_path), "--config-name", "mine", f"hydra.run.dir={tmp_path}/run",
                   "algorithm.loss_type=kto")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "training.lrr: Key 'lrr' not in 'TrainingConfig'" in proc.stderr
    assert "Ray" not in proc.stderr.split("configuration problem")[0]  # nothing started before the report


def test_override_reaches_validation(tmp_path):
    proc = run_cli("--config-name", "online_dpo_trainer_tiny", f"hydra.run.dir={tmp_path}/run",
                   "data.train_path=/nonexistent/prompts.jsonl")
    assert proc.returncode == 2
    assert "data.train_path='/nonexistent/prompts.jsonl' does not exist" in proc.stderr


# -- one clear message before Hydra or Ray start (dpo_rl.cli.preflight) ---------------------------------------
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    from tests.cli_runs import assert_one_clear_message, run_cli

    shipped = (ROOT / "configs/rlxf/online_dpo_trainer_tiny.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(shipped.replace("  lr: 5.0e-5", "  lr: [5.0e-5"))
    line = next(i for i, text in enumerate(shipped.splitlines(), 1) if text == "  lr: 5.0e-5")
    result = run_cli("--config-dir", str(tmp_path), "--config-name", "mine", f"training.output_dir={tmp_path}/run")
    message = assert_one_clear_message(result, f"{tmp_path}/mine.yaml:{line + 1}:", "YAML syntax error",
                                       f"at line {line}", within_s=30)
    assert len(message.splitlines()) == 2  # "1 configuration problem(s):" and the problem
    assert not (tmp_path / "run").exists()  # Hydra did not start (it would create the run directory)


def test_an_unwritable_output_dir_is_reported_with_the_other_problems(tmp_path):
    from tests.cli_runs import assert_one_clear_message, run_cli

    (tmp_path / "file").write_text("x")
    result = run_cli("--config-name", "online_dpo_trainer_tiny", f"training.output_dir={tmp_path}/file/run",
                     "data.train_path=/nonexistent/prompts.jsonl")
    assert_one_clear_message(result, "data.train_path='/nonexistent/prompts.jsonl' does not exist",
                             f"training.output_dir='{tmp_path}/file/run' cannot be created", within_s=30)


def test_a_misspelt_key_and_a_broken_override_are_named(tmp_path):
    from tests.cli_runs import assert_one_clear_message, run_cli

    out = f"training.output_dir={tmp_path}/run"
    assert_one_clear_message(run_cli("--config-name", "online_dpo_trainer_tiny", out, "training.lrr=3"),
                             "training.lrr is not a documented key", "did you mean training.lr?", within_s=30)
    assert_one_clear_message(run_cli("--config-name", "online_dpo_trainer_tiny", out, "algorithm.beta=[0.1"),
                             "the override 'algorithm.beta=[0.1' is not Hydra syntax", within_s=30)
