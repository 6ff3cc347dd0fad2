"""Records per second of the CounterFact measurement: one padded forward per record vs one forward per prompt and target.

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
"""
import argparse
import datetime
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

from factedit import load_model
from factedit.data.counterfact import DEV_FILE, CounterFactDataModule, load_records, relations_of
from factedit.evaluation.editors import NoEdit
from factedit.evaluation.probabilities import measure_record

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def time_measure(model, tokenizer, records, batched: bool) -> tuple[float, list]:
    """Seconds to measure `records` and their NLLs."""
    start = time.perf_counter()
    nlls = [measure_record(model, tokenizer, record, batched) for record in records]
    return time.perf_counter() - start, nlls


def time_loop(model, tokenizer, records) -> float:
    """Seconds for trainer.test over `records` with editor=none, gen=false (pre and post measured)."""
    import lightning

    from factedit.evaluation.module import CounterFactEvaluator

    evaluator = CounterFactEvaluator(model, tokenizer, NoEdit(), relations_of(records))
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, inference_mode=False, enable_progress_bar=False,
                                enable_model_summary=False)
    start = time.perf_counter()
    trainer.test(evaluator, datamodule=CounterFactDataModule(records), verbose=False)
    return time.perf_counter() - start


def max_difference(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for kind in ra for pa, pb in zip(ra[kind], rb[kind]) for x, y in zip(pa, pb))


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
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model, tokenizer = load_model(args.model)
    records, _ = load_records(DEV_FILE, limit=args.records + 1)
    warmup, records = records[0], records[1:]
    for batched in (False, True):
        measure_record(model, tokenizer, warmup, batched)
    rows = {}
    straight_s, straight = time_measure(model, tokenizer, records, batched=False)
    batched_s, batched = time_measure(model, tokenizer, records, batched=True)
    loop_s = time_loop(model, tokenizer, records)
    n = len(records)
    rows["straightforward (1 forward per prompt and target)"] = straight_s
    rows["batched (1 padded forward per record)"] = batched_s
    rows["evaluate loop, editor=none gen=false (measures before + after)"] = loop_s
    lines = [f"{args.model}, {n} dev records (26 prompt-target pairs each), {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}; max |ΔNLL| batched vs straightforward: {max_difference(straight, batched):.1e}",
             "", "| measurement | seconds | records/s | speed-up |", "|---|---:|---:|---:|"]
    for label, seconds in rows.items():
        speedup = "–" if label.startswith("evaluate loop") else f"{straight_s / seconds:.2f}x"
        lines.append(f"| {label} | {seconds:.1f} | {n / seconds:.3f} | {speedup} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        header = "" if RESULTS.is_file() else "# Benchmark results\n"
        section = (f"\n## CounterFact evaluation\n\n`python benchmarks/bench_eval.py --records {args.records}` on "
                   f"{cpu_name()}, {datetime.date.today().isoformat()}.\n\n{table}\n")
        with open(RESULTS, "a") as f:
            f.write(header + section)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
