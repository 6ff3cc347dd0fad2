"""Seconds to write a batch of facts: one MEMIT batch (every fact's v* in one batched fit, then the
closed-form update of each layer) against the same facts written one at a time with ROME (one v* fit
each, reverted before the next), in the same run. Also P(new) > P(true) on each fact's prompt after
its edit (efficacy), the peak resident memory, and the steps the fits took.

    python benchmarks/bench_memit.py --facts 100                 # SmolLM2-135M, counterfact-train.json in file order
    python benchmarks/bench_memit.py --facts 100 --baseline-facts 20   # time 20 single fits, scale to 100
    python benchmarks/bench_memit.py --shape gpt2-xl --facts 100 --data dev_head.json --baseline-facts 5  # GPU
    python benchmarks/bench_memit.py --facts 100 --baseline-facts 20 --facts-per-fit 25   # also fits of 25 at a time
    python benchmarks/bench_memit.py --facts 100 --baseline-facts 10 --narrow   # also with narrow=false (every row
                                                                                 # every step, fits in file order)
    python benchmarks/bench_memit.py --facts 100 --reads-only   # the update's reads alone: passes vs full forwards
    python benchmarks/bench_memit.py --facts 100 --baseline-facts 5 --versus v_lr=0.5   # also MEMIT with an option
                                                                                # changed, interleaved

Peak memory is each row's own (the peak resident size is reset before each row).

At a --shape (random weights) the statistics are C = I and efficacy means the fitted v* was written
(the shapes' models know no facts); the time is what counts there.
"""

import argparse
import contextlib
import logging
import resource
import time
from pathlib import Path

import torch
from bench_edit import SHAPES, load, synchronize

from factedit import edit, load_model, memit, revert_edits
from factedit.architectures import as_out_in, rewrite_weight
from factedit.data.counterfact import SHARED_DATA_DIR, load_records
from factedit.probes import next_token_logits
from factedit.rome.hparams import MemitHparams, RomeHparams, resolve_hparams

TRAIN_FILE = SHARED_DATA_DIR / "counterfact" / "counterfact-train.json"
SHAPE_LAYERS = {"gpt2-xl": (13, 14, 15, 16, 17), "gpt-j": (3, 4, 5, 6, 7, 8), "llama-7b": (4, 5, 6, 7, 8)}
SHAPE_ROME_LAYER = {"gpt2-xl": 17, "gpt-j": 5, "llama-7b": 5}


def efficacy(model, tokenizer, facts) -> float:
    """Share of facts whose prompt gives the new object's first token a higher probability than the true one's."""
    wins = 0
    for fact in facts:
        new, true = (
            tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in (fact.target_new, fact.target_true)
        )
        logits = next_token_logits(model, tokenizer, [fact.text])[0]
        wins += bool(logits[new] > logits[true])
    return 100.0 * wins / len(facts)


def reset_peak_memory() -> None:
    """Start a new peak resident size (Linux: VmHWM) and GPU peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> str:
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    peak = next((int(line.split()[1]) / 2**20 for line in status.splitlines() if line.startswith("VmHWM")), None)
    peak = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = f" / GPU {torch.cuda.max_memory_allocated() / 2**30:.1f}" if torch.cuda.is_available() else ""
    return f"{peak:.2f}{gpu}"


def time_memit(model, tokenizer, facts, stats, hparams) -> dict:
    synchronize()
    start = time.perf_counter()
    edits = memit.edit(model, tokenizer, facts, stats=stats, hparams=hparams)
    synchronize()
    seconds = time.perf_counter() - start
    es = efficacy(model, tokenizer, facts)
    steps = edits[0].info["v_steps"]
    revert_edits(model, edits.backup)
    return dict(seconds=seconds, facts=len(facts), es=es, steps=sum(steps) / len(steps))


def time_rome(model, tokenizer, facts, stats, hparams) -> dict:
    seconds, wins, steps = 0.0, 0.0, []
    for fact in facts:
        synchronize()
        start = time.perf_counter()
        edits = edit(model, tokenizer, fact, stats=stats, hparams=hparams)
        synchronize()
        seconds += time.perf_counter() - start
        wins += efficacy(model, tokenizer, [fact]) / len(facts)
        steps.append(edits[0].info["steps"])
        revert_edits(model, edits.backup)
    return dict(seconds=seconds, facts=len(facts), es=wins, steps=sum(steps) / len(steps))


def time_reads(model, tokenizer, facts, hparams, rounds: int = 2) -> None:
    """Keys at each layer of the range and h_L before each (what MEMIT reads between its updates): from the
    embeddings each time (memit.residual_stream, compute_key.batch_keys) against memit/passes.py, interleaved."""
    from factedit.memit.memit import residual_stream
    from factedit.memit.passes import LayerPasses
    from factedit.rome.compute_key import batch_keys
    from factedit.rome.context import context_templates
    from factedit.rome.value_batch import value_batch

    templates = context_templates(model, tokenizer, hparams.context_templates, seed=hparams.seed)
    batch, layers = value_batch(tokenizer, facts, templates, model.device), list(hparams.layers)

    def full():
        return [(batch_keys(model, batch, layer), residual_stream(model, batch, layers[-1])) for layer in layers]

    def passes():
        reads = LayerPasses(model, batch)
        return [(reads.keys(layer), reads.residual_stream(layers[-1])) for layer in layers]

    seconds, values = {"full forwards": [], "passes": []}, {}
    for _ in range(rounds):
        for label, read in (("full forwards", full), ("passes", passes)):
            synchronize()
            start = time.perf_counter()
            values[label] = read()
            synchronize()
            seconds[label].append(time.perf_counter() - start)
    gap = max((a - b).abs().max().item() / b.abs().max().item()
              for pair_a, pair_b in zip(values["passes"], values["full forwards"])
              for a, b in zip(pair_a, pair_b))  # fmt: skip
    base = min(seconds["full forwards"])
    print(f"\nupdate reads of {len(facts)} facts, layers {layers} (keys and h_L before each), best of {rounds}")
    print("| reads | seconds | speed-up |\n|---|---|---|")
    for label in ("full forwards", "passes"):
        print(f"| {label} | {min(seconds[label]):.2f} | {base / min(seconds[label]):.2f}x |")
    print(f"largest difference, relative to the largest value: {gap:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=100, help="facts in the MEMIT batch")
    parser.add_argument("--baseline-facts", type=int, default=None, help="single ROME fits timed (default: --facts)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights at a real model's shape")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--data", default=None, help="CounterFact file (default: counterfact-train.json)")
    parser.add_argument("--tokenizer", default="smollm2_135m", help="for --shape: the tokenizer of the facts")
    parser.add_argument("--memit", nargs="*", default=[], help="MEMIT options, e.g. layers=[1,2,3] preserve=null_space")
    parser.add_argument("--facts-per-fit", type=int, default=None, help="also MEMIT with v* fitted N facts at a time")
    parser.add_argument("--narrow", action="store_true", help="also MEMIT with narrow=false, interleaved")
    versus_help = "also MEMIT with this option changed (OPTION=VALUE), interleaved"
    parser.add_argument("--versus", default=None, metavar="OPTION=VALUE", help=versus_help)
    reads_help = "time only the update's key and h_L reads: memit/passes.py against full forwards"
    parser.add_argument("--reads-only", action="store_true", help=reads_help)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(args.shape, device, args.tokenizer, args.model) if args.shape else load_model(args.model)
    records, _ = load_records(args.data or TRAIN_FILE, limit=args.facts)
    facts = [record.to_fact() for record in records]
    overrides = dict(option.split("=", 1) for option in args.memit)
    if "layers" in overrides:
        overrides["layers"] = [int(v) for v in overrides["layers"].strip("[]").split(",")]
    if args.shape:
        overrides.setdefault("layers", SHAPE_LAYERS.get(args.shape, (3, 4, 5)))
    memit_hp = resolve_hparams(model, overrides, kind=MemitHparams)
    rome_hp = resolve_hparams(
        model, {"layer": SHAPE_ROME_LAYER.get(args.shape, 5)} if args.shape else None, kind=RomeHparams
    )
    layers = sorted({*memit_hp.layers, rome_hp.layer})
    if args.shape:  # random weights: no statistics; C = I costs the update the same
        sizes = {layer: as_out_in(model, rewrite_weight(model, layer)).shape[1] for layer in layers}
        stats = {layer: torch.eye(sizes[layer], dtype=torch.float64, device=device) for layer in layers}
    else:
        from factedit.stats import load_second_moment

        stats = {layer: load_second_moment(model, layer) for layer in layers}
    if args.reads_only:
        time_reads(model, tokenizer, facts, memit_hp)
        return
    baseline = facts[: args.baseline_facts or len(facts)]
    revert_edits(model, memit.edit(model, tokenizer, facts[:2], stats=stats, hparams=memit_hp).backup)  # warm-up
    rows, runs = [], [("memit", lambda: time_memit(model, tokenizer, facts, stats, memit_hp)),
                      ("rome, one fit per fact", lambda: time_rome(model, tokenizer, baseline, stats, rome_hp)),
                      ("memit (again)", lambda: time_memit(model, tokenizer, facts, stats, memit_hp))]  # fmt: skip
    if args.facts_per_fit:
        chunked_hp = resolve_hparams(model, {**overrides, "facts_per_fit": args.facts_per_fit}, kind=MemitHparams)
        label = f"memit, {args.facts_per_fit} facts per fit"
        chunked = (label, lambda: time_memit(model, tokenizer, facts, stats, chunked_hp))
        runs = [runs[0], chunked, runs[1], (label + " (again)", chunked[1]), runs[2]]
    if args.narrow:
        wide_hp = resolve_hparams(model, {**overrides, "narrow": False}, kind=MemitHparams)
        wide = ("memit, narrow=false", lambda: time_memit(model, tokenizer, facts, stats, wide_hp))
        runs = [wide, runs[0], runs[1], (wide[0] + " (again)", wide[1]), runs[2]]
    if args.versus:
        option, value = args.versus.split("=", 1)
        other_hp = resolve_hparams(model, {**overrides, option: value}, kind=MemitHparams)
        other = (f"memit, {args.versus}", lambda: time_memit(model, tokenizer, facts, stats, other_hp))
        runs = [other, runs[0], runs[1], (other[0] + " (again)", other[1]), runs[2]]
    for label, run in runs:
        reset_peak_memory()
        result = run()
        result.update(per_fact=result["seconds"] / result["facts"], peak=peak_memory())
        rows.append((label, result))
        print(f"{label}: {result['seconds']:.1f} s for {result['facts']} facts, peak {result['peak']} GiB", flush=True)
    rome_per_fact = next(r["per_fact"] for label, r in rows if label.startswith("rome"))
    name = args.shape or args.model
    print(f"\n{name}, {device}, {len(facts)} facts, MEMIT layers {list(memit_hp.layers)}, ROME layer {rome_hp.layer}")
    columns = f"path | facts | seconds | s/fact | {len(facts)} facts (s) | vs rome | ES | mean steps | peak GiB"
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        batch_seconds = r["per_fact"] * len(facts)
        print(f"| {label} | {r['facts']} | {r['seconds']:.1f} | {r['per_fact']:.2f} | {batch_seconds:.1f} | "
              f"{rome_per_fact / r['per_fact']:.2f}x | {r['es']:.1f} | {r['steps']:.1f} | {r['peak']} |")  # fmt: skip


if __name__ == "__main__":
    main()
