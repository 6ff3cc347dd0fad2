"""Causal tracing, where a model recalls a fact (ROME §2): `python src/trace.py fact=eiffel_rome`,
or `python src/trace.py mode=aggregate data.limit=30` for average indirect effects (see configs/trace.yaml)."""

from factedit.cli import entry


def run(cfg):
    from factedit.tracing.command import run

    run(cfg)


if __name__ == "__main__":
    entry("trace", run)
