"""Which edited layer of a finished sequential run costs the perplexity: one layer's change left out at a time.

For each matrix the run changed, WikiText-2 perplexity (the 8,192-token slice of the run's checkpoints) of the
run's final weights without that matrix's change, and of the base weights with only that matrix's change.

    python benchmarks/layer_perplexity.py logs/evaluate/seq-memit-ns-1000
"""

import argparse
import json
from pathlib import Path

from factedit import load_model
from factedit.evaluation.sequential import SequentialRun, base_weights, perplexity
from factedit.rome.edits import apply_edits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a sequential run's folder (logs/evaluate/<run>)")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    settings = json.loads((args.run / "settings.json").read_text())
    model, tokenizer = load_model(settings["model"])
    _, edits, _ = SequentialRun(args.run).load(model, settings["fingerprint"])
    names = sorted(
        {edit.module for edit in edits}, key=lambda name: [int(p) if p.isdigit() else p for p in name.split(".")]
    )
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in names}
    unedited = perplexity(model, tokenizer, args.tokens)
    apply_edits(model, edits)
    print("| matrix | perplexity × unedited without its change | with only its change |\n|---|---:|---:|")
    print(f"| (all {len(names)} changed) | {perplexity(model, tokenizer, args.tokens) / unedited:.3f} | |", flush=True)
    for name in names:
        with base_weights(model, {name: originals[name]}):  # this one back to its original
            without = perplexity(model, tokenizer, args.tokens)
        with base_weights(model, {other: originals[other] for other in names if other != name}):
            only = perplexity(model, tokenizer, args.tokens)
        print(f"| {name} | {without / unedited:.3f} | {only / unedited:.3f} |", flush=True)


if __name__ == "__main__":
    main()
