"""One kernel where the model code spells an activation out in many.

GPT-2 and GPT-J compute their tanh-GELU ("gelu_new") in Python: 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
is eight elementwise kernels forward and about a dozen backward, on every live position of every
layer of every v* step. `torch.nn.functional.gelu(x, approximate="tanh")` is the same formula in
one kernel each way. On a GPU, where a v* step is hundreds of small kernels, that is a real share
of the step; the function itself does not change (tested in float64).
"""

import contextlib

import torch
import torch.nn.functional as F

# Class names (transformers.activations) of modules that spell out the tanh approximation of GELU.
TANH_GELU_CLASSES = ("NewGELUActivation", "FastGELUActivation")


class TanhGELU(torch.nn.Module):
    """GELU with the tanh approximation, one fused kernel: 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


@contextlib.contextmanager
def fused_activations(model):
    """Inside the block, every spelled-out tanh-GELU module of `model` is a TanhGELU; the original
    modules are back in place afterwards (also after an exception). Yields how many were replaced."""
    replaced = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ in TANH_GELU_CLASSES:
                replaced.append((parent, name, child))
    try:
        for parent, name, _ in replaced:
            setattr(parent, name, TanhGELU())
        yield len(replaced)
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)
