"""Entry point: ``python ray_gpt.py --config-name online_dpo_trainer_<model> [overrides]``.

Composes the Hydra config from configs/rlxf (or ``--config-dir``), then hands it to
:func:`dpo_rl.trainer.run.run`, which validates it before Ray starts. Configuration
errors print every problem and exit with status 2.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from dpo_rl.errors import ConfigError, TrainingStopped


@hydra.main(config_path="configs/rlxf", config_name=None, version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dpo_rl.trainer.run import run

    logging.getLogger("dpo_rl").setLevel(logging.INFO)
    try:
        run(cfg)
    except ConfigError as err:
        print(f"ray_gpt.py: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as err:
        print(f"ray_gpt.py: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from dpo_rl.config.overrides import settable_as_written

    sys.argv[1:] = settable_as_written(sys.argv[1:])  # documented keys need no "+" (docs/config_reference.md)
    main()
