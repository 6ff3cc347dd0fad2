"""Edit a fact with ROME: `python src/edit.py fact=eiffel_rome` (see configs/edit.yaml)."""

from factedit.cli import entry


def run(cfg):
    from factedit.rome.command import run

    run(cfg)


if __name__ == "__main__":
    entry("edit", run)
