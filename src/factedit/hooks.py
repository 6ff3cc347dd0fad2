"""Context managers over modules named by dotted path: capture, edit, stop (after ROME's nethook).

    with Trace(model, ["model.layers.5.mlp.down_proj"], retain_input=True, stop=True) as trace:
        model(**batch)                      # stops once every named module has run
    keys = trace["model.layers.5.mlp.down_proj"].input      # (batch, seq, d_mlp)

Hooks are removed when the block ends, also when it ends with an exception.
"""

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from factedit.architectures import get_module

EditFn = Callable[[str, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a truncated forward pass; swallowed by the Trace that raised it."""


@dataclass
class Captured:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def hidden_of(output):
    """The hidden-state tensor of a module output (decoder layers and attention return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its hidden-state tensor replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Trace(contextlib.AbstractContextManager):
    """Hooks on `names`.

    retain_input / retain_output: keep the module's first positional input / hidden output.
    edit_output(name, hidden) -> hidden: replace a module's hidden output (before it is retained).
    stop: raise StopForward once every named module has run, so the rest of the model is skipped.
    detach: store detached tensors (set False to keep the autograd graph).
    """

    def __init__(
        self,
        model,
        names,
        *,
        retain_input=False,
        retain_output=True,
        edit_output: EditFn | None = None,
        stop=False,
        detach=True,
    ):
        self.names = [names] if isinstance(names, str) else list(dict.fromkeys(names))  # each module once
        self.captured = {name: Captured() for name in self.names}
        self._fired: set[str] = set()
        self._handles = []
        self._edit, self._stop, self._detach = edit_output, stop, detach
        self._retain_input, self._retain_output = retain_input, retain_output
        try:
            for name in self.names:
                module = get_module(model, name)
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise

    def _keep(self, tensor):
        return tensor.detach() if self._detach else tensor

    def _hook(self, name):
        def hook(module, inputs, output):
            if self._retain_input:
                self.captured[name].input = self._keep(inputs[0])
            if self._edit is not None:
                output = with_hidden(output, self._edit(name, hidden_of(output)))
            if self._retain_output:
                self.captured[name].output = self._keep(hidden_of(output))
            self._fired.add(name)
            if self._stop and len(self._fired) == len(self.names):
                raise StopForward()
            return output

        return hook

    def __getitem__(self, name) -> Captured:
        return self.captured[name]

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


def add_at_positions(hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """hidden with `delta` added at (rows[i], cols[i]); differentiable in delta, no in-place write.

    hidden: (batch, seq, d); rows, cols: (n,); delta: (d,) or (n, d).
    """
    mask = torch.zeros(hidden.shape[:2] + (1,), dtype=hidden.dtype, device=hidden.device)
    mask.index_put_((rows, cols), torch.ones((), dtype=hidden.dtype, device=hidden.device))  # no host copy: graph-safe
    if delta.dim() == 1:
        return hidden + mask * delta
    added = torch.zeros_like(hidden).index_put((rows, cols), delta.to(hidden.dtype))
    return hidden + added


def run_until(model, names, *, retain_input=True, **inputs) -> dict[str, Captured]:
    """Run `model` only as far as the named modules and return what they saw (no grad)."""
    with torch.no_grad(), Trace(model, names, retain_input=retain_input, stop=True) as trace:
        model(**inputs)
    return trace.captured


# ---------------------------------------------------------------- transformers call conventions


class PrefixCache:
    """Stands in for a transformers Cache (the `update` each attention layer calls; never mutated).

    Layer i attends to `keys[i]` / `values[i]` (n_rows, heads, n_prefix, d_head), keys/values of
    positions this forward does not compute, before those it computes now; keys=None: no prefix.
    rows: which prefix row each batch row reads (a batch that grows as rows join reads the first
    entries); None: batch row b reads row b. record=True keeps each layer's own keys/values in
    `computed_keys` / `computed_values`.
    """

    def __init__(self, keys=None, values=None, *, rows: torch.Tensor | None = None, record: bool = False):
        self.keys, self.values, self.rows, self.record = keys, values, rows, record
        self.computed_keys, self.computed_values = {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record:
            self.computed_keys[layer_idx], self.computed_values[layer_idx] = key_states, value_states
        if self.keys is None:
            return key_states, value_states
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is not None:
            rows = self.rows[: key_states.shape[0]]
            keys, values = keys[rows], values[rows]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys is None else self.keys[layer_idx].shape[-2]


def cache_parameter(forward) -> str | None:
    """The name of a transformers forward's cache argument: `cache` (transformers >= 5.2x) or
    `past_key_values` (earlier); None when it takes neither."""
    parameters = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def attention_mask_kind(model) -> str | None:
    """How the model's attention reads a 4-D mask: "bool" (sdpa), "additive" (eager), None (others)."""
    return {"sdpa": "bool", "eager": "additive"}.get(getattr(model.config, "_attn_implementation", None))


def prefix_causal_mask(first: torch.Tensor, n_prefix: int, n_new: int) -> torch.Tensor:
    """(rows, 1, n_new, n_prefix + n_new), True where query j of row r may attend: to the first[r]
    positions of the known prefix (keys 0..n_prefix-1, those past first[r] are padding) and to the
    new positions up to j. A forward that computes only positions first.. of each row attends so."""
    device = first.device
    prefix = (torch.arange(n_prefix, device=device) < first[:, None])[:, None, :].expand(-1, n_new, -1)
    new = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril().expand(len(first), -1, -1)
    return torch.cat([prefix, new], dim=-1)[:, None]


def as_attention_mask(allowed: torch.Tensor, kind: str, dtype, blocked: float | None = None) -> torch.Tensor:
    """A boolean mask (True = may attend) in the form `kind` reads: itself, or additive: 0 where
    allowed, `blocked` elsewhere (default: the dtype's minimum)."""
    if kind == "bool":
        return allowed
    fill = torch.finfo(dtype).min if blocked is None else blocked
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, fill)
