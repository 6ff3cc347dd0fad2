"""Operations per bfloat16 v* step: what runs now against autocast alone, counted on the CPU.

On a GPU a v* step is one CUDA graph replay, and at GPT-2 XL shape that replay is launch-bound:
its time follows the number of kernels more than their size. This script counts the operations
of one step (forward, backward, Adam, clamp) with `torch.profiler`, per layer that δ reaches, at
the depth and edit layer of real models (a narrow width: the count does not depend on it):

- "autocast alone": every product casts its float32 weight and bias to bfloat16, the frozen
  keys/values are float32 (attention then casts them back at every step), and sdpa gets a boolean
  mask (which it converts to an additive one in every layer at every step);
- "now": `bf16_fit` casts the weights and the products' biases once per fit, the frozen
  keys/values stay in the dtype the attention made them in, and sdpa gets the additive mask made
  once (the same bits: tests/test_rome.py).

Counted are the operations that compute (views, reshapes and dispatch wrappers left out); casts
are `aten::_to_copy`. The CPU runs attention through the math backend and has its own autocast
op lists, so a GPU's kernel counts differ; the casts removed here are made on both.

    python benchmarks/count_step_ops.py
"""

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_edit import FACTS, SHAPES, load  # noqa: E402

from factedit.rome import resolve_hparams  # noqa: E402
from factedit.rome.compute_value import value_optimizer  # noqa: E402
from factedit.rome.context import context_templates  # noqa: E402
from factedit.rome.fast import value_engine  # noqa: E402
from factedit.rome.fast.low_precision import bf16_fit  # noqa: E402
from factedit.rome.value_batch import value_batch  # noqa: E402

NARROW = {
    "gpt2-xl": dict(n_embd=64, n_head=4),
    "gpt-j": dict(n_embd=64, n_head=4, rotary_dim=8),
    "llama-7b": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4),
}
EDIT_LAYER = {"gpt2-xl": 17, "gpt-j": 5, "llama-7b": 5}  # ROME's for GPT-2 XL / GPT-J
NOT_COUNTED = {  # views, allocations, casts' wrappers and composite ops: what they call is counted
    "aten::" + name
    for name in (
        "view as_strided transpose t reshape _reshape_alias expand slice select unsqueeze squeeze _unsafe_view permute "
        "split split_with_sizes chunk narrow unflatten alias detach empty empty_strided empty_like contiguous "
        "resolve_conj resolve_neg lift_fresh result_type is_nonzero item _local_scalar_dense "
        "to matmul linear dropout layer_norm scaled_dot_product_attention"
    ).split()
}


def step_counts(module, optimizer) -> tuple[int, int]:
    """(casts, computing operations) of one v* step."""
    module.step(optimizer)  # warm: Adam's state exists, as in every step but the first
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module.step(optimizer)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    inside_cast = lambda e: e.cpu_parent is not None and e.cpu_parent.name == "aten::_to_copy"  # its copy_ is the cast
    casts = sum(e.name == "aten::_to_copy" for e in events)
    return casts, sum(e.name not in NOT_COUNTED and not inside_cast(e) for e in events)


def count(shape: str) -> tuple[int, dict]:
    SHAPES[shape] = {**SHAPES[shape], **NARROW[shape]}
    model, tokenizer = load(shape, "cpu", "smollm2_135m")
    layer, fact = EDIT_LAYER[shape], FACTS[0]
    templates = context_templates(model, tokenizer, [[5, 10], [10, 10]], seed=0)
    batch = value_batch(tokenizer, [fact], templates)
    hparams = resolve_hparams(overrides=dict(layer=layer, bf16=True, cuda_graph=False))
    counts = {}
    with value_engine(model, layer, batch, hparams) as engine:
        live = engine.live
        for label in ("now", "autocast alone"):
            if label == "autocast alone":
                live.cache.keys[:] = [k.float() for k in live.cache.keys]
                live.cache.values[:] = [v.float() for v in live.cache.values]
                if (
                    live.inputs["attention_mask"].dtype == torch.bfloat16
                ):  # sdpa: the boolean mask it converts at every call
                    live.inputs["attention_mask"] = live.inputs["attention_mask"] == 0
            module = value_optimizer(engine)
            optimizer = torch.optim.Adam([module.delta], lr=0.5)
            with bf16_fit(model, layer) if label == "now" else sdpa_kernel([SDPBackend.MATH]):
                counts[label] = step_counts(module, optimizer)
    return model.config.num_hidden_layers - layer, counts


def main():
    torch.manual_seed(0)
    print(
        "| shape (depth, edit layer) | layers δ reaches | casts per layer: autocast alone → now "
        "| operations per layer: autocast alone → now | ratio |"
    )
    print("|---|---:|---|---|---:|")
    for shape in NARROW:
        layers, counts = count(shape)
        (casts_before, ops_before), (casts_now, ops_now) = counts["autocast alone"], counts["now"]
        print(
            f"| {shape} (layer {EDIT_LAYER[shape]}) | {layers} | "
            f"{casts_before / layers:.1f} → {casts_now / layers:.1f} | "
            f"{ops_before / layers:.1f} → {ops_now / layers:.1f} | {ops_before / ops_now:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
