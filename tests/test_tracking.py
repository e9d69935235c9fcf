"""The metrics tracker: the trackers ``training.report_to`` lists hold metrics.jsonl's and timing.jsonl's values;
offline W&B connects to nothing beyond this machine; one progress line every ``log_interval`` steps."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo_rl.tracking import MetricsTracker
from tests.trackers import (
    assert_same_metrics,
    jsonl_metrics,
    tensorboard_scalars,
    wandb_offline_env,
    wandb_run,
)

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = {"training": {"stage": "dpo", "lr": 5e-7, "report_to": ["jsonl", "wandb"]},
              "algorithm": {"beta": 0.1, "loss_type": "sigmoid"}}


def synthetic(step: int) -> dict[str, float]:
    """A step's metrics as a stage logs them: TRL's names, timing and throughput, eval keys every other step."""
    metrics = {"loss": 0.6931 / step, "rewards/accuracies": step / 10, "rewards/margins": 0.123456789 * step,
               "objective/scores": -1.5 + step, "actor/lr": 5e-7 * step, "timing/step": 0.25 + step / 1000,
               "timing/update": 0.123456789, "throughput/tokens_per_s": 1234.5 * step}
    if step % 2 == 0:
        metrics["eval/win_rate"] = step / 20
    return metrics


def log_steps(tracker: MetricsTracker, steps) -> None:
    for step in steps:
        tracker.log(step, synthetic(step))


def test_tensorboard_events_hold_the_jsonl_metrics(tmp_path):
    tracker = MetricsTracker(tmp_path, 6, report_to=["jsonl", "tensorboard"], progress=False)
    log_steps(tracker, range(1, 7))
    tracker.close()
    assert_same_metrics(tensorboard_scalars(tmp_path), jsonl_metrics(tmp_path), "TensorBoard")


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    tracker = MetricsTracker(tmp_path, 6, report_to=["tensorboard"], progress=False)
    log_steps(tracker, range(1, 5))  # steps 3 and 4 came after the last checkpoint (step 2)
    tracker.close()
    resumed = MetricsTracker(tmp_path, 6, report_to=["tensorboard"], progress=False)
    resumed.resume_from(2)
    for step in range(3, 7):
        resumed.log(step, {k: v + 100 for k, v in synthetic(step).items()})  # trained again: other values
    resumed.close()
    scalars = tensorboard_scalars(tmp_path)
    assert_same_metrics(scalars, jsonl_metrics(tmp_path), "TensorBoard after resume")
    assert scalars[3]["loss"] == pytest.approx(100 + 0.6931 / 3)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    for key, value in wandb_offline_env(tmp_path / "wandb_home").items():
        monkeypatch.setenv(key, value)


def test_wandb_offline_run_holds_the_jsonl_metrics_and_the_config(tmp_path, wandb_offline):
    out = tmp_path / "run_dpo"
    tracker = MetricsTracker(out, 4, report_to=["jsonl", "wandb"], run_config=RUN_CONFIG, label="dpo",
                             progress=False)
    log_steps(tracker, range(1, 5))
    tracker.close()
    run = wandb_run(out)
    assert run.directory.parent == out / "wandb"
    assert_same_metrics(run.history, jsonl_metrics(out), "W&B")
    assert run.config == RUN_CONFIG
    assert (run.name, run.project, run.exit_code) == ("dpo-run_dpo", "dpo_rl", 0)


def test_a_failing_stage_marks_its_wandb_run_failed(tmp_path, wandb_offline):
    tracker = MetricsTracker(tmp_path, 4, report_to=["wandb"], progress=False)
    with pytest.raises(RuntimeError):
        try:
            log_steps(tracker, (1, 2))
            raise RuntimeError("a worker died")
        finally:  # as the stages close it
            tracker.close()
    assert wandb_run(tmp_path).exit_code == 1


def test_wandb_names_come_from_the_config_then_the_environment(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from_env")
    monkeypatch.setenv("WANDB_NAME", "env_name")
    tracker = MetricsTracker(tmp_path / "a", 1, report_to=["wandb"], progress=False)
    tracker.log(1, synthetic(1))
    tracker.close()
    run = wandb_run(tmp_path / "a")
    assert (run.name, run.project) == ("env_name", "from_env")
    tracker = MetricsTracker(tmp_path / "b", 1, report_to=["wandb"], wandb_project="mine", run_name="first",
                             progress=False)
    tracker.log(1, synthetic(1))
    tracker.close()
    run = wandb_run(tmp_path / "b")
    assert (run.name, run.project) == ("first", "mine")


def offending_connections(trace: str) -> list[str]:
    """The traced connect/sendto/sendmsg calls to an IP address other than loopback."""
    bad = []
    for line in trace.splitlines():
        if "AF_INET" not in line:
            continue
        addresses = re.findall(r'inet_addr\("([0-9.]+)"\)|inet_pton\(AF_INET6, "([0-9a-f:.]+)"', line)
        if not addresses or any(not (v4.startswith("127.") or v6 in ("::1", "::ffff:127.0.0.1")) for v4, v6 in addresses):
            bad.append(line)
    return bad


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_wandb_offline_connects_to_nothing_beyond_this_machine(tmp_path):
    """Only what a user sets for an offline run (WANDB_MODE=offline; a HOME of its own here): the tracker keeps
    wandb-core's error reports home, and the run talks to wandb-core over a Unix socket only."""
    script = textwrap.dedent(f"""
        from dpo_rl.tracking import MetricsTracker
        tracker = MetricsTracker({str(tmp_path / 'run')!r}, 3, report_to=["wandb"], run_config={{"lr": 0.1}},
                                 progress=False)
        for step in (1, 2, 3):
            tracker.log(step, {{"loss": 1.0 / step, "timing/step": 0.1}})
        tracker.close()
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    trace = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(trace), sys.executable,
                           "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = trace.read_text()
    assert 'sa_family=AF_UNIX, sun_path="' in text, "the trace saw no socket at all; strace did not follow wandb-core"
    assert not offending_connections(text), offending_connections(text)[:5]
    assert wandb_run(tmp_path / "run").history[3] == {"loss": pytest.approx(1 / 3), "timing/step": 0.1}


def test_trackers_are_imported_only_when_listed(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from dpo_rl.tracking import MetricsTracker
        tracker = MetricsTracker({str(tmp_path)!r}, 1, progress=False)
        tracker.log(1, {{"loss": 1.0}})
        tracker.close()
        print(sorted(m for m in ("wandb", "tensorboard", "torch") if m in sys.modules))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=True)
    assert proc.stdout.splitlines()[-1] == "[]"


def test_one_progress_line_every_log_interval_steps_and_at_the_last(tmp_path, capsys):
    tracker = MetricsTracker(tmp_path, 20, log_interval=5, key_metrics=("objective/scores", "loss"),
                             label="ray_online_dpo", progress=False)
    log_steps(tracker, range(1, 21))
    tracker.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[2] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    tracker = MetricsTracker(tmp_path / "odd", 7, log_interval=5, progress=False)
    log_steps(tracker, range(1, 8))
    tracker.close()
    assert [line.split(" ")[2] for line in capsys.readouterr().out.splitlines()] == ["5/7", "7/7"]


def test_the_progress_line_names_the_stage_step_key_metrics_and_eta(tmp_path, capsys):
    clock = iter([100.0, 112.0, 124.0])  # construction, then steps 1 and 2 (12 s apart)
    tracker = MetricsTracker(tmp_path, 10, key_metrics=("loss", "rewards/accuracies"), label="dpo", progress=False,
                             clock=lambda: next(clock))
    log_steps(tracker, (1, 2))
    tracker.close()
    first, second = capsys.readouterr().out.splitlines()
    # the first line's pace is the step's own timing/step; later ones, the wall time per step since the first row
    assert first == "dpo step 1/10 (10%) loss=0.6931 rewards/accuracies=0.1 [0:12<0:02, 0.251s/step]"
    assert second == "dpo step 2/10 (20%) loss=0.3466 rewards/accuracies=0.2 eval/win_rate=0.1 [0:24<1:36, 12s/step]"
