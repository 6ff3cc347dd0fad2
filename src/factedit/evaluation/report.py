"""Run outputs: summary.json, a markdown table (overall and per relation) and a bar chart; `compare=[...]`.

Numbers are reported ×100 as in ROME's summarize: scores and magnitudes in percent, GE as
100 × entropy in bits, RS as 100 × cosine.
"""

import json
import math
from pathlib import Path

from factedit.errors import FacteditError
from factedit.evaluation.metrics import GENERATION_KEYS, SCORE_KEYS, SHORT
from factedit.evaluation.probabilities import ZSRE_KEYS
from factedit.io import read_lines, write_json

TABLE_KEYS = (
    "score",
    "efficacy_score",
    "paraphrase_score",
    "neighborhood_score",
    "efficacy_magnitude",
    "paraphrase_magnitude",
    "neighborhood_magnitude",
    "generation_entropy",
    "reference_score",
)
CHART_KEYS = ("score", "efficacy_score", "paraphrase_score", "neighborhood_score")
CHANGE_KEYS = tuple(k for k in SCORE_KEYS if k.endswith("_score"))  # ES, PS, NS (not the magnitudes)


def percent(stage: dict) -> dict:
    """Metric values ×100 (None stays None)."""
    return {key: None if value is None else 100 * value for key, value in stage.items()}


def _scored(lines, stage: str) -> list[dict]:
    """The record lines that carry `stage` ("pre" or "post") scores (failed records carry none)."""
    return [line for line in lines if not line.get("error") and (line.get("scores") or {}).get(stage)]


def _bootstrap_interval(rows, statistic, resamples: int, seed: int):
    """2.5th and 97.5th percentile of `statistic` over resamples of `rows` (records first) drawn with
    replacement; statistic maps (resamples, records, ...) to (resamples, ...). Returns (low, high)."""
    import torch

    picks = torch.randint(len(rows), (resamples, len(rows)), generator=torch.Generator().manual_seed(seed))
    return torch.quantile(statistic(rows[picks]), torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)


def change_from_unedited(lines, resamples: int = 2000, seed: int = 0) -> dict:
    """Post − pre of ES, PS and NS (×100) over the records whose line has both, with a paired
    bootstrap 95% interval: records are resampled with replacement, keeping each record's pre and post
    together, and the interval is the 2.5th-97.5th percentile of the resampled mean changes.
    Returns {metric: {"mean", "low", "high", "records"}}; {} when no line has pre-edit scores."""
    import torch

    pairs = [(line["scores"]["pre"], line["scores"]["post"]) for line in _scored(lines, "pre")]
    if not pairs:
        return {}
    changes = torch.tensor([[post[k] - pre[k] for k in CHANGE_KEYS] for pre, post in pairs], dtype=torch.float64) * 100
    low, high = _bootstrap_interval(
        changes, lambda resampled: resampled.mean(dim=1), resamples, seed
    )  # (metrics,) each
    return {
        key: {"mean": changes[:, i].mean().item(), "low": low[i].item(), "high": high[i].item(), "records": len(pairs)}
        for i, key in enumerate(CHANGE_KEYS)
    }


def score_difference(lines_a, lines_b, resamples: int = 2000, seed: int = 0) -> dict | None:
    """Score(b) − Score(a) (×100, post-edit) over the records both runs measured (matched by case_id),
    with a paired bootstrap 95% interval: each resample draws records with replacement and recomputes
    both Scores (harmonic mean of the mean ES, PS, NS) on the same draw. None when no record is shared."""
    import torch

    from factedit.evaluation.metrics import harmonic_mean

    a, b = (
        {line["case_id"]: line["scores"]["post"] for line in _scored(lines, "post")} for lines in (lines_a, lines_b)
    )
    shared = sorted(set(a) & set(b), key=str)
    if not shared:
        return None
    scores = torch.tensor([[[run[i][k] for k in CHANGE_KEYS] for run in (a, b)] for i in shared], dtype=torch.float64)
    difference = lambda s: (100 * harmonic_mean(s.mean(dim=-3), dim=-1)).diff(dim=-1)[
        ..., 0
    ]  # (..., records, 2, 3) -> (...)
    low, high = _bootstrap_interval(scores, difference, resamples, seed)
    return {"mean": difference(scores).item(), "low": low.item(), "high": high.item(), "records": len(shared)}


def change_line(change: dict) -> str:
    """One markdown line: each metric's change from the unedited model and its 95% interval."""
    parts = [f"{SHORT[k]} {v['mean']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]" for k, v in change.items()]
    records = next(iter(change.values()))["records"]
    return (
        f"Change from the unedited model (paired bootstrap 95% interval over {records} records): "
        + ", ".join(parts)
        + "."
    )


def build_summary(computed: dict, *, info: dict, skipped: list, failed_ids: list, change: dict | None = None) -> dict:
    """summary.json: run info, counts, the metrics ×100 (pre = unedited model, post = after each edit)
    and `change`, post − pre per metric with its bootstrap interval (change_from_unedited)."""
    by_relation = {
        relation: {"records": row["records"], "pre": percent(row["pre"]), "post": percent(row["post"])}
        for relation, row in computed["by_relation"].items()
    }
    return {
        **info,
        "scale": "x100 (percent; GE = 100 x bits, RS = 100 x cosine)",
        "records": computed["records"],
        "failed": computed["failed"],
        "failed_case_ids": failed_ids,
        "skipped": len(skipped),
        "skipped_records": [vars(s) for s in skipped],
        "pre": percent(computed["pre"]),
        "post": percent(computed["post"]),
        "change": change or {},
        "by_relation": by_relation,
    }


def _cell(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def table_rows(summaries: list[dict], with_unedited: bool = True) -> list[tuple[str, int, dict]]:
    """(label, records, metrics) rows: the unedited model (from the first run with pre-edit numbers), then each run."""
    rows = []
    if with_unedited:
        for summary in summaries:
            if summary["pre"].get("efficacy_score") is not None:
                unedited = dict(summary["pre"])
                none_run = next((s for s in summaries if s.get("editor") == "none"), None)
                if none_run is not None:  # generation numbers of the unedited model come from an editor=none run
                    unedited.update({k: none_run["post"].get(k) for k in GENERATION_KEYS})
                rows.append(("unedited", summary["records"], unedited))
                break
    for summary in summaries:
        rows.append((summary.get("label") or summary.get("editor", "?"), summary["records"], summary["post"]))
    return rows


def markdown_table(rows: list[tuple[str, int, dict]]) -> str:
    header = "| editor | records | " + " | ".join(SHORT[k] for k in TABLE_KEYS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(TABLE_KEYS)]
    for label, records, metrics in rows:
        lines.append(f"| {label} | {records} | " + " | ".join(_cell(metrics.get(k)) for k in TABLE_KEYS) + " |")
    return "\n".join(lines)


def accuracy_table(summary: dict) -> str:
    """zsRE: efficacy, paraphrase, specificity and portability accuracy, unedited and after the edits."""
    rows = [("unedited", summary["pre"]), (summary.get("label") or summary.get("editor", "?"), summary["post"])]
    lines = ["| editor | " + " | ".join(SHORT[k] for k in ZSRE_KEYS) + " |", "|---|" + "---:|" * len(ZSRE_KEYS)]
    lines += [f"| {label} | " + " | ".join(_cell(stage.get(k)) for k in ZSRE_KEYS) + " |" for label, stage in rows]
    return "\n".join(lines)


def relation_table(summary: dict) -> str:
    """Per relation: records, then Score / ES / PS / NS before → after."""
    keys = ("score",) + CHANGE_KEYS
    lines = [
        "| relation | records | " + " | ".join(f"{SHORT[k]} pre → post" for k in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for relation, row in sorted(summary["by_relation"].items()):
        cells = [f"{_cell(row['pre'].get(k))} → {_cell(row['post'].get(k))}" for k in keys]
        lines.append(f"| {relation} | {row['records']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_markdown(summary: dict) -> str:
    zsre = summary["post"].get("efficacy_accuracy") is not None
    title = f"# {'zsRE' if zsre else 'CounterFact'} evaluation: {summary.get('editor')} on {summary.get('model')}"
    counts = (
        f"{summary['records']} records evaluated, {summary['failed']} failed to edit, "
        f"{summary['skipped']} malformed and skipped ({summary.get('data')})."
    )
    parts = [title, counts]
    if zsre:  # zsRE's own measure first: top-1 token accuracy of the answer
        parts += ["Top-1 token accuracy of the answer (%):", accuracy_table(summary), "CounterFact-style scores:"]
    parts.append(markdown_table(table_rows([summary])))
    if summary.get("change"):
        parts.append(change_line(summary["change"]))
    return "\n\n".join(parts + ["## Per relation", relation_table(summary)]) + "\n"


def bar_chart(rows: list[tuple[str, int, dict]], path: Path, title: str = "CounterFact") -> None:
    """Grouped bars: one group per metric (Score, ES, PS, NS), one bar per row (editor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(CHART_KEYS), 3.6))
    width = 0.8 / max(len(rows), 1)
    for index, (label, _, metrics) in enumerate(rows):
        values = [metrics.get(k) or 0.0 for k in CHART_KEYS]
        positions = [g + (index - (len(rows) - 1) / 2) * width for g in range(len(CHART_KEYS))]
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(CHART_KEYS)), [SHORT[k] for k in CHART_KEYS])
    ax.set_ylim(0, 110)
    ax.set_ylabel("% (higher is better)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(len(rows), 6), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_report(out_dir: Path, summary: dict) -> str:
    """summary.json, summary.md and summary.png in out_dir; returns the markdown."""
    write_json(out_dir / "summary.json", summary)
    text = run_markdown(summary)
    (out_dir / "summary.md").write_text(text)
    bar_chart(
        table_rows([summary]),
        out_dir / "summary.png",
        f"{summary.get('editor')} on {summary.get('model')} ({summary['records']} records)",
    )
    return text


# ---------------------------------------------------------------- compare=[runA, runB]


def load_summary(run, root: Path) -> dict:
    """summary.json of a run given by name (under root), folder or file."""
    candidates = [Path(str(run)), Path(str(run)) / "summary.json", root / str(run) / "summary.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FacteditError(f"no summary.json for run {run!r} (looked in {root / str(run)}): finish that run first")
    summary = json.loads(path.read_text())
    summary["label"] = summary.get("label") or summary.get("editor")
    summary["_dir"] = str(path.parent)  # where its records.jsonl is
    if "change" not in summary:  # a run summarized before `change` existed
        summary["change"] = change_from_unedited(read_lines(path.parent / "records.jsonl"))
    return summary


def score_lines(summaries: list[dict]) -> list[str]:
    """One line per other run: its Score against the run of highest Score, on the records both measured."""
    if len(summaries) < 2:
        return []
    best = max(summaries, key=lambda s: s["post"].get("score") or 0.0)
    lines = {id(s): read_lines(Path(s["_dir"]) / "records.jsonl") for s in summaries}
    out = []
    for summary in summaries:
        difference = None if summary is best else score_difference(lines[id(summary)], lines[id(best)])
        if difference:
            out.append(
                f"Score of {best['label']} − {summary['label']} on the {difference['records']} records both measured: "
                f"{difference['mean']:+.1f} [{difference['low']:+.1f}, {difference['high']:+.1f}] "
                "(paired bootstrap 95%)."
            )
    return out


def compare(runs, root: Path, chart: Path | None = None) -> str:
    """The side-by-side markdown table of finished runs (and a bar chart when `chart` is given)."""
    summaries = [load_summary(run, root) for run in runs]
    labels = [s["label"] for s in summaries]
    for summary in summaries:  # the same editor twice (e.g. two models): tell the rows apart by run folder
        if labels.count(summary["label"]) > 1:
            summary["label"] = f"{summary['label']} ({summary.get('run')})"
    rows = table_rows(summaries)
    models = sorted({str(s.get("model")) for s in summaries})
    if chart is not None:
        bar_chart(rows, chart, f"CounterFact, {', '.join(models)}")
    note = "Records per run: " + ", ".join(f"{s['label']} {s['records']}" for s in summaries) + "."
    changes = [
        f"{s['label']}: {change_line(s['change'])}" for s in summaries if s.get("change") and s.get("editor") != "none"
    ]
    changes += score_lines(summaries)
    files = sorted({Path(str(s.get("data"))).name for s in summaries})
    if len(files) > 1:
        note += f" Careful: the runs measured different data files ({', '.join(files)}); "
        note += "the unedited row is the first run's."
    return "\n\n".join([markdown_table(rows), note] + changes)
