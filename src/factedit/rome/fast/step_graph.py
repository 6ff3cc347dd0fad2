"""v* steps as CUDA graph replays (editor.cuda_graph), kept from one edit to the next (editor.graph_cache).

A CUDA graph replays fixed kernels on fixed memory. The first fit of given shapes runs GRAPH_WARMUP
eager steps, captures the next one (forward, backward, Adam, clamp) and replays it; the graph is then kept.
The host reads a step's losses while the next step replays (`GraphSteps`): when some facts reach
the loss threshold at step i, step i + 1 has already moved their δ, so it is taken back for them
(δ ← delta_before), and the fit ends exactly as an eager fit that stopped after step i.
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

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)
GRAPH_WARMUP = 1  # eager steps before a CUDA graph is captured (they are steps of the optimization too)
_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelGraphs]" = weakref.WeakKeyDictionary()


@dataclass
class StepGraph:
    """One captured step and the tensors it reads and writes.

    inputs: what the step reads (copied into by a later fit); delta, delta_before, active: δ (F, d_model)
    after and before the replayed step, and which facts it still moves (the fit's own state when
    captured); losses: (len(LOSS_NAMES), F) of the replayed step; optimizer_state: Adam's step count
    and moments, zeroed for a new fit.
    """

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    delta: torch.Tensor
    delta_before: torch.Tensor
    active: torch.Tensor
    losses: torch.Tensor
    optimizer_state: list[torch.Tensor]

    def start_fit(self, inputs: list[torch.Tensor]) -> None:
        """Make the next replay the first step of a new fit on `inputs` (the shapes captured)."""
        with torch.no_grad():
            for static, new in zip(self.inputs, inputs, strict=True):
                static.copy_(new)
            self.delta.zero_()
            self.active.fill_(True)
            for tensor in self.optimizer_state:
                tensor.zero_()


class GraphSteps:
    """Steps of one fit on a GPU: GRAPH_WARMUP eager steps (on a side stream), then one captured
    graph replayed, or from the first step a graph kept from an earlier fit of the same signature.

    step(optimizer) -> losses runs one step on `state` (its delta, delta_before, active); a replayed
    step's losses are read while the next one runs (`step` returns the steps finished so far).
    """

    def __init__(
        self, step, optimizer, state, inputs: list[torch.Tensor], signature: tuple, kept: "ModelGraphs | None"
    ):
        self._step, self._optimizer, self._state = step, optimizer, state
        self._inputs, self._signature, self._kept = inputs, signature, kept
        self.graph: StepGraph | None = None
        self.graph_use = (
            None  # "captured" (this fit captured its graph) or "kept" (replayed one kept from an earlier fit)
        )
        self.eager_steps, self._pending = 0, None  # _pending: the replayed step whose losses are not read yet

    def step(self) -> list[list]:
        """Run one step; the losses of the steps finished since the last call."""
        if self.graph is None and self.eager_steps == 0 and self._kept is not None:
            kept = self._kept.get(self._signature)
            if kept is not None:
                kept.start_fit(self._inputs)
                self.graph, self.graph_use = kept, "kept"
                kept.graph.replay()
                return [kept.losses.tolist()]
        if self.graph is None:
            return [self._eager_step().tolist()]
        self.graph.graph.replay()
        previous, self._pending = self._pending, _copy_to_host(self.graph.losses)
        return [] if previous is None else [_read(previous)]

    def stop_facts(self, facts: list[int]) -> None:
        """These facts reached the threshold at the step just read: keep their δ from then on (taking
        back the step already replayed after it, if any)."""
        state = self.graph if self.graph is not None else self._state
        with torch.no_grad():
            if self._pending is not None:
                state.delta[facts] = state.delta_before[facts]
            state.active[facts] = False

    def finish(self) -> list[list]:
        """The last replayed step's losses; δ back in the fit's own tensor; the graph freed unless kept."""
        pending = [] if self._pending is None else [_read(self._pending)]
        if self.graph is not None and self.graph.delta.data_ptr() != self._state.delta.data_ptr():  # a kept graph's δ
            with torch.no_grad():
                self._state.delta.copy_(self.graph.delta)
        freed = self.graph is not None and self._kept is None
        self.graph = self._pending = None  # unless kept (graph_cache), frees the graph and its pool
        if freed:
            clear_cublas_workspaces()
        return pending

    def _eager_step(self) -> torch.Tensor:
        """An eager step on a side stream; after GRAPH_WARMUP of them, the next step is captured (not run)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self._step(self._optimizer)
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1
        if self.eager_steps == GRAPH_WARMUP:
            self._capture()
        return losses

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        clear_cublas_workspaces()  # this graph's cuBLAS workspace in its own pool, not one cached from another graph
        try:
            with torch.cuda.graph(graph, pool=self._kept.pool if self._kept else None):
                graph_losses = self._step(self._optimizer)
        except RuntimeError as error:  # a kernel that cannot be captured: the later steps run eagerly
            log.warning("v* runs without CUDA graphs (%s)", str(error).splitlines()[0])
            self.eager_steps = -(1 << 30)  # never capture again
            return
        state = self._optimizer.state[self._state.delta]  # Adam's step, exp_avg, exp_avg_sq (GPU tensors: capturable)
        self.graph = StepGraph(
            graph,
            self._inputs,
            self._state.delta.detach(),
            self._state.delta_before,
            self._state.active,
            graph_losses,
            [t for t in state.values() if torch.is_tensor(t)],
        )
        self.graph_use = "captured"
        if self._kept is not None:
            self._kept.put(self._signature, self.graph)


def _copy_to_host(losses: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue a copy of a step's losses to pinned host memory; returns the buffer and its event."""
    buffer = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
    buffer.copy_(losses, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return buffer, done


def _read(pending: tuple[torch.Tensor, torch.cuda.Event]) -> list:
    """Wait for a `_copy_to_host` copy only (not for the work queued after it) and read it."""
    buffer, done = pending
    done.synchronize()
    return buffer.tolist()


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


def graph_signature(model, options: tuple, inputs: list[torch.Tensor]) -> tuple:
    """What a kept graph must have been captured with to replay a fit: the fit's options (layer,
    module, precision, hyperparameters), the matmul precision and attention, the inputs' shapes and
    where the weights live."""
    return (
        options,
        torch.get_float32_matmul_precision(),
        model.config._attn_implementation,
        inputs_signature(inputs),
        weights_signature(model),
    )


def weights_signature(model) -> tuple:
    """Where the model's parameters and buffers live: a graph read them there when it was captured."""
    return tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())


def inputs_signature(inputs: list[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in inputs)
