"""Figures of causal tracing with matplotlib (Agg): per-fact heatmaps (ROME Fig. 1) and average
indirect effects per token bucket and layer (ROME Fig. 2)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TITLES = {
    "hidden": "single hidden states",
    "mlp": "MLP outputs, window {window}",
    "attn": "attention outputs, window {window}",
}
COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def _save(fig, stem: Path) -> list[Path]:
    """Write stem.png (small, for the README) and stem.pdf; close the figure."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def token_labels(tokens: list[str], subject_range) -> list[str]:
    """Tokens as printable labels, subject tokens marked with a *."""
    start, end = subject_range
    labels = [repr(token)[1:-1] if token.strip() else repr(token) for token in tokens]
    return [label + "*" if start <= i < end else label for i, label in enumerate(labels)]


def plot_heatmap(result: dict, kind: str, stem: Path, model_name: str = "") -> list[Path]:
    """Heatmap of one kind of restoration: tokens down, layers across, colour = P(target) restored."""
    scores = np.array(result["scores"][kind])  # (T, L)
    n_tokens, n_layers = scores.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.14 * n_layers, 0.9 + 0.24 * n_tokens))
    mesh = ax.pcolormesh(scores, cmap=COLORMAPS[kind], vmin=min(scores.min(), result["corrupted_prob"]))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(n_tokens) + 0.5, token_labels(result["tokens"], result["subject_range"]), fontsize=8)
    step = 5 if n_layers > 12 else 1
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5, range(0, n_layers, step), fontsize=8)
    ax.set_xlabel("layer", fontsize=9)
    prefix = f"{model_name}: " if model_name else ""
    ax.set_title(
        f"{prefix}restoring {TITLES[kind].format(window=result['window'])}\n"
        f"clean p={result['clean_prob']:.3f}, corrupted p={result['corrupted_prob']:.3f}",
        fontsize=9,
    )
    colorbar = fig.colorbar(mesh, ax=ax)
    colorbar.set_label(f"p({result['target'].strip()})", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    return _save(fig, Path(stem))


def plot_effect_lines(summary: dict, stem: Path) -> list[Path]:
    """Average indirect effect per layer, one line per token bucket, one panel per kind (ROME Fig. 2)."""
    kinds = list(summary["effects"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.0), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for bucket, values in summary["effects"][kind].items():
            effect = np.array(values["aie"], dtype=float)
            style = "-" if bucket in ("last subject token", "last token") else "--"
            ax.plot(range(len(effect)), effect, style, label=f"{bucket} (n={values['count']})", linewidth=1.4)
        ax.set_title(f"restoring {TITLES[kind].format(window=summary['window'])}", fontsize=9)
        ax.set_xlabel("layer", fontsize=9)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("average indirect effect", fontsize=9)
    fig.suptitle(
        f"{summary['model']}: {summary['n_facts']} known CounterFact facts, average total effect "
        f"{summary['total_effect']:.3f}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(
        *axes[0][0].get_legend_handles_labels(),
        loc="lower center",
        ncol=len(summary["effects"][kinds[0]]),
        fontsize=7,
        frameon=False,
    )
    return _save(fig, Path(stem))


def plot_effect_heatmaps(summary: dict, stem: Path) -> list[Path]:
    """AIE as bucket × layer heatmaps, one per kind (the paper's Fig. 2 a–c)."""
    kinds = list(summary["effects"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 2.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        buckets = list(summary["effects"][kind])
        grid = np.array([summary["effects"][kind][b]["aie"] for b in buckets], dtype=float)
        mesh = ax.pcolormesh(np.nan_to_num(grid), cmap=COLORMAPS[kind], vmin=0)  # negative effects: white
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(buckets)) + 0.5, buckets if ax is axes[0][0] else [], fontsize=7)
        step = 5 if grid.shape[1] > 12 else 1
        ax.set_xticks(np.arange(0, grid.shape[1], step) + 0.5, range(0, grid.shape[1], step), fontsize=7)
        ax.set_title(f"AIE, {TITLES[kind].format(window=summary['window'])}", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        fig.colorbar(mesh, ax=ax).ax.tick_params(labelsize=7)
    fig.suptitle(f"{summary['model']}: {summary['n_facts']} facts", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(stem))
