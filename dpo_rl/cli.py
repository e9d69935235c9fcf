"""``ray_gpt.py``'s command line: check before Hydra writes anything, and end every failure with one message.

Before ``@hydra.main`` takes over (it creates the run directory, writes ``.hydra/`` and opens a log there), a
preflight composes the same config with Hydra's compose API and validates it: a YAML syntax error becomes
``file:line:column: problem``, a bad override Hydra's one line (with the documented key it was probably
meant to be), and every configuration problem, an unwritable or finished output directory included, is
reported before anything is written or started. Arguments that only Hydra understands (``--cfg``, ``-m``,
``--help`` ...) skip the preflight and go to Hydra as they are.

Exit status: 0 done (or nothing to do), 2 a configuration problem or a failed run (one message), 130 Ctrl-C.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from dpo_rl.errors import ConfigError, Interrupted, NothingToDo, RunFailed

ROOT = Path(__file__).resolve().parents[1]
PRIMARY_CONFIG_DIR = ROOT / "configs" / "rlxf"
_VALUE_FLAGS = {"--config-name": "name", "-cn": "name", "--config-dir": "dir", "-cd": "dir",
                "--config-path": "path", "-cp": "path"}


def parse_args(argv: Sequence[str]) -> Optional[tuple[Optional[str], Optional[str], Optional[str], list[str]]]:
    """(config name, extra config dir, config path, overrides) of a plain run; ``None`` for arguments only Hydra
    handles (``--cfg job``, ``-m``, ``--help`` ...)."""
    found: dict[str, Optional[str]] = {"name": None, "dir": None, "path": None}
    overrides: list[str] = []
    items = list(argv)
    while items:
        item = items.pop(0)
        flag, eq, value = item.partition("=")
        if flag in _VALUE_FLAGS:
            if not eq:
                if not items:
                    return None
                value = items.pop(0)
            found[_VALUE_FLAGS[flag]] = value
        elif item.startswith("-"):
            return None
        else:
            overrides.append(item)
    return found["name"], found["dir"], found["path"], overrides


def yaml_error_line(err: BaseException) -> Optional[str]:
    """``file:line:column: problem (context)`` of a PyYAML error, or ``None`` if ``err`` is not one."""
    import yaml  # deferred: only a failed composition needs it

    if not isinstance(err, yaml.YAMLError):
        return None
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark else "a YAML file"
    started = (f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
               if context and context_mark else "")
    return f"{where}: YAML syntax error: {problem}{started}"


def composition_problem(err: BaseException) -> str:
    """One line for a failed Hydra composition: a YAML error's position, or Hydra's message with the
    documented key a typo was probably meant to be."""
    line = yaml_error_line(err)
    if line:
        return line
    from dpo_rl.config.overrides import did_you_mean

    message = " ".join(str(err).split())
    return did_you_mean(message) or message


def unparsable_override(overrides: Sequence[str]) -> Optional[str]:
    """The first override Hydra's grammar cannot parse, named with the parser's complaint (Hydra's own message
    does not say which one)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except OverrideParseException as err:
            reason = str(err).splitlines()[0].strip()
            return (f"the override {item.removeprefix('++')!r} is not Hydra syntax ({reason}); quote lists and special characters "
                    "for your shell, e.g. 'key=[1,2]' (https://hydra.cc/docs/advanced/override_grammar/basic)")
    return None


def compose_for_preflight(name: str, config_dir: Optional[str], config_path: Optional[str], overrides: list[str]):
    """The config ``ray_gpt.py`` will run, composed from the same directories as ``@hydra.main`` (the config path
    and ``--config-dir``; Hydra prefers the former for a name both hold, this the latter)."""
    from dpo_rl.config.compose import compose

    primary = Path(config_path) if config_path else PRIMARY_CONFIG_DIR
    if not primary.is_absolute():
        primary = ROOT / primary
    if config_dir:
        primary, extra = Path(config_dir).resolve(), [f"hydra.searchpath=[file://{primary}]"]
    else:
        extra = []
    return compose(name, list(overrides) + extra, config_dir=primary)


def preflight(argv: Sequence[str]) -> None:
    """Everything that can be checked before Hydra and Ray start: raises :class:`ConfigError` (one line per
    problem) or :class:`NothingToDo`; returns quietly for arguments only Hydra handles."""
    parsed = parse_args(argv)
    if parsed is None or parsed[0] is None:
        return
    name, config_dir, config_path, overrides = parsed
    from hydra.errors import HydraException

    try:
        cfg = compose_for_preflight(name, config_dir, config_path, overrides)
    except Exception as err:  # noqa: BLE001 - YAML and Hydra errors: reported as one line
        import yaml  # deferred: only a failed composition needs it

        if isinstance(err, (yaml.YAMLError, HydraException)):
            raise ConfigError([unparsable_override(overrides) or composition_problem(err)]) from None
        raise
    from dpo_rl.trainer.common import config_yaml
    from dpo_rl.trainer.run import resolve
    from dpo_rl.trainer.run_directory import plan_run_directory, writable_problem

    try:
        c = resolve(cfg)
    except ConfigError as err:  # report an unusable output directory with the rest, not after they are fixed
        output_dir = cfg.get("training", {}).get("output_dir")
        extra = writable_problem("training.output_dir", Path(output_dir)) if isinstance(output_dir, str) else None
        raise ConfigError(err.problems + ([extra] if extra else [])) from None
    plan_run_directory(c, config_yaml(cfg))


def resume_command(argv: Sequence[str]) -> str:
    """The command that resumes this run from its last checkpoint (overrides as the user wrote them)."""
    from dpo_rl.config.overrides import documented_keys

    known = documented_keys()
    written = [a[2:] if a.startswith("++") and a[2:].split("=", 1)[0] in known else a for a in argv]
    kept = [a for a in written if a.lstrip("+").split("=", 1)[0] != "training.resume"]
    return shlex.join([sys.executable.rsplit("/", 1)[-1], "ray_gpt.py", *kept, "training.resume=auto"])


def report(err: BaseException, argv: Sequence[str]) -> int:
    """Print ``err`` as the one message it is meant to be; returns the exit status."""
    if isinstance(err, NothingToDo):
        print(f"ray_gpt.py: {err}")
        return 0
    if isinstance(err, KeyboardInterrupt):
        print("ray_gpt.py: interrupted (Ctrl-C) outside the training steps (start-up, evaluation or export); the "
              "checkpoints written so far are kept", file=sys.stderr)
        return 130
    message = f"ray_gpt.py: {err}"
    if isinstance(err, RunFailed) and err.resumable:
        message += f"\nto resume: {resume_command(argv)}"
    print(message, file=sys.stderr)
    return 130 if isinstance(err, Interrupted) else 2


def run_reporting(cfg, argv: Sequence[str]) -> int:
    """``run(cfg)`` with every expected failure reported as one message; returns the exit status."""
    from dpo_rl.trainer.run import run

    logging.getLogger("dpo_rl").setLevel(logging.INFO)
    try:
        run(cfg)
    except (ConfigError, RunFailed, NothingToDo, KeyboardInterrupt) as err:
        return report(err, argv)
    return 0
