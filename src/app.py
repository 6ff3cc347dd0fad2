"""factedit in the browser: `python src/app.py [model=...] [port=8123]` (see configs/app.yaml, docs/app.md)."""

from factedit.cli import entry


def run(cfg):
    from factedit.app.command import run

    run(cfg)


if __name__ == "__main__":
    entry("app", run)
