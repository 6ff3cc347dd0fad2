"""Causal tracing, where a model recalls a fact (ROME §2): `python src/trace.py fact=eiffel_rome`,
or `python src/trace.py mode=aggregate data.limit=30` for average indirect effects (see configs/trace.yaml)."""

import hydra

from factedit.cli import setup
from factedit.errors import exit_on_user_error


@hydra.main(config_path="../configs", config_name="trace", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from factedit.tracing.command import run

    setup(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
