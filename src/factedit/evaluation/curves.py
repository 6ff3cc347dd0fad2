"""Curves of lifelong-editing runs (evaluation/sequential.py): a table and a figure against the number of edits.

curve_report(out_dir, lines)     curve.md and curve.png of one run (and its retention: retention.png); returns the table
compare_curves(run_dirs, path)   one figure, one line per run (the editors side by side), and beside it
                                 <path>_tradeoff.png: each run's efficacy against its perplexity, edit by edit
retention(out_dir)               efficacy of each step's records at each checkpoint, from records/<edits>.jsonl
"""

import math
from dataclasses import dataclass, field
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
    firsts = {label: min(lines, key=lambda line: line["edits"]) for label, lines in runs.items() if lines}
    ratios = [line["perplexity"] / firsts[label]["perplexity"] for label, lines in runs.items() for line in lines]
    if max(ratios, default=1.0) > 3:  # one collapsed run would flatten the others' lines
        axes[1, 1].set_yscale("log")
        axes[1, 1].set_title("WikiText perplexity ÷ unedited (log scale)", fontsize=9)
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
    """curve.md and curve.png of one run (with the retention table and retention.png when the run has
    records/); returns the curve table."""
    lines = sorted(lines, key=lambda line: line["edits"])
    table = curve_table(lines)
    text = f"# Lifelong editing: {out_dir.name}\n\n{table}\n"
    kept = retention(out_dir)
    if kept.matrix:
        text += f"\n## {kept.score} of each step's records at each checkpoint\n\n{retention_table(kept)}\n"
        plot_retention(kept, out_dir / "retention.png", out_dir.name)
    (out_dir / "curve.md").write_text(text)
    plot_curves({out_dir.name: lines}, out_dir / "curve.png")
    return table


@dataclass
class Retention:
    """matrix[c][s]: mean efficacy (×100) at the checkpoint after c edits of the records step s wrote;
    steps: (first, last) record number of each step (1-based); score: its name (ES, or Eff on zsRE)."""

    matrix: dict[int, dict[int, float]] = field(default_factory=dict)
    steps: dict[int, tuple[int, int]] = field(default_factory=dict)
    score: str = "ES"


def retention(out_dir: Path) -> Retention:
    """Retention of a run from its records/<edits>.jsonl files (each line: a record's scores and its step)."""
    kept = Retention()
    files = [path for path in (out_dir / "records").glob("*.jsonl") if path.stem.isdigit()]
    for path in sorted(files, key=lambda path: int(path.stem)):
        by_step: dict[int, list[float]] = {}
        for line in read_lines(path):
            key = "efficacy_score" if "efficacy_score" in line else "efficacy_accuracy"
            kept.score = "ES" if key == "efficacy_score" else "Eff"
            by_step.setdefault(int(line["step"]), []).append(line[key])
        kept.matrix[int(path.stem)] = {step: 100 * sum(v) / len(v) for step, v in sorted(by_step.items())}
        first = 1
        for step, values in sorted(by_step.items()):  # records are written in order, len(values) per step
            kept.steps[step] = (first, first + len(values) - 1)
            first += len(values)
    return kept


def retention_table(kept: Retention) -> str:
    """Markdown: a row per step (the records it wrote), a column per checkpoint."""
    checkpoints = sorted(kept.matrix)
    head = ["records written", *(f"after {c}" for c in checkpoints)]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(checkpoints)]
    for step, (first, last) in sorted(kept.steps.items()):
        cells = [_cell(kept.matrix[c].get(step)) if step in kept.matrix[c] else "" for c in checkpoints]
        rows.append(f"| {first}-{last} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_retention(kept: Retention, path: Path, title: str) -> None:
    """Heatmap: rows = the step that wrote the records, columns = checkpoints, colour = efficacy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    checkpoints, steps = sorted(kept.matrix), sorted(kept.steps)
    grid = np.full((len(steps), len(checkpoints)), np.nan)
    for j, c in enumerate(checkpoints):
        for i, step in enumerate(steps):
            grid[i, j] = kept.matrix[c].get(step, np.nan)
    fig, ax = plt.subplots(figsize=(1.2 + 0.62 * len(checkpoints), 1.2 + 0.42 * len(steps)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            colour = "white" if value < 60 else "black"
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(checkpoints)), [str(c) for c in checkpoints], fontsize=7)
    ax.set_yticks(range(len(steps)), [f"{kept.steps[s][0]}-{kept.steps[s][1]}" for s in steps], fontsize=7)
    ax.set_xlabel("edits so far (checkpoint)", fontsize=8)
    ax.set_ylabel("records written by the step", fontsize=8)
    ax.set_title(f"{title}: {kept.score} of each step's records", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trade_off(lines: list[dict]) -> list[tuple[int, float, float]]:
    """(edits, perplexity ÷ unedited, retained efficacy ×100) at each checkpoint after the first, in order of edits;
    efficacy is ES, or Eff on zsRE."""
    lines = sorted(lines, key=lambda line: line["edits"])
    points = []
    for line in lines[1:]:
        efficacy = next((line["retained"][k] for k in ("efficacy_score", "efficacy_accuracy") if k in line["retained"]),
                        math.nan)  # fmt: skip
        points.append((line["edits"], line["perplexity"] / lines[0]["perplexity"], efficacy))
    return points


def plot_trade_off(runs: dict[str, list[dict]], path: Path) -> None:
    """Retained efficacy (y) against perplexity ÷ unedited (x), one line per run through its checkpoints, each
    point marked with its number of edits: where a setting buys efficacy with fluency, and how fast it pays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for label, lines in runs.items():
        points = trade_off(lines)
        if not points:
            continue
        line = ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=label)[0]
        for edits, ratio, efficacy in points:
            ax.annotate(str(edits), (ratio, efficacy), fontsize=6, color=line.get_color(), xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ratios = [p[1] for lines in runs.values() for p in trade_off(lines)]
    if max(ratios, default=1.0) > 3:  # one collapsed run would squeeze the others against the axis
        ax.set_xscale("log")
    ax.set_xlabel("WikiText perplexity ÷ unedited")
    ax.set_ylabel("retained efficacy (ES, or Eff on zsRE)")
    ax.set_title("efficacy against fluency, checkpoint by checkpoint (labels: edits)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_curves(run_dirs: list[Path], path: Path) -> str:
    """One figure with a line per run, the trade-off figure beside it (<stem>_tradeoff.png), and the runs'
    tables one after another."""
    runs = {Path(d).name: sorted(read_lines(Path(d) / "curve.jsonl"), key=lambda line: line["edits"]) for d in run_dirs}
    plot_curves(runs, path)
    plot_trade_off(runs, path.with_name(f"{path.stem}_tradeoff.png"))
    return "\n\n".join(f"### {name}\n\n{curve_table(lines)}" for name, lines in runs.items())
