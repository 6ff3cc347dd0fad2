"""Retention of a finished sequential run that has no records/ yet: each step's efficacy at each checkpoint.

A sequential run (`evaluate.py sequential=true`) writes records/<edits>.jsonl at every checkpoint, from
which curve.md's retention table and retention.png are drawn. A run made before those files existed
can be measured again from its saved edits alone: run.safetensors holds every step's edits in order, so
the weights at checkpoint n are the base weights plus the edits that wrote the first n records. This
script rebuilds them checkpoint by checkpoint, scores the records edited so far (the same scores as
the checkpoint's), writes records/<n>.jsonl and redraws curve.md / retention.png.

    python benchmarks/retention.py logs/evaluate/seq-memit-ns-1000
    python benchmarks/retention.py logs/evaluate/seq-memit-200 --checkpoints 200 500 1000
"""

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from factedit import load_model
from factedit.evaluation.command import lifelong_records
from factedit.evaluation.curves import curve_report, retention, retention_table
from factedit.evaluation.sequential import SequentialRun, base_weights, score_records
from factedit.io import read_lines
from factedit.rome.edits import apply_edits


def edits_writing(edits, n_records: int) -> list:
    """The first edits of a run, up to those that wrote its first n_records records (ROME: one edit per
    record; MEMIT: one edit per layer of each batch, all naming the batch's facts)."""
    done, prefix, left = 0, [], 0
    for edit in edits:
        if done >= n_records and left == 0:
            break
        prefix.append(edit)
        facts = edit.fact.get("facts")
        if facts is None:
            done += 1
            continue
        left = left or int(edit.info["layer_of"])
        left -= 1
        done += len(facts) if left == 0 else 0
    if done != n_records:
        raise SystemExit(f"error: the run's edits write {done} records, not {n_records}: is this the run's file?")
    return prefix


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a sequential run's folder (logs/evaluate/<run>)")
    parser.add_argument("--checkpoints", type=int, nargs="*", help="edits counts to measure (default: the curve's)")
    args = parser.parse_args()
    settings = json.loads((args.run / "settings.json").read_text())
    run = SequentialRun(args.run)
    checkpoints = args.checkpoints or sorted(line["edits"] for line in run.curve() if line["edits"] > 0)
    zsre = "efficacy_accuracy" in read_lines(args.run / "unedited.jsonl")[0]  # the run scored its records as zsRE
    # the run's records as the run chose them (evaluation/command.py), from its saved settings
    sequential = settings["sequential"]
    data = {"path": settings["data"], "kind": "zsre" if zsre else "counterfact", "limit": settings["records"]}
    cfg = OmegaConf.create({"data": data, "control_records": sequential["control_records"]})
    records, _ = lifelong_records(cfg)
    model, tokenizer = load_model(settings["model"])
    _, edits, _ = run.load(model, settings["fingerprint"])
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in {edit.module for edit in edits}}
    for n in checkpoints:
        with base_weights(model, originals):  # the base weights inside, and back after
            apply_edits(model, edits_writing(edits, n))
            _, lines = score_records(model, tokenizer, records[:n], zsre)
        run.save_records(n, records[:n], lines, int(sequential["batch_size"]))
        print(f"checkpoint {n}: {len(lines)} records scored", flush=True)
    curve_report(args.run, run.curve())
    print(retention_table(retention(args.run)))


if __name__ == "__main__":
    main()
