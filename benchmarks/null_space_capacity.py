"""How full each layer's null space gets in a sequential MEMIT + null_space run.

preserve=null_space writes a batch into P's range (P: the directions of small Wikipedia variance, rome/preserve.py)
and keeps the keys the run wrote before through ‖ΔW K_edited‖² in the same least squares (memit/update.py). A
direction of P's range stops being free once the earlier keys' projected second moment P K_edited K_editedᵀ P
has an eigenvalue there above α (null_space_l2): writing along it then costs more than the ridge does. This prints,
per layer and step, P's rank, those held directions, and the share of the next batch's projected key energy
‖P k‖² that still falls in free directions. When the held directions fill P's range, a new batch can only be
written by moving earlier edits (or, with μ > 0, Wikipedia's keys).

    python benchmarks/null_space_capacity.py logs/evaluate/seq-memit-ns-1000
"""

import argparse
import json
from pathlib import Path

import torch

from factedit import load_model
from factedit.evaluation.sequential import SequentialRun
from factedit.rome.preserve import null_space_projector
from factedit.stats.files import load_second_moment


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a sequential MEMIT run's folder (logs/evaluate/<run>)")
    args = parser.parse_args()
    settings = json.loads((args.run / "settings.json").read_text())
    hp = settings["editor_config"]
    if settings.get("editor") != "memit" or hp.get("preserve") != "null_space":
        parser.error(f"{args.run} is not a MEMIT run with editor.preserve=null_space: nothing to measure")
    model, _ = load_model(settings["model"])
    _, edits, _ = SequentialRun(args.run).load(model, settings["fingerprint"])
    layers, alpha = sorted({edit.layer for edit in edits}), float(hp["null_space_l2"])
    print(f"{args.run.name}: threshold {hp['null_space_threshold']}, α {alpha}, layers {layers}\n")
    cells = {}
    for layer in layers:
        projector = null_space_projector(load_second_moment(model, layer), hp["null_space_threshold"])
        batches = [edit.key.double() for edit in edits if edit.layer == layer]  # (F, d_mlp) each, in run order
        outer, cells[layer] = torch.zeros_like(projector), [round(float(projector.trace()))]
        for keys in batches:
            values, vectors = torch.linalg.eigh(projector @ outer @ projector)
            held = vectors[:, values > alpha]  # (d_mlp, n_held)
            projected = keys @ projector  # P k of each key (P is symmetric)
            free = 1.0 - float((projected @ held).square().sum() / projected.square().sum())
            cells[layer].append(f"{held.shape[1]} · {100 * free:.0f}%")
            outer = outer + keys.T @ keys
    sizes = [len(edit.key) for edit in edits if edit.layer == layers[0]]
    steps = [sum(sizes[:step]) for step in range(len(sizes))]  # edits written before each batch
    print("Each cell: directions held before the batch that starts after that many edits · the share of that batch's")
    print("‖Pk‖² in free directions.\n")
    print("| layer | P's rank | " + " | ".join(f"{n} edits" for n in steps) + " |")
    print("|---:|---:|" + "---:|" * len(steps))
    for layer in layers:
        print(f"| {layer} | " + " | ".join(map(str, cells[layer])) + " |")


if __name__ == "__main__":
    main()
