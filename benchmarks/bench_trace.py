"""Benchmark causal tracing: batched restorations against the one-cell-per-forward loop.

    python benchmarks/bench_trace.py                    # smollm2_135m, Eiffel Tower, 30 random cells per kind
    python benchmarks/bench_trace.py --cells 0          # every cell (slow: the loop does 3 × T × L forwards)

loop:       ROME's trace_with_patch: one forward per cell of 1 clean + `samples` corrupted rows, the full
            model and LM head; the clean row's states at the cell's token are copied into the others.
batched:    factedit's rows (cell × sample) in shared forwards, every row from layer 0 over all positions.
+shortcuts: factedit's default: rows start at their first restored layer from the kept corrupted
            residual stream, positions before the restored token reuse the corrupted keys/values, and
            tokens before the subject are not traced.
All three score the same random cells with the same noise (the table gives the largest difference
from the loop); then the default method traces the whole grid (3 kinds × T tokens × L layers), as a
user's run does, where whole-token batches are larger. Speed-ups compare time per cell (a loop cell
always costs one identical forward, so its per-cell time extrapolates exactly). The machine may be
shared: CPU seconds of this process are the fairer measure; wall seconds are shown too.
"""

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from factedit.architectures import get_module, module_name, num_layers
from factedit.models import load_model
from factedit.paths import REPO_ROOT, SHARED_DATA_DIR
from factedit.tracing import causal_trace as ct

FACT = ("{} is located in the city of", "Eiffel Tower", "Paris")


class ForwardCounter:
    """Counts forwards by calls of the final norm (once per forward, replayed or not)."""

    def __init__(self, model):
        self.count = 0
        self.handle = get_module(model, module_name(model, "final_norm")).register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--cells", type=int, default=30, help="random cells per kind (0: all)")
    parser.add_argument("--no-full", action="store_true", help="skip the whole-grid run of the default method")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    model, tokenizer = load_model(args.model)
    prompt = ct.encode_prompt(tokenizer, *FACT)
    subjects = [
        r["requested_rewrite"]["subject"]
        for r in json.loads((SHARED_DATA_DIR / "counterfact" / "counterfact_original_format.json").read_text())
    ]
    noise_std = 3 * ct.embedding_std(model, tokenizer, subjects)
    embeds = ct.corrupted_subject_embeddings(model, prompt, args.samples, "noise", noise_std)
    clean = ct.clean_run(model, prompt)
    corrupted = ct.corrupted_run(model, prompt, embeds, clean.calls)
    target = prompt.target_id
    n_tokens, n_layers = prompt.input_ids.shape[1], num_layers(model)
    picked = {}
    for kind in ct.KINDS:
        cells = ct.grid_cells(kind, n_tokens, n_layers, args.window)
        picked[kind] = random.Random(0).sample(cells, args.cells) if args.cells else cells
    n_cells = sum(len(cells) for cells in picked.values())
    full_grid = len(ct.KINDS) * n_tokens * n_layers

    counter = ForwardCounter(model)
    rows, loop_scores = [], {}

    def run_loop():
        return {
            kind: {
                (c.token, c.layer): ct.reference_restored_probability(model, prompt, embeds, kind, c, target)
                for c in cells
            }
            for kind, cells in picked.items()
        }

    def run_batched(shortcuts, everything=False):
        def run():
            out = {}
            for kind, cells in picked.items():
                only = None if everything else {(c.token, c.layer) for c in cells}
                grid = ct.restored_grid(
                    model, clean, corrupted, kind, prompt, target, args.window, shortcuts=shortcuts, only=only
                )
                out[kind] = {(t, layer): float(grid[t, layer]) for t in range(n_tokens) for layer in range(n_layers)}
            return out

        return run

    methods = [
        ("loop (ROME: 1 forward per cell)", run_loop, n_cells),
        ("batched", run_batched(False), n_cells),
        ("batched + shortcuts (default)", run_batched(True), n_cells),
    ]
    if args.cells and not args.no_full:
        methods.append(("batched + shortcuts, whole grid", run_batched(True, everything=True), full_grid))
    for name, fn, cells in methods:
        counter.count = 0
        scores, wall, cpu = timed(fn)
        if not loop_scores:
            loop_scores = scores
        diff = max(abs(scores[k][c] - loop_scores[k][c]) for k in loop_scores for c in loop_scores[k])
        rows.append(
            {"method": name, "forwards": counter.count, "cells": cells, "cpu_s": cpu, "wall_s": wall, "diff": diff}
        )
        print(f"{name}: {cpu:.1f} s CPU, {wall:.1f} s wall", flush=True)
    counter.handle.remove()

    base = rows[0]
    header = (
        "| method | forwards | cells | CPU s | wall s | CPU s / cell | full grid, CPU s (est.) | speed-up CPU | "
        "speed-up wall | max abs Δp vs loop |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )

    def speedup(row, key):  # the loop's time per cell over this method's
        return base[key] / base["cells"] * row["cells"] / row[key]

    lines = [header] + [
        f"| {r['method']} | {r['forwards']} | {r['cells']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | "
        f"{r['cpu_s'] / r['cells']:.3f} | {r['cpu_s'] / r['cells'] * full_grid:.0f} | "
        f"{speedup(r, 'cpu_s'):.1f}× | {speedup(r, 'wall_s'):.1f}× | {r['diff']:.1e} |"
        for r in rows
    ]
    table = "\n".join(lines)
    context = (
        f"{args.model}, {prompt.text!r} ({n_tokens} tokens, {n_layers} layers), samples={args.samples}, "
        f"window={args.window}, {n_cells} cells ({args.cells or 'all'} per kind; full grid {full_grid}); "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(f"\n{context}\n{machine()}\n\n{table}")
    if not args.no_results:
        append_results(table, context)


def append_results(table: str, context: str) -> None:
    path = REPO_ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    section = (
        f"\n## Causal tracing (benchmarks/bench_trace.py)\n\n"
        f"{datetime.date.today().isoformat()}, {machine()}.\n{context}.\n\n{table}\n"
    )
    Path(path).write_text(text.rstrip("\n") + "\n" + section)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
