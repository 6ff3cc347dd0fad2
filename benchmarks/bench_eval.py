"""Records per second of the CounterFact measurement: one padded forward per record vs one forward
per prompt and target.

Each CounterFact record needs P(target_new) and P(target_true) after 13 prompts (rewrite, 2
paraphrases, 10 neighbours): 26 (prompt, target) pairs. The straightforward evaluation runs one
forward per pair with logits at every position, as ROME's reference code does per prompt; the
batched one (factedit.evaluation.probabilities.target_nlls) runs all of a record's pairs in one
right-padded forward, shares rows that are prefixes of others (single-token targets need the
prompt once) and unembeds only the positions the NLL reads. Both measure the same records in the
same run; the table also gives the largest NLL difference between them and the end-to-end
Lightning loop (editor=none, gen=false: measure before and after, restore).

    python benchmarks/bench_eval.py                  # 10 dev records, default model
    python benchmarks/bench_eval.py --append         # also append the table to benchmarks/RESULTS.md
    python benchmarks/bench_eval.py --shape gpt2-xl --rome   # random weights at a real shape (GPU), plus ROME loops

With --rome the table also times the whole evaluation with ROME (edit, measure before and after,
restore): the default path (fast v*, batched measurement, bfloat16 v* where the hardware has it; on
a GPU CUDA graphs) against a straightforward one (full forward and every position's logits at each
v* step, one forward per prompt and target). With random weights (--shape) every v* step runs
(loss_threshold 0) and the identity stands in for C (the update costs the same).
"""

import argparse
import dataclasses
import datetime
import logging
import platform
import subprocess
import time
from pathlib import Path

import lightning
import torch
from bench_edit import SHAPES, default_layer, load, synchronize

from factedit import load_model
from factedit.architectures import as_out_in, rewrite_weight
from factedit.data.counterfact import DEV_FILE, CounterFactDataModule, load_records, relations_of
from factedit.evaluation.editors import NoEdit, RankOneEdit
from factedit.evaluation.probabilities import measure_record
from factedit.rome import resolve_hparams

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def time_measure(model, tokenizer, records, batched: bool) -> tuple[float, list]:
    """Seconds to measure `records` and their NLLs."""
    start = time.perf_counter()
    nlls = [measure_record(model, tokenizer, record, batched) for record in records]
    return time.perf_counter() - start, nlls


def time_loop(model, tokenizer, records, editor=None, batched: bool = True) -> float:
    """Seconds for trainer.test over `records` (gen=false: pre and post measured) with `editor` (default: none)."""
    from factedit.evaluation.module import CounterFactEvaluator

    device = model.device
    evaluator = CounterFactEvaluator(model, tokenizer, editor or NoEdit(), relations_of(records), batched=batched)
    timer = EpochTimer()
    trainer = lightning.Trainer(
        accelerator=device.type,
        devices=1,
        logger=False,
        inference_mode=False,
        callbacks=[timer],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(evaluator, datamodule=CounterFactDataModule(records), verbose=False)
    model.to(device)  # Lightning's teardown moved the module, and the model in it, to the CPU
    return timer.seconds


class EpochTimer(lightning.Callback):
    """Seconds of the test epoch alone: without the Trainer's set-up and teardown (which, on a GPU, moves the
    whole model back to the CPU: seconds at GPT-2 XL shape, once per run and not per record)."""

    def on_test_epoch_start(self, trainer, module):
        synchronize()
        self.start = time.perf_counter()

    def on_test_epoch_end(self, trainer, module):
        synchronize()
        self.seconds = time.perf_counter() - self.start


def rome_editors(model, shape: str | None) -> dict[str, tuple[RankOneEdit, bool]]:
    """label -> (ROME editor, batched measurement) for the default and the straightforward evaluation."""
    layer = default_layer(shape, model)
    hparams = resolve_hparams(model, {"layer": layer, **({"loss_threshold": 0.0} if shape else {})})
    if shape is None:
        from factedit.stats import load_second_moment

        second_moment = load_second_moment(model, layer)
    else:
        d_mlp = as_out_in(model, rewrite_weight(model, layer)).shape[1]
        second_moment = torch.eye(d_mlp, dtype=torch.float64, device=model.device)
    return {
        "evaluate loop, editor=rome, straightforward (full-forward v*, 1 forward per prompt and target)": (
            RankOneEdit(
                "rome",
                dataclasses.replace(hparams, fast=False, tf32=False, cuda_graph=False, bf16=False),
                second_moment,
            ),
            False,
        ),
        "evaluate loop, editor=rome, default": (RankOneEdit("rome", hparams, second_moment), True),
    }


def max_difference(a, b) -> float:
    return max(
        abs(x - y) for ra, rb in zip(a, b) for kind in ra for pa, pb in zip(ra[kind], rb[kind]) for x, y in zip(pa, pb)
    )


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="random weights at a real model's shape (bench_edit.py)"
    )
    parser.add_argument(
        "--tokenizer", default="smollm2_135m", help="with --shape: registry name or saved tokenizer folder"
    )
    parser.add_argument("--data", default=str(DEV_FILE), help="CounterFact file (default: the dev file)")
    parser.add_argument(
        "--rome", action="store_true", help="also time whole ROME evaluations, default vs straightforward"
    )
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "factedit"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = (
        load_model(args.model, device=device) if args.shape is None else load(args.shape, device, args.tokenizer)
    )
    model_name = args.shape or args.model
    records, _ = load_records(args.data, limit=args.records + 1)
    warmup, records = records[0], records[1:]
    for batched in (False, True):
        measure_record(model, tokenizer, warmup, batched)
    rows = {}
    straight_s, straight = time_measure(model, tokenizer, records, batched=False)
    batched_s, batched = time_measure(model, tokenizer, records, batched=True)
    time_loop(model, tokenizer, [warmup])  # warm-up: the first Trainer's start-up
    loop_s = time_loop(model, tokenizer, records)
    print(f"measured: straightforward {straight_s:.1f} s, batched {batched_s:.1f} s, loop {loop_s:.1f} s", flush=True)
    n = len(records)
    rows["straightforward (1 forward per prompt and target)"] = straight_s
    rows["batched (1 padded forward per record)"] = batched_s
    rows["evaluate loop, editor=none gen=false (measures before + after)"] = loop_s
    if args.rome:
        editors = rome_editors(model, args.shape)
        for editor, batched_measure in editors.values():  # warm-up: context templates, CUDA/cuBLAS set-up
            time_loop(model, tokenizer, [warmup], editor, batched_measure)
        for label, (editor, batched_measure) in editors.items():
            rows[label] = time_loop(model, tokenizer, records, editor, batched_measure)
            print(f"{label}: {rows[label]:.1f} s", flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} torch threads"
    lines = [
        f"{model_name}, {n} dev records (26 prompt-target pairs each), {device_name}, "
        f"torch {torch.__version__}; max |ΔNLL| batched vs straightforward: {max_difference(straight, batched):.1e}",
        "",
        "| measurement | seconds | records/s | speed-up |",
        "|---|---:|---:|---:|",
    ]
    rome_base = next((s for label, s in rows.items() if "straightforward (full-forward" in label), None)
    for label, seconds in rows.items():
        if "editor=rome" in label:
            speedup = f"{rome_base / seconds:.2f}x"
        else:
            speedup = "–" if label.startswith("evaluate loop") else f"{straight_s / seconds:.2f}x"
        lines.append(f"| {label} | {seconds:.1f} | {n / seconds:.3f} | {speedup} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        header = "" if RESULTS.is_file() else "# Benchmark results\n"
        section = (
            f"\n## CounterFact evaluation\n\n`python benchmarks/bench_eval.py --records {args.records}` on "
            f"{cpu_name()}, {datetime.date.today().isoformat()}.\n\n{table}\n"
        )
        with open(RESULTS, "a") as f:
            f.write(header + section)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
