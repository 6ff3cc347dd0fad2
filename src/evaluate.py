"""Evaluate an editor on CounterFact: `python src/evaluate.py [editor=...] [data.limit=...]` (configs/evaluate.yaml)."""

from factedit.cli import entry


def run(cfg):
    from factedit.evaluation.command import run

    run(cfg)


if __name__ == "__main__":
    entry("evaluate", run)
