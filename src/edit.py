"""Edit a fact with ROME: `python src/edit.py fact=eiffel_rome` (see configs/edit.yaml)."""

import hydra

from factedit.cli import setup
from factedit.errors import exit_on_user_error


@hydra.main(config_path="../configs", config_name="edit", version_base="1.3")
@exit_on_user_error
def main(cfg):
    from factedit.rome.command import run

    setup(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
