"""Compute once what δ cannot change, so each v* step runs only the part it can.

δ is added at layer L, at each row's subject last token s_r. Two parts of the forward pass never
see it: the layers below L (every position), and, in layers L and above, the positions before s_r
(attention is causal). `frozen_context` runs the full batch once, keeps the input of layer L and
each layer's keys/values of the frozen positions, and hands back a `LiveBatch` holding only the
positions s_r, s_r + 1, ... of each row. Inside the block, `model(**live.inputs)` replays layers
0..L-1 from the cache and attends to the cached keys/values, so it computes exactly what the full
forward computes at those positions (tested against it in float64).

The same run is the edit's one pass through the unedited model (`LiveBatch.zero_run`): the keys k
(compute_key.py), v₀, the KL reference and the known-answer check all read it.

When some facts of a batch have stopped, `LiveBatch.narrowed` cuts the batch down to the rows of
the others (and to the longest of those rows), so that a step no longer computes rows it never reads.

pad=True rounds the live batch's sizes up to buckets (BUCKETS: frozen keys, live positions,
target tokens), with the extra keys masked out and the extra target tokens weighted 0, so that
most facts give the same shapes and a captured CUDA graph of the step serves them all (step_graph.py).
"""

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from factedit.architectures import architecture_of, get_module, module_name
from factedit.hooks import (
    PrefixCache,
    Trace,
    as_attention_mask,
    attention_mask_kind,
    cache_parameter,
    prefix_causal_mask,
)
from factedit.rome.fast.low_precision import bf16_autocast
from factedit.rome.value_batch import ValueBatch, ZeroRun

log = logging.getLogger(__name__)
_CHECKED: dict[tuple, bool] = {}  # (model class, attention) -> whether its live forward matched the full one
# pad=True rounds each size up to a multiple of these. Live positions are what a step computes
# (each one runs through every layer from L up), so they stay exact; frozen keys and target tokens
# cost little to pad. On the first 100 CounterFact dev records this leaves 5 distinct shapes.
BUCKETS = {"frozen": 32, "live": 1, "target": 4}


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns `cached` (or its input, when cached is None), as a
    1-tuple where the model's layers return tuples (older transformers)."""

    def __init__(self, cached: torch.Tensor | None, as_tuple: bool = False):
        super().__init__()
        self.cached, self.as_tuple = cached, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        hidden = hidden_states if self.cached is None else self.cached
        return (hidden,) if self.as_tuple else hidden


@dataclass
class LiveBatch:
    """The positions δ can reach. Row r holds positions s_r .. s_r + n_live - 1 (past its end: padding).

    inputs: keyword arguments for the model (input_ids and position_ids (rows, n_live), a 4-D
    attention mask (rows, 1, n_live, n_frozen + n_live), the frozen keys/values);
    subject_pos: (rows,) zeros; target_pos: (F·T, n_target) indices into the live positions;
    target_ids, target_weight: (F·T, n_target) the new object's tokens, weighted 1 (0: padding);
    layer_input: (rows, n_live, d_model) layer L's input at the live positions (replayed below L);
    cache: the frozen keys/values (also in `inputs`, under the model's own argument name);
    zero_run: the full run at δ = 0 that all of this was cut from;
    frozen_lengths, live_lengths: (rows,) the frozen positions each row attends to, and its live
    positions that are not padding; replay: the stand-in for layer L-1 that hands layer L `layer_input`.
    """

    inputs: dict
    subject_pos: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_weight: torch.Tensor
    layer_input: torch.Tensor
    cache: PrefixCache
    zero_run: ZeroRun
    frozen_lengths: torch.Tensor
    live_lengths: torch.Tensor
    replay: "_Replay | None" = None

    def narrowed(self, rows: torch.Tensor, n_templated: int) -> "LiveBatch":
        """The LiveBatch of `rows` alone (indices into this batch's rows; the first n_templated are templated
        rows, in the order of the target tensors), cut to the longest of them, and from now on the one the
        replay hands layer L: a step on it computes what this batch's step computes at those rows."""
        n_frozen, n_live = int(self.frozen_lengths[rows].max()), int(self.live_lengths[rows].max())
        n_frozen_all = self.cache.keys[0].shape[-2]
        mask = self.inputs["attention_mask"][rows, :, :n_live]  # frozen keys first, then the live positions
        mask = torch.cat([mask[..., :n_frozen], mask[..., n_frozen_all : n_frozen_all + n_live]], dim=-1)
        cache = PrefixCache([k[rows, :, :n_frozen] for k in self.cache.keys],
                            [v[rows, :, :n_frozen] for v in self.cache.values])  # fmt: skip
        cache_name = next(name for name, value in self.inputs.items() if value is self.cache)
        templated = rows[:n_templated]
        narrowed = LiveBatch(
            inputs={
                **self.inputs,
                "input_ids": self.inputs["input_ids"][rows, :n_live],
                "position_ids": self.inputs["position_ids"][rows, :n_live],
                "attention_mask": mask,
                cache_name: cache,
            },  # fmt: skip
            subject_pos=self.subject_pos[rows],
            target_pos=self.target_pos[templated],
            target_ids=self.target_ids[templated],
            target_weight=self.target_weight[templated],
            layer_input=self.layer_input[rows, :n_live],
            cache=cache,
            zero_run=self.zero_run,
            frozen_lengths=self.frozen_lengths[rows],
            live_lengths=self.live_lengths[rows],
            replay=self.replay,
        )
        if self.replay is not None:
            self.replay.cached = narrowed.layer_input
        return narrowed

    def step_inputs(self, layer: int) -> list[torch.Tensor]:
        """Every tensor of this batch a v* step at `layer` reads, in a fixed order (step_graph.py)."""
        return [
            self.inputs["input_ids"],
            self.inputs["position_ids"],
            self.inputs["attention_mask"],
            self.layer_input,
            *self.cache.keys[layer:],
            *self.cache.values[layer:],
            self.subject_pos,
            self.target_pos,
            self.target_ids,
            self.target_weight,
        ]


def can_freeze(model, batch: ValueBatch) -> bool:
    """True when the attention implementation takes the 4-D masks built here (sdpa, eager) and no
    sliding window is shorter than the prompts (the mask here is plain causal)."""
    window = getattr(model.config, "sliding_window", None)
    return (
        attention_mask_kind(model) is not None
        and (window is None or window >= batch.input_ids.shape[1])
        and _CHECKED.get(_model_key(model)) is not False
    )


def _model_key(model) -> tuple:
    return type(model), model.config._attn_implementation


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _first_keys(cached: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions of (rows, heads, seq, d_head) keys/values; zeros past seq (masked out)."""
    return cached[:, :, :n] if cached.shape[-2] >= n else F.pad(cached, (0, 0, 0, n - cached.shape[-2]))


def _padded_targets(target_ids: torch.Tensor, target_pos: torch.Tensor, target_weight: torch.Tensor, n: int):
    """(F·T, n_target) target ids, positions and weights repeated out to n columns, the new ones weighted 0."""
    extra = n - target_ids.shape[1]
    return (
        torch.cat([target_ids, target_ids[:, -1:].expand(-1, extra)], dim=1),
        torch.cat([target_pos, target_pos[:, -1:].expand(-1, extra)], dim=1),
        torch.cat([target_weight, target_weight.new_zeros(len(target_weight), extra)], dim=1),
    )


def _step_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype, bf16: bool) -> torch.Tensor:
    """The live mask in the form the steps' attention reads. Under bfloat16, sdpa gets it additive
    (0 / -inf) in bfloat16: what sdpa makes of a boolean mask at every call, in every layer, here made once."""
    if kind == "bool" and bf16:
        return as_attention_mask(allowed, "additive", torch.bfloat16, blocked=float("-inf"))
    return as_attention_mask(allowed, kind, dtype)


class FrozenRun(NamedTuple):
    """What one full forward at δ = 0 keeps (bf16: computed under bfloat16 autocast). Hidden states and
    the rewrite module's input/output come in the model's dtype; keys and values in the dtype the
    attention made them in, which is what a step's attention makes too (under autocast often bfloat16),
    so that the step concatenates them without a cast (float32 copies would be cast back at every step)."""

    layer_input: torch.Tensor  # (rows, seq, d_model) layer L's input
    final_hidden: torch.Tensor  # (rows, seq, d_model) the final norm's output
    keys: list[torch.Tensor]  # per layer, (rows, heads, seq, d_head): attention keys and values, as made
    values: list[torch.Tensor]
    rewrite_input: torch.Tensor  # (rows, seq, d_in) the rewrite module's input (ROME's keys k)
    rewrite_output: torch.Tensor  # (rows, seq, d_model) its output (ROME's values v)
    as_tuple: bool  # whether the decoder layers return tuples


def _frozen_run(model, layer: int, batch: ValueBatch, rewrite: str, bf16: bool = False) -> FrozenRun:
    """One full forward at δ = 0 through `batch`, keeping what the v* steps and the update read."""
    name, final = module_name(model, "layer", layer), module_name(model, "final_norm")
    skip_logits = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        skip_logits["logits_to_keep"] = 1  # the run needs hidden states and keys/values, not the vocabulary
    with (
        noting_tuple_outputs(model) as returns_tuple,
        torch.no_grad(),
        bf16_autocast(model.device, bf16),
        Trace(model, [name, final, rewrite], retain_input=True) as trace,
    ):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=True, **skip_logits)
    cache = getattr(out, "cache", None)  # transformers >= 5.2x; earlier: past_key_values
    cache = out.past_key_values if cache is None else cache
    dtype = model.dtype  # under autocast some come out bfloat16; the keys/values stay as they are
    return FrozenRun(
        trace[name].input.to(dtype),
        trace[final].output.to(dtype),
        [c.keys for c in cache.layers],
        [c.values for c in cache.layers],
        trace[rewrite].input.to(dtype),
        trace[rewrite].output.to(dtype),
        returns_tuple[0],
    )


def _replays_the_full_run(model, live: LiveBatch, batch: ValueBatch, bf16: bool) -> bool:
    """Whether the live forward at δ = 0 gives the full run's final hidden states (a check of the
    model code's cache and mask handling, made once per model)."""
    final = module_name(model, "final_norm")
    positions = live.inputs["position_ids"]
    index = positions.clamp(max=batch.input_ids.shape[1] - 1)
    valid = positions < batch.attention_mask.sum(dim=1)[:, None]
    full = live.zero_run.final_hidden
    wanted = full.gather(1, index[..., None].expand(-1, -1, full.shape[-1]))[valid]
    try:
        with torch.no_grad(), bf16_autocast(model.device, bf16), Trace(model, final, stop=True) as trace:
            model(**live.inputs)
        got = trace[final].output[valid]
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as error:
        log.warning(
            "v* runs the full forward each step: %s cannot reuse frozen keys/values (%s)",
            type(model).__name__,
            str(error).splitlines()[0],
        )
        return False
    # a cache or mask the model code mishandles moves hidden states by O(their size);
    # TF32 rounding ~1e-3, bfloat16 ~1e-2
    exact = torch.get_float32_matmul_precision() == "highest" or got.dtype == torch.float64
    tolerance = 5e-2 if bf16 else 1e-3 if exact else 1e-2
    if got.shape != wanted.shape or (got - wanted).abs().max() > tolerance * wanted.abs().max():
        log.warning(
            "v* runs the full forward each step: %s gives other hidden states from frozen keys/values",
            type(model).__name__,
        )
        return False
    return True


@contextlib.contextmanager
def frozen_context(model, layer: int, batch: ValueBatch, bf16: bool = False, pad: bool = False, role: str = "rewrite"):
    """Yield the LiveBatch of `batch`; layers 0..L-1 replay inside the block.
    bf16: the frozen run's products under bfloat16 autocast (for a bf16 fit; its hidden states are float32).
    role: the module δ shifts at layer L (its input and output give the keys and v₀).
    pad: sizes rounded up to BUCKETS (the same losses: the padding is masked out or weighted 0).

    Yields None (the caller then runs the full forward) when this model class's code does not
    reproduce the full run from frozen keys/values; checked on its first use (`can_freeze` is then
    false for the class, so the check's full forward is not paid again).
    """
    checked = _model_key(model)
    try:
        run = _frozen_run(model, layer, batch, module_name(model, role, layer), bf16)
    except (AttributeError, TypeError) as error:  # a cache without per-layer keys/values
        log.warning("v* runs the full forward each step: no frozen keys/values (%s)", error)
        _CHECKED[checked] = False
        yield None
        return
    live = _live_batch(model, batch, run, bf16, pad)
    with replayed_below(model, layer, live.layer_input, run.as_tuple) as replay:
        live.replay = replay
        if checked not in _CHECKED:
            _CHECKED[checked] = _replays_the_full_run(model, live, batch, bf16)
        if _CHECKED[checked]:
            yield live
            return
    yield None  # with the decoder layers back in place


def _live_batch(model, batch: ValueBatch, run: FrozenRun, bf16: bool, pad: bool) -> LiveBatch:
    """The live positions of `batch` (each row from its subject's last token on) and their frozen context."""
    first, lengths = batch.subject_pos, batch.attention_mask.sum(dim=1)
    n_frozen, n_live, n_target = int(first.max()), int((lengths - first).max()), batch.target_ids.shape[1]
    if pad:
        n_frozen, n_live = _round_up(n_frozen, BUCKETS["frozen"]), _round_up(n_live, BUCKETS["live"])
        n_target = _round_up(n_target, BUCKETS["target"])
    positions = first[:, None] + torch.arange(n_live, device=first.device)  # (rows, n_live)
    index = positions.clamp(max=batch.input_ids.shape[1] - 1)
    live_hidden = run.layer_input.gather(1, index[..., None].expand(-1, -1, run.layer_input.shape[-1]))
    mask = _step_mask(prefix_causal_mask(first, n_frozen, n_live), attention_mask_kind(model), live_hidden.dtype, bf16)
    cache = PrefixCache([_first_keys(k, n_frozen) for k in run.keys], [_first_keys(v, n_frozen) for v in run.values])
    n_rows = len(batch.target_pos)  # the templated prompts' rows come first
    target_ids, target_pos, target_weight = _padded_targets(
        batch.target_ids, batch.target_pos - first[:n_rows, None], batch.target_weight, n_target
    )
    return LiveBatch(
        inputs={
            "input_ids": batch.input_ids.gather(1, index),
            "position_ids": positions,
            "attention_mask": mask,
            cache_parameter(model.forward) or "past_key_values": cache,
            "use_cache": True,
        },
        subject_pos=torch.zeros_like(first),
        target_pos=target_pos,
        target_ids=target_ids,
        target_weight=target_weight,
        layer_input=live_hidden,
        cache=cache,
        zero_run=ZeroRun(run.rewrite_input, run.rewrite_output, run.final_hidden),
        frozen_lengths=first,
        live_lengths=lengths - first,
    )


@contextlib.contextmanager
def replayed_below(model, layer: int, hidden: torch.Tensor, as_tuple: bool):
    """Inside the block decoder layers 0..layer-1 stand aside (`_Replay`), the last of them handing layer
    `layer` `hidden` as its input; yields that stand-in (None for layer 0). as_tuple: the model's layers
    return tuples (noting_tuple_outputs)."""
    layers = get_module(model, architecture_of(model).layers)
    originals = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _Replay(hidden if i == layer - 1 else None, as_tuple)
        yield layers[layer - 1] if layer > 0 else None
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


@contextlib.contextmanager
def noting_tuple_outputs(model):
    """Yields a list that a forward inside the block fills with whether decoder layer 0 returned a tuple
    (older transformers), which is what the `_Replay` stand-ins must return."""
    noted = []
    handle = get_module(model, module_name(model, "layer", 0)).register_forward_hook(
        lambda module, inputs, output: noted.append(isinstance(output, tuple))
    )
    try:
        yield noted
    finally:
        handle.remove()
