"""Evaluate an editor on CounterFact: `python src/evaluate.py [editor=...] [data.limit=...]` (configs/evaluate.yaml)."""

import hydra

from factedit.cli import setup
from factedit.errors import exit_on_user_error


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from factedit.evaluation.command import run

    setup(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
