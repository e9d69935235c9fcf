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
