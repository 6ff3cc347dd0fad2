"""Compute once what δ cannot change, so each v* step runs only the part it can.

δ is added at layer L, at each row's subject last token s_r. Two parts of the forward pass never
see it: the layers below L (every position), and, in layers L and above, the positions before s_r
(attention is causal). `frozen_context` runs the full batch once, keeps the input of layer L and
each layer's keys/values of the frozen positions, and hands back a `LiveBatch` holding only the
positions s_r, s_r + 1, ... of each row. Inside the block, `model(**live.inputs)` replays layers
0..L-1 from the cache and attends to the cached keys/values, so it computes exactly what the full
forward computes at those positions (tested against it in float64).

The same run also yields what the edit needs from the unedited model besides: the keys k at each
templated prompt's subject token (k̄ is their mean), v₀, and the bare prompt's predictions (the
known-answer check), so an edit makes one pass through the whole model before its v* steps.

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
from factedit.hooks import Trace, as_attention_mask, attention_mask_kind, cache_parameter
from factedit.rome.low_precision import bf16_autocast

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


class FrozenKeysValues:
    """Stands in for a transformers Cache: each layer's keys/values of the frozen positions,
    (rows, heads, n_frozen, d_head), come before the ones the layer computes now. Never mutated."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[-2]


@dataclass
class LiveBatch:
    """The positions δ can reach. Row r holds positions s_r .. s_r + n_live - 1 (past its end: padding).

    inputs: keyword arguments for the model (input_ids and position_ids (rows, n_live), a 4-D
    attention mask (rows, 1, n_live, n_frozen + n_live), the frozen keys/values);
    subject_pos: (rows,) zeros; target_pos: (T, n_target) indices into the live positions;
    target_ids, target_weight: (n_target,) the target tokens, weighted 1 (0: bucket padding);
    initial_final_hidden: (rows, d_model) the final norm's output at each row's subject token at
    δ = 0, from the frozen run (the KL term's reference distribution needs no forward of its own);
    layer_input: (rows, n_live, d_model) layer L's input at the live positions (replayed below L);
    cache: the frozen keys/values (also in `inputs`, under the model's own argument name);
    template_keys: (T, d_in) the rewrite module's input at each templated prompt's subject token
    (the keys k whose mean is k̄); initial_value: (d_model,) v₀, its output at row 0's subject token;
    prompt_final_hidden: (n_target, d_model) the final norm's output where row 0 (the first
    template's prompt) predicts each target token.
    """

    inputs: dict
    subject_pos: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_weight: torch.Tensor
    initial_final_hidden: torch.Tensor
    layer_input: torch.Tensor
    cache: "FrozenKeysValues"
    template_keys: torch.Tensor
    initial_value: torch.Tensor
    prompt_final_hidden: torch.Tensor

    def step_inputs(self, layer: int) -> list[torch.Tensor]:
        """Every tensor of this batch a v* step at `layer` reads, in a fixed order (step_graph.py)."""
        return [self.inputs["input_ids"], self.inputs["position_ids"], self.inputs["attention_mask"], self.layer_input,
                *self.cache.keys[layer:], *self.cache.values[layer:], self.subject_pos, self.target_pos, self.target_ids,
                self.target_weight]


def can_freeze(model, batch: dict) -> bool:
    """True when the attention implementation takes the 4-D masks built here (sdpa, eager) and no
    sliding window is shorter than the prompts (the mask here is plain causal)."""
    window = getattr(model.config, "sliding_window", None)
    return (attention_mask_kind(model) is not None and (window is None or window >= batch["input_ids"].shape[1])
            and _CHECKED.get(_model_key(model)) is not False)


def _model_key(model) -> tuple:
    return type(model), model.config._attn_implementation


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _first_keys(cached: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions of (rows, heads, seq, d_head) keys/values; zeros past seq (masked out)."""
    return cached[:, :, :n] if cached.shape[-2] >= n else F.pad(cached, (0, 0, 0, n - cached.shape[-2]))


def _padded_targets(target_ids: torch.Tensor, target_pos: torch.Tensor, n: int):
    """target_ids (n_target,), target_pos (T, n_target) repeated out to n columns, and weights 1 / 0 (padding)."""
    extra = n - len(target_ids)
    weight = torch.cat([torch.ones_like(target_ids, dtype=torch.float32), target_ids.new_zeros(extra, dtype=torch.float32)])
    return (torch.cat([target_ids, target_ids[-1:].expand(extra)]),
            torch.cat([target_pos, target_pos[:, -1:].expand(-1, extra)], dim=1), weight)


def _live_mask(first: torch.Tensor, n_frozen: int, n_live: int) -> torch.Tensor:
    """(rows, 1, n_live, n_frozen + n_live), True where live query j of row r may attend: frozen keys
    before s_r and live keys up to j."""
    device = first.device
    frozen = (torch.arange(n_frozen, device=device) < first[:, None])[:, None, :].expand(-1, n_live, -1)
    live = torch.ones(n_live, n_live, dtype=torch.bool, device=device).tril().expand(len(first), -1, -1)
    return torch.cat([frozen, live], dim=-1)[:, None]


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


def _frozen_run(model, layer: int, batch: dict, rewrite: str, bf16: bool = False) -> FrozenRun:
    """One full forward at δ = 0 through `batch`, keeping what the v* steps and the update read."""
    name, final = module_name(model, "layer", layer), module_name(model, "final_norm")
    returns_tuple, skip_logits = [], {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        skip_logits["logits_to_keep"] = 1  # the run needs hidden states and keys/values, not the vocabulary
    handle = get_module(model, module_name(model, "layer", 0)).register_forward_hook(
        lambda module, inputs, output: returns_tuple.append(isinstance(output, tuple)))
    try:
        with torch.no_grad(), bf16_autocast(model.device, bf16), Trace(model, [name, final, rewrite], retain_input=True) as trace:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True, **skip_logits)
    finally:
        handle.remove()
    cache = getattr(out, "cache", None)  # transformers >= 5.2x; earlier: past_key_values
    cache = out.past_key_values if cache is None else cache
    dtype = model.dtype  # under autocast some come out bfloat16; the keys/values stay as they are
    return FrozenRun(trace[name].input.to(dtype), trace[final].output.to(dtype), [c.keys for c in cache.layers],
                     [c.values for c in cache.layers], trace[rewrite].input.to(dtype),
                     trace[rewrite].output.to(dtype), returns_tuple[0])


def _replays_the_full_run(model, live: LiveBatch, expected: torch.Tensor, valid: torch.Tensor, bf16: bool) -> bool:
    """Whether the live forward at δ = 0 gives the full run's final hidden states (a check of the
    model code's cache and mask handling, made once per model)."""
    final = module_name(model, "final_norm")
    try:
        with torch.no_grad(), bf16_autocast(model.device, bf16), Trace(model, final, stop=True) as trace:
            model(**live.inputs)
        got = trace[final].output[valid]
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as error:
        log.warning("v* runs the full forward each step: %s cannot reuse frozen keys/values (%s)",
                    type(model).__name__, str(error).splitlines()[0])
        return False
    wanted = expected[valid]
    # a cache or mask the model code mishandles moves hidden states by O(their size); TF32 rounding ~1e-3, bfloat16 ~1e-2
    exact = torch.get_float32_matmul_precision() == "highest" or got.dtype == torch.float64
    tolerance = 5e-2 if bf16 else 1e-3 if exact else 1e-2
    if got.shape != wanted.shape or (got - wanted).abs().max() > tolerance * wanted.abs().max():
        log.warning("v* runs the full forward each step: %s gives other hidden states from frozen keys/values",
                    type(model).__name__)
        return False
    return True


@contextlib.contextmanager
def frozen_context(model, layer: int, batch: dict, bf16: bool = False, pad: bool = False, role: str = "rewrite"):
    """Yield the LiveBatch of `batch` (from build_value_batch); layers 0..L-1 replay inside the block.
    bf16: the frozen run's products under bfloat16 autocast (for a bf16 fit; its hidden states are float32).
    role: the module δ shifts at layer L (its input and output give the keys and v₀).
    pad: sizes rounded up to BUCKETS (the same losses: the padding is masked out or weighted 0).

    Yields None (the caller then runs the full forward) when this model class's code does not
    reproduce the full run from frozen keys/values; checked on its first use (`can_freeze` is then
    false for the class, so the check's full forward is not paid again).
    """
    first, lengths = batch["subject_pos"], batch["attention_mask"].sum(dim=1)
    n_frozen, n_live = int(first.max()), int((lengths - first).max())
    n_prompts, n_target = batch["target_pos"].shape
    if pad:
        n_frozen, n_live = _round_up(n_frozen, BUCKETS["frozen"]), _round_up(n_live, BUCKETS["live"])
        n_target = _round_up(n_target, BUCKETS["target"])
    checked = _model_key(model)
    try:
        run = _frozen_run(model, layer, batch, module_name(model, role, layer), bf16)
    except (AttributeError, TypeError) as error:  # a cache without per-layer keys/values
        log.warning("v* runs the full forward each step: no frozen keys/values (%s)", error)
        _CHECKED[checked] = False
        yield None
        return
    offsets = torch.arange(n_live, device=first.device)
    positions = first[:, None] + offsets  # (rows, n_live)
    index = positions.clamp(max=batch["input_ids"].shape[1] - 1)
    live_hidden = run.layer_input.gather(1, index[..., None].expand(-1, -1, run.layer_input.shape[-1]))
    mask = _step_mask(_live_mask(first, n_frozen, n_live), attention_mask_kind(model), live_hidden.dtype, bf16)
    cache = FrozenKeysValues([_first_keys(k, n_frozen) for k in run.keys], [_first_keys(v, n_frozen) for v in run.values])
    target_ids, target_pos, target_weight = _padded_targets(batch["target_ids"], batch["target_pos"] - first[:n_prompts, None], n_target)
    live = LiveBatch(
        inputs={"input_ids": batch["input_ids"].gather(1, index), "position_ids": positions, "attention_mask": mask,
                cache_parameter(model.forward) or "past_key_values": cache, "use_cache": True},
        subject_pos=torch.zeros_like(first), target_pos=target_pos, target_ids=target_ids, target_weight=target_weight,
        initial_final_hidden=run.final_hidden[torch.arange(len(first), device=first.device), first], layer_input=live_hidden,
        cache=cache, template_keys=run.rewrite_input[torch.arange(n_prompts, device=first.device), first[:n_prompts]],
        initial_value=run.rewrite_output[0, first[0]], prompt_final_hidden=run.final_hidden[0, batch["target_pos"][0]])
    layers = get_module(model, architecture_of(model).layers)
    originals = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _Replay(live_hidden if i == layer - 1 else None, run.as_tuple)
        if checked not in _CHECKED:
            valid = positions < lengths[:, None]
            expected = run.final_hidden.gather(1, index[..., None].expand(-1, -1, run.final_hidden.shape[-1]))
            _CHECKED[checked] = _replays_the_full_run(model, live, expected, valid, bf16)
            if not _CHECKED[checked]:
                _restore(layers, originals)
        yield live if _CHECKED[checked] else None
    finally:
        _restore(layers, originals)


def _restore(layers, originals: list) -> None:
    """Put the decoder layers 0..len(originals)-1 back in place of their stand-ins."""
    for i, original in enumerate(originals):
        layers[i] = original
