"""Seconds per ROME edit, fast path vs the straightforward one, split into the parts of an edit:
templates / the δ = 0 pass (keys, v₀, the check) / k̄ / the v* fit / update.

The straightforward implementation (`fast=False`) runs the full model forward at every step and
unembeds every position, as the reference code does; the fast path runs the layers below the edit
once (frozen prefix) and unembeds only the positions the loss reads. Both edit the same facts from
the same start; the table also shows that the edits are as good (P(new) on the edit prompt and a
paraphrase, P(true) kept on a neighbour).

    python benchmarks/bench_edit.py                     # default model on this machine
    python benchmarks/bench_edit.py --model gemma3_270m # another real model (its statistics in stats/)
    python benchmarks/bench_edit.py --shape gpt2-xl     # random weights at a real shape (GPU)

On a GPU the fast path is timed with TF32 or bfloat16 and CUDA graphs, each either captured for
every edit (graph_cache=0) or kept from one edit to the next (the default); "vs reference" divides
EasyEdit's ROME time on an H200 by ours. The "graphs" column counts the edits whose v*
replayed a kept graph / captured one. Edit different facts (--records N) for a fair picture of kept
graphs: a fact only reuses a graph captured for the same bucketed shapes.

    python benchmarks/bench_edit.py --shape gpt2-xl --records 8 --data counterfact.json --baseline-facts 3
"""

import argparse
import logging
import time
from statistics import median

import torch

from factedit import Fact, edit, load_model, revert_edits
from factedit.architectures import as_out_in, rewrite_weight
from factedit.probes import next_token_logits
from factedit.rome import release_graphs
from factedit.rome.fast.low_precision import native_bf16

# fmt: off
FACTS = [
    Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Rome", target_true="Paris",
         generalization_probes=["To get to the Eiffel Tower from Berlin, you take a train to"],
         specificity_probes=["The Louvre is located in the city of"]),
    Fact(subject="Colosseum", prompt="The {} is located in the city of", target_new="Athens", target_true="Rome",
         generalization_probes=["The Colosseum is an ancient amphitheatre in the city of"],
         specificity_probes=["The Pantheon is located in the city of"]),
]
SHAPES = {  # model_type and sizes of real models, built with random weights (smoke: a quick check of the script)
    "smoke": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
    "gpt-j": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64),
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
}
# fmt: on


def first_token_prob(model, tokenizer, prompt, word):
    token = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
    return next_token_logits(model, tokenizer, [prompt])[0].softmax(-1)[token].item()


# info["seconds"] of an edit; "other" (the rest of the total) is applying the edit and Python. "prepare" is the
# one pass at δ = 0 (keys, v₀, the known-answer check), so "key" is only the keys' mean.
PARTS = ("templates", "prepare", "key", "value", "update")
REFERENCE_H200 = {"gpt2-xl": 1.72, "gpt-j": 4.8, "llama-7b": 6.8}  # EasyEdit's ROME on an H200, s/edit, fp32
STEPS = {"llama-7b": 25}
# (label, hparams) of each path.
CPU_PATHS = {  # --paths key: (label, hparams)
    "straightforward": ("straightforward", dict(fast=False, stop_on="loss", bf16=False)),
    "fast": ("fast", dict(fast=True, stop_on="loss", bf16=False)),
    "fast-bf16": ("fast bf16", dict(fast=True, stop_on="loss", bf16=True)),
    "fast-nll": ("fast, stop_on=nll", dict(fast=True, stop_on="nll", bf16=False)),
    "default": ("fast bf16, stop_on=nll (default)", dict(fast=True, stop_on="nll", bf16="auto")),
}
GPU_PATHS = [
    ("straightforward fp32", dict(fast=False, tf32=False, bf16=False)),
    ("fast tf32 + graphs captured per edit", dict(fast=True, tf32=True, cuda_graph=True, graph_cache=0, bf16=False)),
    ("fast tf32 + graphs kept", dict(fast=True, tf32=True, cuda_graph=True, graph_cache=8, bf16=False)),
    ("fast bf16 + graphs captured per edit", dict(fast=True, tf32=True, cuda_graph=True, graph_cache=0, bf16="auto")),
    ("fast bf16 + graphs kept (default)", dict(fast=True, tf32=True, cuda_graph=True, graph_cache=8, bf16="auto")),
]


def default_layer(shape: str | None, model) -> int:
    """The edit layer: the model config's for the real model, ROME's 17 at GPT-2 XL shape, else 5."""
    if shape is None:
        from factedit.rome import resolve_hparams

        return resolve_hparams(model).layer
    return 17 if shape == "gpt2-xl" else 5


def load(shape, device, tokenizer, model="smollm2_135m"):
    if shape is None:
        return load_model(model, device=device)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": shape, "source": "tiny", "tokenizer": tokenizer, "config": SHAPES[shape]})
    return load_model(cfg, device=device)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dev_facts(n: int, path=None) -> list[Fact]:
    """The first n CounterFact records (default: the dev file) as facts (the probes: a paraphrase and a neighbour)."""
    from factedit.data.counterfact import DEV_FILE, load_records

    records, _ = load_records(path or DEV_FILE, limit=n)
    facts = []
    for record in records:
        fact = record.to_fact()
        fact.generalization_probes, fact.specificity_probes = (
            record.paraphrase_prompts[:1],
            record.neighborhood_prompts[:1],
        )
        facts.append(fact)
    return facts


def time_edit(model, tokenizer, fact, stats, hparams, shape):
    """One edit() timed alone (the probes and the revert are not part of an edit): (seconds by part, total, quality)."""
    synchronize()
    start = time.perf_counter()
    edits = edit(model, tokenizer, fact, stats=stats, hparams=hparams)
    synchronize()
    total = time.perf_counter() - start
    info = edits[0].info
    if shape:  # random weights: how far v* got (the same for every path, up to rounding)
        quality = (info["steps"], info["final_loss"], info["p_target"])
    else:
        quality = (
            info["steps"],
            first_token_prob(model, tokenizer, fact.text, fact.target_new),
            first_token_prob(model, tokenizer, fact.generalization_probes[0], fact.target_new),
            first_token_prob(model, tokenizer, fact.specificity_probes[0], fact.target_new),
        )
    revert_edits(model, edits.backup)
    return info["seconds"], total, quality, info.get("cuda_graph")


def summarize(runs):
    """Median seconds of each part and in total; mean quality; 'kept/captured' graph counts; mean total."""
    seconds = {k: median([r[0].get(k, 0.0) for r in runs]) for k in PARTS}
    uses = [r[3] for r in runs]
    graphs = f"{uses.count('kept')}/{uses.count('captured')}" if any(uses) else "-"
    return seconds, median([r[1] for r in runs]), [r[2] for r in runs], graphs, sum(r[1] for r in runs) / len(runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument(
        "--model", default="smollm2_135m", help="without --shape: a real model from the registry (configs/model/)"
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="default: the model config's (17 at GPT-2 XL shape, as in ROME; 5 at other shapes)",
    )
    parser.add_argument("--steps", type=int, default=None, help="default: 20 (25 at Llama-7B shape)")
    parser.add_argument("--facts", type=int, default=len(FACTS), help="how many of the benchmark facts to edit")
    parser.add_argument("--tokenizer", default="smollm2_135m", help="registry name or saved tokenizer folder")
    parser.add_argument(
        "--records", type=int, default=0, help="edit the first N CounterFact dev records instead of the benchmark facts"
    )
    parser.add_argument("--data", default=None, help="--records from this CounterFact file instead of the dev file")
    parser.add_argument(
        "--baseline-facts", type=int, default=0, help="edit only this many facts on the first (baseline) path (0: all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over all paths (interleaved); the table gives medians"
    )
    parser.add_argument(
        "--paths",
        default="straightforward,fast,fast-bf16,fast-nll,default",
        help=f"CPU: which paths, in order, the first one the baseline ({', '.join(CPU_PATHS)})",
    )
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("factedit").setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps or STEPS.get(args.shape, 20)
    build = time.perf_counter()
    model, tokenizer = load(args.shape, device, args.tokenizer, args.model)
    name = args.shape or args.model
    layer = args.layer if args.layer is not None else default_layer(args.shape, model)
    synchronize()
    print(f"built {name} on {device} in {time.perf_counter() - build:.1f}s", flush=True)
    d_mlp = as_out_in(model, rewrite_weight(model, layer)).shape[1]
    try:
        from factedit.stats import load_second_moment

        stats = {layer: load_second_moment(model, layer)}
    except Exception as error:  # random shapes have no statistics: the update step costs the same
        if not args.shape:  # a real model's edits need its own C: say which command makes it
            raise SystemExit(f"error: {error}") from None
        stats = {layer: torch.eye(d_mlp, dtype=torch.float64, device=device)}
    base = dict(layer=layer, v_num_grad_steps=steps, seed=0)
    if args.shape:
        base["loss_threshold"] = 0.0  # random weights: run every step
    facts = FACTS[: args.facts] if not args.records else dev_facts(args.records, args.data)
    paths = GPU_PATHS if device == "cuda" else [CPU_PATHS[key] for key in args.paths.split(",")]
    for _, path in paths:  # warm-up: context templates cached, kernels loaded, the frozen-prefix check made
        revert_edits(
            model, edit(model, tokenizer, facts[0], stats=stats, hparams={**base, **path, "v_num_grad_steps": 2}).backup
        )
    release_graphs(model)  # each path keeps (or not) graphs of its own edits only
    runs = {
        label: [] for label, _ in paths
    }  # label -> [(seconds by part, total, quality, graph use)] one per fact and round
    for round_ in range(args.repeats):  # paths interleaved round by round: a drifting machine load hits each alike
        for index, (label, path) in enumerate(paths):
            for fact in facts[: args.baseline_facts or None] if index == 0 else facts:
                runs[label].append(time_edit(model, tokenizer, fact, stats, {**base, **path}, args.shape))
            release_graphs(model)
            print(
                f"round {round_ + 1}: {label}: {median([r[1] for r in runs[label]]):.3f} s/edit (median so far)",
                flush=True,
            )
    rows = {label: summarize(r) for label, r in runs.items()}
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    what = f"the first {len(facts)} CounterFact dev records" if args.records else f"{len(facts)} facts"
    if args.baseline_facts:
        what += f" ({min(args.baseline_facts, len(facts))} on the baseline path)"
    print(
        f"device: {device_name}, model: {name}, layer {layer}, {steps} max steps, {what}, "
        f"{args.repeats} rounds, medians over facts and rounds; torch threads {torch.get_num_threads()}, "
        f"native bf16 {native_bf16(model.device)}"
    )
    columns = (
        "v* steps | final loss | P(target)"
        if args.shape
        else "v* steps | P(new) edit | P(new) paraphrase | P(new) neighbour"
    )
    reference = REFERENCE_H200.get(args.shape) if device == "cuda" else None
    print(
        "| path | templates s | δ = 0 pass s | key s | v* fit s | update s | other s | total s/edit | mean s/edit "
        f"| speed-up | vs reference | graphs kept/captured | {columns} |"
    )
    print("|---" * (12 + columns.count("|") + 1) + "|")
    baseline = next(iter(rows.values()))[1]
    for label, (seconds, total, quality, graphs, mean_total) in rows.items():
        means = [
            f"{sum(q[i] for q in quality) / len(quality):{'.1f' if i == 0 else '.3f'}}" for i in range(len(quality[0]))
        ]
        versus = f"{reference / total:.1f}x" if reference else "-"
        print(
            f"| {label} | {seconds['templates']:.2f} | {seconds['prepare']:.2f} | {seconds['key']:.3f} | "
            f"{seconds['value']:.2f} | {seconds['update']:.2f} | {total - sum(seconds[k] for k in PARTS):.2f} | "
            f"{total:.3f} | {mean_total:.3f} | "
            f"{baseline / total:.2f}x | {versus} | {graphs} | " + " | ".join(means) + " |"
        )


if __name__ == "__main__":
    main()
