"""Seconds to write a batch of facts: one MEMIT batch (every fact's v* in one batched fit, then the
closed-form update of each layer) against the same facts written one at a time with ROME (one v* fit
each, reverted before the next), in the same run. Also P(new) > P(true) on each fact's prompt after
its edit (efficacy), the peak resident memory, and the steps the fits took.

    python benchmarks/bench_memit.py --facts 100                 # SmolLM2-135M, counterfact-train.json in file order
    python benchmarks/bench_memit.py --facts 100 --baseline-facts 20   # time 20 single fits, scale to 100
    python benchmarks/bench_memit.py --shape gpt2-xl --facts 100 --data dev_head.json --baseline-facts 5  # GPU

At a --shape (random weights) the statistics are C = I and efficacy means the fitted v* was written
(the shapes' models know no facts); the time is what counts there.
"""

import argparse
import logging
import resource
import time

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=100, help="facts in the MEMIT batch")
    parser.add_argument("--baseline-facts", type=int, default=None, help="single ROME fits timed (default: --facts)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights at a real model's shape")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--data", default=None, help="CounterFact file (default: counterfact-train.json)")
    parser.add_argument("--tokenizer", default="smollm2_135m", help="for --shape: the tokenizer of the facts")
    parser.add_argument("--memit", nargs="*", default=[], help="MEMIT options, e.g. layers=[1,2,3] preserve=null_space")
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
    baseline = facts[: args.baseline_facts or len(facts)]
    revert_edits(model, memit.edit(model, tokenizer, facts[:2], stats=stats, hparams=memit_hp).backup)  # warm-up
    rows = []
    for label, run in [("memit", lambda: time_memit(model, tokenizer, facts, stats, memit_hp)),
                       ("rome, one fit per fact", lambda: time_rome(model, tokenizer, baseline, stats, rome_hp)),
                       ("memit (again)", lambda: time_memit(model, tokenizer, facts, stats, memit_hp))]:  # fmt: skip
        result = run()
        result["per_fact"] = result["seconds"] / result["facts"]
        rows.append((label, result))
        print(f"{label}: {result['seconds']:.1f} s for {result['facts']} facts", flush=True)
    rome_per_fact = rows[1][1]["per_fact"]
    name = args.shape or args.model
    print(f"\n{name}, {device}, {len(facts)} facts, MEMIT layers {list(memit_hp.layers)}, ROME layer {rome_hp.layer}")
    print(f"| path | facts | seconds | s/fact | {len(facts)} facts (s) | speed-up vs rome | ES | mean steps |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        batch_seconds = r["per_fact"] * len(facts)
        print(f"| {label} | {r['facts']} | {r['seconds']:.1f} | {r['per_fact']:.2f} | {batch_seconds:.1f} | "
              f"{rome_per_fact / r['per_fact']:.2f}x | {r['es']:.1f} | {r['steps']:.1f} |")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
    print(f"peak resident memory {peak:.2f} GiB{gpu}")


if __name__ == "__main__":
    main()
