"""Entry point: ``python ray_gpt.py --config-name online_dpo_trainer_<model> [overrides]``.

Composes the Hydra config from configs/rlxf (or ``--config-dir``), then hands it to
:func:`dpo_rl.trainer.run.run`, which validates it before Ray starts. A preflight
(:func:`dpo_rl.cli.preflight`) checks the same config before Hydra writes anything; every expected
failure prints one message and exits 2 (:mod:`dpo_rl.cli`).
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs/rlxf", config_name=None, version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dpo_rl.cli import run_reporting

    status = run_reporting(cfg, sys.argv[1:])
    if status:
        sys.exit(status)


if __name__ == "__main__":
    from dpo_rl.cli import preflight, report
    from dpo_rl.config.overrides import settable_as_written
    from dpo_rl.errors import ConfigError, NothingToDo

    sys.argv[1:] = settable_as_written(sys.argv[1:])  # documented keys need no "+" (docs/config_reference.md)
    try:
        preflight(sys.argv[1:])
    except (ConfigError, NothingToDo, KeyboardInterrupt) as err:
        sys.exit(report(err, sys.argv[1:]))
    main()
