"""Where a v* step's time goes on a GPU, at a real shape with random weights (diagnostic, prints only).

    python benchmarks/device/profile_step.py --shape gpt2-xl

Times (synchronized, median of 10): the eager loss forward, forward + backward, one eager step
(forward, backward, Adam, clamp), the same step replayed from a CUDA graph; then a whole
Trainer.fit with graphs, step by step; then the profiler's top CUDA kernels of one eager step.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_edit import FACTS, SHAPES, load  # noqa: E402

from factedit.rome import resolve_hparams  # noqa: E402
from factedit.rome.compute_value import ValueOptimizer, compute_value, value_optimizer  # noqa: E402
from factedit.rome.context import context_templates  # noqa: E402
from factedit.rome.fast import value_engine  # noqa: E402
from factedit.rome.fast.frozen_prefix import can_freeze  # noqa: E402
from factedit.rome.value_batch import value_batch  # noqa: E402

CUDA = torch.cuda.is_available()
sync = torch.cuda.synchronize if CUDA else (lambda: None)


def timed(fn, reps=10):
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return f"{statistics.median(times):.2f} ms (min {min(times):.2f})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="gpt2-xl", choices=sorted(SHAPES))
    parser.add_argument("--layer", type=int, default=None)
    args = parser.parse_args()
    layer = args.layer if args.layer is not None else (17 if args.shape == "gpt2-xl" else 5)
    device = "cuda" if CUDA else "cpu"  # the CPU run only checks the script
    model, tokenizer = load(args.shape, device, "smollm2_135m")
    fact = FACTS[0]
    templates = context_templates(model, tokenizer, [[5, 10], [10, 10]], seed=0)
    batch = value_batch(tokenizer, [fact], templates, device)
    print(
        f"{args.shape} layer {layer}: batch {tuple(batch.input_ids.shape)}, can_freeze {can_freeze(model, batch)}",
        flush=True,
    )
    eager = resolve_hparams(overrides=dict(layer=layer, bf16=False, cuda_graph=False, tf32=True))
    with value_engine(model, layer, batch, eager) as engine:
        ids = engine.live.inputs["input_ids"]
        print(f"live input_ids {tuple(ids.shape)}, layers {model.config.num_hidden_layers - layer}", flush=True)
        module = value_optimizer(engine)
        delta = module.delta

        def forward():
            with torch.no_grad():
                module.objective.losses(delta)

        def forward_backward():
            delta.grad = None
            module.objective.losses(delta)["loss"].sum().backward()

        optimizer = torch.optim.Adam([delta], lr=0.5, capturable=CUDA)
        print("eager forward      ", timed(forward), flush=True)
        print("eager fwd+bwd      ", timed(forward_backward), flush=True)
        print("eager step         ", timed(lambda: module.step(optimizer)), flush=True)
        if CUDA:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    module.step(optimizer)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            start = time.perf_counter()
            with torch.cuda.graph(graph):
                module.step(optimizer)
            torch.cuda.synchronize()
            print(f"capture             {1e3 * (time.perf_counter() - start):.1f} ms", flush=True)
            print("graph replay       ", timed(graph.replay), flush=True)
            del graph
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                module.step(optimizer)
                torch.cuda.synchronize()
            for key in ("device_time_total", "cuda_time_total"):  # the name changed across torch versions
                try:
                    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)
                    break
                except Exception as error:  # noqa: BLE001
                    print("profiler table:", error)
    for graphed in (False, True):
        stamps = []
        hparams = resolve_hparams(
            overrides=dict(
                layer=layer,
                v_num_grad_steps=20,
                loss_threshold=0.0,
                tf32=True,
                cuda_graph=graphed,
                bf16=False,
                graph_cache=0,
            )
        )
        original = ValueOptimizer.training_step

        def stamped(self, *a):
            stamps.append(time.perf_counter())  # noqa: B023 (called within this iteration)
            return original(self, *a)  # noqa: B023

        ValueOptimizer.training_step = stamped
        start = time.perf_counter()
        with value_engine(model, layer, batch, hparams) as engine:
            prepared = time.perf_counter()
            compute_value(engine, [fact])
        ValueOptimizer.training_step = original
        gaps = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
        print(
            f"fit graphs={graphed}: prepare {prepared - start:.3f} s, fit {time.perf_counter() - prepared:.3f} s, "
            f"step gaps ms: {' '.join(f'{g:.1f}' for g in gaps)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
