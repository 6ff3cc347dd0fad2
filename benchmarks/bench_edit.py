"""Seconds per ROME edit, split into templates / key / v* / update: fast path vs the straightforward one.

The straightforward implementation (`fast=False`) runs the full model forward at every step and
unembeds every position, as the reference code does; the fast path runs the layers below the edit
once (frozen prefix) and unembeds only the positions the loss reads. Both edit the same facts from
the same start; the table also shows that the edits are as good (P(new) on the edit prompt and a
paraphrase, P(true) kept on a neighbour).

    python benchmarks/bench_edit.py                     # default model on this machine
    python benchmarks/bench_edit.py --shape gpt2-xl     # random weights at a real shape (GPU)
"""
import argparse
import logging
import time

import torch

from factedit import Fact, edit, load_model, revert_edits
from factedit.architectures import as_out_in, rewrite_weight
from factedit.probes import next_token_logits

FACTS = [
    Fact(subject="Eiffel Tower", prompt="{} is located in the city of", target_new="Rome", target_true="Paris",
         generalization_probes=["To get to the Eiffel Tower from Berlin, you take a train to"],
         specificity_probes=["The Louvre is located in the city of"]),
    Fact(subject="Colosseum", prompt="The {} is located in the city of", target_new="Athens", target_true="Rome",
         generalization_probes=["The Colosseum is an ancient amphitheatre in the city of"],
         specificity_probes=["The Pantheon is located in the city of"]),
]
SHAPES = {  # model_type and sizes of real models, built with random weights
    "gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, n_positions=1024),
    "gpt-j": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64),
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
}


def first_token_prob(model, tokenizer, prompt, word):
    token = tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]
    return next_token_logits(model, tokenizer, [prompt])[0].softmax(-1)[token].item()


def load(shape, device):
    if shape is None:
        return load_model("smollm2_135m", device=device)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": shape, "source": "tiny", "tokenizer": "smollm2_135m", "config": SHAPES[shape]})
    return load_model(cfg, device=device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--facts", type=int, default=len(FACTS), help="how many of the benchmark facts to edit")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load(args.shape, device)
    d_mlp = as_out_in(model, rewrite_weight(model, args.layer)).shape[1]
    try:
        from factedit.stats import load_second_moment

        stats = {args.layer: load_second_moment(model, args.layer)}
    except Exception:  # random shapes have no statistics: the update step costs the same
        stats = {args.layer: torch.eye(d_mlp, dtype=torch.float64)}
    base = dict(layer=args.layer, v_num_grad_steps=args.steps, seed=0)
    if args.shape:
        base["loss_threshold"] = 0.0  # random weights: run every step
    facts = FACTS[: args.facts]
    rows = {}
    for label, fast in (("straightforward", False), ("fast", True)):
        for fact in facts:
            warm = edit(model, tokenizer, fact, stats=stats, hparams={**base, "fast": fast, "v_num_grad_steps": 1})
            revert_edits(model, warm.backup)  # warm-up: context templates cached, kernels loaded
            break
        seconds, quality = {"templates": 0.0, "key": 0.0, "value": 0.0, "update": 0.0}, []
        start = time.perf_counter()
        for fact in facts:
            edits = edit(model, tokenizer, fact, stats=stats, hparams={**base, "fast": fast})
            for k, v in edits[0].info["seconds"].items():
                seconds[k] += v / len(facts)
            if not args.shape:
                quality.append((first_token_prob(model, tokenizer, fact.text, fact.target_new),
                                first_token_prob(model, tokenizer, fact.generalization_probes[0], fact.target_new),
                                first_token_prob(model, tokenizer, fact.specificity_probes[0], fact.target_new)))
            revert_edits(model, edits.backup)
        rows[label] = (seconds, (time.perf_counter() - start) / len(facts), quality)
    print(f"device: {device}, model: {args.shape or 'smollm2_135m'}, layer {args.layer}, {args.steps} max steps")
    print(f"| path | templates s | key s | v* s | update s | total s/edit | speed-up | P(new) edit | P(new) paraphrase | P(new) neighbour |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    baseline = rows["straightforward"][1]
    for label, (seconds, total, quality) in rows.items():
        mean = lambda i: f"{sum(q[i] for q in quality) / len(quality):.3f}" if quality else "-"
        print(f"| {label} | {seconds['templates']:.2f} | {seconds['key']:.2f} | {seconds['value']:.2f} | "
              f"{seconds['update']:.2f} | {total:.2f} | {baseline / total:.2f}x | {mean(0)} | {mean(1)} | {mean(2)} |")


if __name__ == "__main__":
    main()
