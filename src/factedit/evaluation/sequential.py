"""Lifelong editing: edits applied in order, never restored, measured as they pile up (`evaluate.py sequential=true`).

A step writes `batch_size` records on the weights the earlier steps left (MEMIT: one batch; ROME: one
fact after another). After every `checkpoint_every` edits, and after the last, a checkpoint measures
the weights as they stand:

    retained   ES / PS / NS and magnitudes (CounterFact) or token accuracies (zsRE) over every record
               edited so far, beside the same records on the unedited model
    control    the same scores of `control_records` records never edited (the end of the data file)
    fluency    generation entropy of fixed prompts, perplexity of a fixed WikiText-2 slice
    drift      ‖ΔW‖ / ‖W‖ of each edited matrix

Each checkpoint is one line of curve.jsonl; curve.md and curve.png show them against the number of
edits (`compare=[...]` of sequential runs draws one line per run). The retained scores of every record
at checkpoint n, with the step that wrote it, go to records/n.jsonl: curve.md's retention table and
retention.png show each step's efficacy at every later checkpoint (does an old edit survive?).
The run's edits are saved after every step in one file with the step count and the null-space
state (run.safetensors), so a killed run continues from its last step and ends with the same
weights, bit for bit.
"""

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import lightning
import torch
from torchmetrics import MeanMetric

from factedit.data.counterfact import CounterFactDataModule
from factedit.errors import FacteditError
from factedit.evaluation.command import is_zsre
from factedit.evaluation.curves import curve_report
from factedit.evaluation.generation import generate_texts, generation_entropy
from factedit.evaluation.probabilities import ZSRE_KEYS, measure_record, record_scores, zsre_scores
from factedit.io import append_line, read_lines, write_lines
from factedit.rome.edits import Edit, apply_edits, load_edits_and_extras, save_edits

log = logging.getLogger(__name__)
SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude", "paraphrase_magnitude",
          "neighborhood_magnitude")  # fmt: skip


class RecordScores(lightning.LightningModule):
    """Scores of records on the model as it is (no edit), in a Lightning test loop: `means` after trainer.test."""

    def __init__(self, model, tokenizer, keys: tuple[str, ...], zsre: bool):
        super().__init__()
        self.model, self.tokenizer, self.zsre = model, tokenizer, zsre
        self.metrics = torch.nn.ModuleDict({key: MeanMetric(nan_strategy="ignore") for key in keys})
        self.lines, self.means = [], {}

    def test_step(self, batch, batch_idx):
        (record,) = batch
        scores = self.score(record)
        self.lines.append({"case_id": record.case_id, **scores})
        for key, metric in self.metrics.items():
            metric.update(torch.tensor(scores[key], dtype=torch.float64))

    def score(self, record) -> dict[str, float]:
        if self.zsre:
            return zsre_scores(self.model, self.tokenizer, record)
        return record_scores(measure_record(self.model, self.tokenizer, record))

    def on_test_epoch_end(self):
        self.means = {key: 100 * float(metric.compute()) for key, metric in self.metrics.items()}


def score_records(model, tokenizer, records, zsre: bool) -> tuple[dict, list[dict]]:
    """(means ×100, per-record lines) of `records` on the weights as they are."""
    if not records:
        return {}, []
    scorer = RecordScores(model, tokenizer, ZSRE_KEYS if zsre else SCORES, zsre)
    trainer = lightning.Trainer(accelerator="gpu" if model.device.type == "cuda" else "cpu", devices=1, logger=False,
                                enable_progress_bar=len(records) >= 50, enable_model_summary=False)  # fmt: skip
    trainer.test(scorer, datamodule=CounterFactDataModule(records), verbose=False)
    model.eval()
    return scorer.means, scorer.lines


@torch.no_grad()
def perplexity(model, tokenizer, tokens: int, seq_len: int = 512) -> float:
    """exp(mean token NLL) over the first `tokens` tokens of WikiText-2 test (rows of seq_len, a fixed slice)."""
    from factedit.data.wikipedia import WikipediaDataModule

    rows = WikipediaDataModule(tokenizer, "wikitext", max_tokens=tokens, seq_len=seq_len, seed=0).local_rows
    total, count = 0.0, 0
    for row in rows.split(4):
        logits = model(input_ids=row.to(model.device), use_cache=False).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), row[:, 1:].flatten().to(model.device), reduction="sum"
        )
        total, count = total + float(nll), count + row[:, 1:].numel()
    return math.exp(total / count)


def weight_drift(model, originals: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W − W₀‖ / ‖W₀‖ of each edited matrix."""
    return {name: float((model.get_submodule(name).weight.double() - w0.double()).norm() / w0.double().norm())
            for name, w0 in originals.items()}  # fmt: skip


class SequentialRun:
    """The state of a lifelong-editing run in `out_dir`: edits written so far, null-space state, curve lines."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.state_file, self.curve_file = out_dir, out_dir / "run.safetensors", out_dir / "curve.jsonl"

    def records_file(self, done: int) -> Path:
        """The retained scores of each record edited so far, at the checkpoint after `done` edits."""
        return self.out_dir / "records" / f"{done}.jsonl"

    def save_records(self, done: int, edited, lines: list[dict], batch_size: int) -> None:
        """records/<done>.jsonl: each score line of `edited` (the records in the order written) with its step."""
        step_of = {record.case_id: index // batch_size for index, record in enumerate(edited)}
        write_lines(self.records_file(done), [{**line, "step": step_of[line["case_id"]]} for line in lines])

    def load(self, model, base_fingerprint: str) -> tuple[int, list[Edit], dict]:
        """(records done, edits, edited_outer) of an earlier run, or (0, [], {}) for a new one."""
        if not self.state_file.is_file():
            return 0, [], {}
        edits, metadata, tensors = load_edits_and_extras(self.state_file, base_fingerprint=base_fingerprint)
        outer = {int(name.split(".")[1]): t for name, t in tensors.items() if name.startswith("preserved.")}
        return int(metadata["records_done"]), edits, outer

    def save(self, edits: list[Edit], edited_outer: dict, done: int, base_fingerprint: str, model_name: str) -> None:
        """One atomic file: a kill leaves the previous step's state or this one's, never a mix."""
        extra = {f"preserved.{layer}": outer for layer, outer in edited_outer.items()}
        save_edits(self.state_file, edits, base_fingerprint=base_fingerprint, model_name=model_name,
                   extra_tensors=extra, extra_metadata={"records_done": str(done)})  # fmt: skip

    def curve(self) -> list[dict]:
        return read_lines(self.curve_file)


def run_sequential(cfg, model, tokenizer, editor, records, control, out_dir: Path, base_fingerprint: str) -> Path:
    """Write `records` in steps of cfg.batch_size, never restoring; a curve line at each checkpoint."""
    size, every, zsre = int(cfg.batch_size), int(cfg.checkpoint_every), is_zsre(cfg)
    if size < 1 or every < 1:
        raise FacteditError(f"batch_size={size}, checkpoint_every={every}: both must be >= 1")
    if size > len(records):
        n = len(records)
        raise FacteditError(f"batch_size={size} is larger than the {n} records: use batch_size<={n} or more records")
    editor.prepare(model, tokenizer)  # context templates and C from the base weights, as an uninterrupted run
    run = SequentialRun(out_dir)
    done, edits, edited_outer = run.load(model, base_fingerprint)
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in editor.modules(model)}
    with base_weights(model, originals) if done else contextlib.nullcontext():  # measured once, on the base weights
        unedited = _unedited(model, tokenizer, [*records, *control], out_dir, zsre)
        if not run.curve():  # the curve starts at 0 edits
            _checkpoint(cfg, model, tokenizer, [], control, unedited, originals, run, 0, zsre)
    apply_edits(model, edits)
    if done not in {line["edits"] for line in run.curve()}:  # killed while measuring: measure the weights it left
        _checkpoint(cfg, model, tokenizer, records[:done], control, unedited, originals, run, done, zsre)
    while done < len(records):
        step, started = records[done : done + size], time.perf_counter()
        edits += editor.write(model, tokenizer, step, edited_outer, earlier=edits)
        done += len(step)
        run.save(edits, edited_outer, done, base_fingerprint, str(cfg.model.name))
        log.info("%d of %d records edited (last step %.1fs)", done, len(records), time.perf_counter() - started)
        if done % every == 0 or done == len(records):
            _checkpoint(cfg, model, tokenizer, records[:done], control, unedited, originals, run, done, zsre)
    print(curve_report(out_dir, run.curve()))
    return out_dir


@contextlib.contextmanager
def base_weights(model, originals: dict[str, torch.Tensor]):
    """Inside the block the edited matrices hold their original weights; the run's are back afterwards."""
    edited = {name: model.get_submodule(name).weight.detach().clone() for name in originals}
    try:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_submodule(name).weight.copy_(original)
        yield
    finally:
        with torch.no_grad():
            for name, weight in edited.items():
                model.get_submodule(name).weight.copy_(weight)


def _unedited(model, tokenizer, records, out_dir: Path, zsre: bool) -> dict:
    """case_id -> scores of each record on the weights as they are (the unedited ones; unedited.jsonl, resumable)."""
    path = out_dir / "unedited.jsonl"
    lines = {line["case_id"]: line for line in read_lines(path)}
    for line in score_records(model, tokenizer, [r for r in records if r.case_id not in lines], zsre)[1]:
        append_line(path, line)
        lines[line["case_id"]] = line
    return lines


def _checkpoint(cfg, model, tokenizer, edited, control, unedited, originals, run: SequentialRun, done: int, zsre: bool):
    """One curve line: the scores of the records edited so far and of the control records, fluency, drift."""
    start, keys = time.perf_counter(), ZSRE_KEYS if zsre else SCORES
    retained, lines = score_records(model, tokenizer, edited, zsre)
    if edited:
        run.save_records(done, edited, lines, int(cfg.batch_size))
    control_now, _ = score_records(model, tokenizer, control, zsre)
    prompts = [r.text for r in control[: int(cfg.generation_prompts)]]
    texts = generate_texts(model, tokenizer, prompts, max_tokens=int(cfg.generation_tokens), seed=int(cfg.seed))
    line = {"edits": done, "run": run.out_dir.name, "retained": retained,
            "retained_unedited": _mean_of(unedited, edited, keys), "control": control_now,
            "control_unedited": _mean_of(unedited, control, keys), "generation_entropy": generation_entropy(texts),
            "perplexity": perplexity(model, tokenizer, int(cfg.perplexity_tokens)),
            "drift": weight_drift(model, originals), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    append_line(run.curve_file, line)
    shown = {k: line[k] for k in ("retained", "control", "perplexity", "generation_entropy")}
    log.info("checkpoint at %d edits: %s", done, json.dumps(shown, default=lambda v: round(v, 3)))


def _mean_of(unedited: dict, records, keys) -> dict:
    means = {}
    for key in keys:
        values = [unedited[r.case_id][key] for r in records if not math.isnan(unedited[r.case_id][key])]
        means[key] = 100 * sum(values) / len(values) if values else float("nan")
    return means
