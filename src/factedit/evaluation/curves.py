"""Curves of lifelong-editing runs (evaluation/sequential.py): a table and a figure against the number of edits.

curve_report(out_dir, lines)     curve.md and curve.png of one run; returns the table
compare_curves(run_dirs, path)   one figure, one line per run (the editors side by side)
"""

import math
from pathlib import Path

from factedit.io import read_lines

# (column, where in a curve line, key): CounterFact first, zsRE's token accuracies after
COLUMNS = [
    ("ES", "retained", "efficacy_score"), ("PS", "retained", "paraphrase_score"),
    ("NS", "retained", "neighborhood_score"), ("NS unedited", "retained_unedited", "neighborhood_score"),
    ("control NS", "control", "neighborhood_score"), ("control NS unedited", "control_unedited", "neighborhood_score"),
    ("Eff", "retained", "efficacy_accuracy"), ("Par", "retained", "paraphrase_accuracy"),
    ("Spe", "retained", "neighborhood_accuracy"), ("Spe unedited", "retained_unedited", "neighborhood_accuracy"),
    ("Port", "retained", "portability_accuracy"), ("control Spe", "control", "neighborhood_accuracy"),
]  # fmt: skip
PANELS = [("efficacy (retained)", ("efficacy_score", "efficacy_accuracy")),
          ("generalization (retained)", ("paraphrase_score", "paraphrase_accuracy")),
          ("specificity (retained)", ("neighborhood_score", "neighborhood_accuracy")),
          ("control specificity", ("neighborhood_score", "neighborhood_accuracy"))]  # fmt: skip


def curve_table(lines: list[dict]) -> str:
    """Markdown: a row per checkpoint; scores ×100, perplexity and entropy as ratios to the 0-edit row."""
    first = next((line for line in lines if line["edits"] == 0), lines[0])
    columns = [
        c for c in COLUMNS if any(not math.isnan(line[c[1]].get(c[2], math.nan)) for line in lines if line[c[1]])
    ]
    head = ["edits", *(c[0] for c in columns), "perplexity", "× unedited", "entropy", "× unedited", "max ‖ΔW‖/‖W‖"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for line in lines:
        cells = [str(line["edits"]), *(_cell(line[where].get(key)) for _, where, key in columns)]
        entropy, perplexity = line["generation_entropy"], line["perplexity"]
        drift = max(line["drift"].values(), default=0.0)
        cells += [f"{perplexity:.2f}", f"{perplexity / first['perplexity']:.3f}", f"{entropy:.3f}",
                  f"{entropy / first['generation_entropy']:.3f}", f"{drift:.4f}"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    """Four panels of retained / control scores and two of fluency, x = edits, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for label, lines in runs.items():
        lines = sorted(lines, key=lambda line: line["edits"])
        edits = [line["edits"] for line in lines]
        for ax, (title, keys) in zip(axes.flat, PANELS):
            where = "control" if title.startswith("control") else "retained"
            values = [next((line[where][k] for k in keys if k in line[where]), math.nan) for line in lines]
            ax.plot(edits, values, marker="o", label=label)
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 105)
        first = lines[0]
        axes[1, 1].plot(edits, [line["perplexity"] / first["perplexity"] for line in lines], marker="o", label=label)
        axes[1, 2].plot(edits, [line["generation_entropy"] / first["generation_entropy"] for line in lines], marker="o")
    axes[1, 1].set_title("WikiText perplexity ÷ unedited", fontsize=9)
    axes[1, 2].set_title("generation entropy ÷ unedited", fontsize=9)
    last = max((line["edits"] for lines in runs.values() for line in lines), default=0)
    for ax in axes.flat:
        ax.set_xlim(-0.02 * last, 1.04 * last + 1)  # every panel from 0 edits, also with one point
        ax.set_xlabel("edits", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_report(out_dir: Path, lines: list[dict]) -> str:
    """curve.md and curve.png of one run; returns the table."""
    lines = sorted(lines, key=lambda line: line["edits"])
    table = curve_table(lines)
    (out_dir / "curve.md").write_text(f"# Lifelong editing: {out_dir.name}\n\n{table}\n")
    plot_curves({out_dir.name: lines}, out_dir / "curve.png")
    return table


def compare_curves(run_dirs: list[Path], path: Path) -> str:
    """One figure with a line per run, and the runs' tables one after another."""
    runs = {Path(d).name: sorted(read_lines(Path(d) / "curve.jsonl"), key=lambda line: line["edits"]) for d in run_dirs}
    plot_curves(runs, path)
    return "\n\n".join(f"### {name}\n\n{curve_table(lines)}" for name, lines in runs.items())
