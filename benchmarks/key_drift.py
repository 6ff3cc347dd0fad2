"""How far a sequential MEMIT run's earlier keys have moved: each step's keys read on the run's final weights
against the keys it was written with.

A batch's key at layer l reads the layers below l, which later batches edit again; with carry=keys (AlphaEdit)
the run keeps the earlier keys as they were written (Σ k kᵀ), so a moved key is kept where it no longer is.
Per step and layer: the mean ‖k_now − k_written‖ / ‖k_written‖ and the mean cosine of the two.

    python benchmarks/key_drift.py logs/evaluate/seq-memit-ns-1000 --every 3
"""

import argparse
import json
from pathlib import Path

import torch

from factedit import load_model
from factedit.evaluation.sequential import SequentialRun
from factedit.memit.passes import LayerPasses
from factedit.rome.context import context_templates
from factedit.rome.edits import apply_edits
from factedit.rome.facts import as_facts
from factedit.rome.hparams import MemitHparams, resolve_hparams
from factedit.rome.value_batch import value_batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a sequential MEMIT run's folder (logs/evaluate/<run>)")
    parser.add_argument("--every", type=int, default=1, help="measure every n-th step (the last one is exact)")
    args = parser.parse_args()
    settings = json.loads((args.run / "settings.json").read_text())
    if settings.get("editor") != "memit":
        parser.error(f"{args.run} is not a MEMIT run: its edits keep no batch keys to compare")
    model, tokenizer = load_model(settings["model"])
    hp = resolve_hparams(model, settings["editor_config"], kind=MemitHparams)
    templates = context_templates(model, tokenizer, hp.context_templates, seed=hp.seed)  # the base weights', as the run
    _, edits, _ = SequentialRun(args.run).load(model, settings["fingerprint"])
    apply_edits(model, edits)
    layers = sorted({edit.layer for edit in edits})
    steps = [[edit for edit in edits if edit.layer == layer] for layer in layers]  # steps[i][s]: step s at layers[i]
    print(f"{args.run.name}: mean ‖k_now − k_written‖ / ‖k_written‖ (mean cosine) of each step's keys\n")
    print("| step | " + " | ".join(f"layer {layer}" for layer in layers) + " |")
    print("|---:|" + "---|" * len(layers))
    for step in range(0, len(steps[0]), args.every):
        facts = as_facts(steps[0][step].fact["facts"])
        passes, cells = LayerPasses(model, value_batch(tokenizer, facts, templates, model.device)), []
        for index, layer in enumerate(layers):
            now, written = passes.keys(layer), steps[index][step].key.double()
            moved = ((now - written).norm(dim=1) / written.norm(dim=1)).mean()
            cosine = torch.nn.functional.cosine_similarity(now, written, dim=1).mean()
            cells.append(f"{moved:.3f} ({cosine:.3f})")
        print(f"| {step + 1} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
