"""How much of a ROME edit leaks into unrelated prompts, before any edit is made.

ΔW = Λ uᵀ with u = C⁻¹k̄ changes the rewrite module's output at a token with key k by
Λ · (uᵀk)/(uᵀk̄)·(uᵀk̄) — i.e. by the fraction r = uᵀk / uᵀk̄ of the full edit. For each CounterFact
record this prints, at the edit layer, r at the subject's last token of the paraphrases (should be
near 1: the edit generalizes) and the largest |r| over all tokens of each neighbourhood prompt
(should be near 0: other subjects keep their answer). Comparing layers and models shows where
the rank-one write is specific.

    python benchmarks/key_overlap.py --model smollm2_135m --layers 1 5 12 20 --records 20
    python benchmarks/key_overlap.py --model gemma3_270m --layers 2 4 8 12 --records 20
"""

import argparse
import statistics

import torch

from factedit import load_model
from factedit.architectures import module_name
from factedit.data.counterfact import DEV_FILE, load_records
from factedit.hooks import run_until
from factedit.rome.compute_key import reference_key, subject_keys
from factedit.rome.context import context_templates
from factedit.stats import load_second_moment
from factedit.tokens import batch_encode


def neighbour_overlap(
    model, tokenizer, prompts: list[str], layer: int, u: torch.Tensor, reference: float
) -> list[float]:
    """max over tokens of |uᵀk_t| / uᵀk̄ for each prompt (padding excluded)."""
    name = module_name(model, "rewrite", layer)
    inputs = batch_encode(tokenizer, prompts)
    keys = run_until(model, name, **inputs)[name].input.double()  # (n, seq, d_mlp)
    ratios = (keys @ u).abs() / abs(reference) * inputs["attention_mask"]
    return ratios.max(dim=1).values.tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[5])
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=None, help="which statistics file (default: the largest)")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    records, _ = load_records(DEV_FILE, limit=args.records)
    templates = context_templates(model, tokenizer)
    print(f"{args.model}, {len(records)} dev records; r = uᵀk / uᵀk̄ at the edit layer")
    print(
        "| layer | paraphrase r (median) | neighbour max-|r| (median) | neighbour max-|r| (90th pct) "
        "| neighbours with max-|r| > 0.5 |"
    )
    print("|---|---|---|---|---|")
    for layer in args.layers:
        second_moment = load_second_moment(model, layer, tokens=args.tokens).double()
        paraphrase, neighbour = [], []
        for record in records:
            key = reference_key(model, tokenizer, record.prompt, record.subject, layer, templates)
            u = torch.linalg.solve(second_moment, key)
            reference = float(u @ key)
            keys = subject_keys(
                model,
                tokenizer,
                [p.replace(record.subject, "{}", 1) for p in record.paraphrase_prompts if record.subject in p],
                record.subject,
                layer,
            ).double()
            paraphrase += (keys @ u / reference).tolist()
            neighbour += neighbour_overlap(model, tokenizer, record.neighborhood_prompts, layer, u, reference)
        q90 = statistics.quantiles(neighbour, n=10)[-1]
        print(
            f"| {layer} | {statistics.median(paraphrase):.2f} | {statistics.median(neighbour):.3f} | {q90:.3f} | "
            f"{sum(r > 0.5 for r in neighbour)}/{len(neighbour)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
