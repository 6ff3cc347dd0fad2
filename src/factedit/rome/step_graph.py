"""Captured v* steps kept from one edit to the next (editor.graph_cache).

A CUDA graph replays fixed kernels on fixed memory. The first fit of given shapes runs one eager
step, captures the next one (forward, backward, Adam, clamp) and replays it; the graph is then kept.
A later fit with the same shapes (frozen_prefix pads the live batch to buckets, so most facts share
them) copies its own inputs into the captured ones, zeroes δ and Adam's state, and replays from its
first step: no eager step and no capture, which cost about three replays at GPT-2 XL shape.

What a step reads: the live batch (`LiveBatch.step_inputs`), v₀ and the KL reference distribution,
and the weights. The weights are the model's own tensors, changed in place by edits (so a replay
sees the edited weights), or the bfloat16 copies of `low_precision.bf16_fit`, which are kept here
with the graphs and refreshed from the float32 weights at every fit. Graphs are kept per model
(least recently used out first), all in one memory pool: fits never run at the same time.

cuBLAS workspaces: PyTorch caches one per stream and hands it to every capture on that stream, so
a graph can bake in a workspace that lives in another graph's memory pool and is gone once that
graph is freed (an illegal memory access at the next replay; pytorch/pytorch#193402). Each capture
here therefore starts with the cache cleared (its workspace is then allocated inside its own pool),
and so does the code after graphs are freed here, for whatever captures next.
"""
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelGraphs]" = weakref.WeakKeyDictionary()


@dataclass
class StepGraph:
    """One captured step and the tensors it reads and writes.

    inputs: what the step reads (copied into by a later fit); delta: δ (d_model,), updated by each
    replay; delta_before: δ as the replay found it; losses: (len(LOSS_NAMES),) of the replayed step;
    optimizer_state: Adam's step count and moments, zeroed for a new fit.
    """

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    delta: torch.Tensor
    delta_before: torch.Tensor
    losses: torch.Tensor
    optimizer_state: list[torch.Tensor]

    def start_fit(self, inputs: list[torch.Tensor]) -> None:
        """Make the next replay the first step of a new fit on `inputs` (the shapes captured)."""
        with torch.no_grad():
            for static, new in zip(self.inputs, inputs, strict=True):
                static.copy_(new)
            self.delta.zero_()
            for tensor in self.optimizer_state:
                tensor.zero_()


@dataclass
class ModelGraphs:
    """A model's kept graphs by signature, their shared memory pool, and the bfloat16 weight copies they read."""

    size: int
    graphs: OrderedDict = field(default_factory=OrderedDict)
    pool: tuple = field(default_factory=torch.cuda.graph_pool_handle)
    bf16_weights: dict = field(default_factory=dict)  # id(float32 weight) -> (float32 weight, bfloat16 Parameter)

    def get(self, signature: tuple) -> StepGraph | None:
        graph = self.graphs.get(signature)
        if graph is not None:
            self.graphs.move_to_end(signature)
        return graph

    def put(self, signature: tuple, graph: StepGraph) -> None:
        self.graphs[signature] = graph
        if len(self.graphs) > self.size:
            while len(self.graphs) > self.size:
                self.graphs.popitem(last=False)
            clear_cublas_workspaces()


def clear_cublas_workspaces() -> None:
    """Drop PyTorch's cached cuBLAS/cuBLASLt workspaces (see the module docstring); later calls allocate new ones."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def graphs_of(model, size: int) -> ModelGraphs | None:
    """The model's kept graphs (created on first use), or None when size is 0 (capture per fit, keep nothing)."""
    if size <= 0:
        return None
    kept = _MODELS.get(model)
    if kept is None:
        kept = _MODELS[model] = ModelGraphs(size)
    kept.size = size
    return kept


def release_graphs(model) -> None:
    """Free the model's kept graphs and bfloat16 weight copies (GPU memory)."""
    if _MODELS.pop(model, None) is not None:
        clear_cublas_workspaces()


def weights_signature(model) -> tuple:
    """Where the model's parameters and buffers live: a graph read them there when it was captured."""
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())


def inputs_signature(inputs: list[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs)
