"""Skip the layers below the edited one while optimizing v*: their output never changes.

During the value optimization only δ at layer L changes, so layers 0..L-1 compute the same
hidden states at every step. FrozenPrefix runs them once, then swaps them for stubs that replay
the cached output, so each step runs only layers L..N-1 (and the embedding lookup).
"""
import contextlib

import torch

from factedit.architectures import architecture_of, get_module, module_name
from factedit.hooks import Trace


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns `cached` (or its input, when cached is None)."""

    def __init__(self, cached: torch.Tensor | None):
        super().__init__()
        self.cached = cached

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.cached is None else self.cached


@contextlib.contextmanager
def frozen_prefix(model, layer: int, inputs: dict):
    """Within the block, `model(**inputs)` skips layers 0..layer-1 (same `inputs` only)."""
    if layer == 0:
        yield
        return
    below = module_name(model, "layer", layer - 1)
    with torch.no_grad(), Trace(model, below, stop=True) as trace:
        model(**inputs)
    layers = get_module(model, architecture_of(model).layers)
    originals = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _Replay(trace[below].output if i == layer - 1 else None)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original
