"""MEMIT's reads between its layer updates, each pass starting where the last update was made.

Before the update of layer l_i, MEMIT reads the keys K at l_i and the residual stream h_L on the
weights the updates of l_0 .. l_{i-1} made. Straightforwardly each read is a forward from the
embeddings (`batch_keys`, `residual_stream`): layers 0 .. l_i for every templated row. But the input
of layer l_{i-1} is final once l_{i-1} is about to be updated (it reads only the layers below), so the
pass for l_i starts from that input, kept from the pass before: it runs layers l_{i-1} .. l_i only.
Rows are also cut after the last subject token: k and h_L are read there, and attention is causal.

The same numbers as the straightforward reads (tested in float64); fewer layers and positions run.
"""

import contextlib

import torch

from factedit.architectures import architecture_of, get_module, module_name
from factedit.hooks import Trace
from factedit.rome.compute_key import compute_key, template_keys
from factedit.rome.value_batch import ValueBatch


class _Handoff(torch.nn.Module):
    """Stands in for a decoder layer below the start: passes its input on, or (the last one) returns the
    kept input of the start layer, as a 1-tuple where the model's layers return tuples."""

    def __init__(self, hidden: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        hidden = hidden_states if self.hidden is None else self.hidden
        return (hidden,) if self.as_tuple else hidden


class LayerPasses:
    """The reads of one MEMIT batch, layer after layer: `keys(l)` then `residual_stream(L)` before updating l.

    Layers must be asked for in increasing order, each after the update of the one before; `keys(l)`
    keeps layer l's input for the next pass (rows (F·T, width, d_model): the templated rows cut after
    their last subject token).
    """

    def __init__(self, model, batch: ValueBatch, role: str = "rewrite"):
        self.model, self.batch, self.role = model, batch, role
        rows = batch.n_facts * batch.n_prompts
        width = int(batch.subject_pos[:rows].max()) + 1
        self.input_ids, self.attention_mask = batch.input_ids[:rows, :width], batch.attention_mask[:rows, :width]
        self.start, self.start_input, self.as_tuple = 0, None, None

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """k̄ of every fact at `layer` on the current weights: (F, d_in) float64 (as rome/compute_key.batch_keys)."""
        rewrite, entry = module_name(self.model, self.role, layer), module_name(self.model, "layer", layer)
        captured = self._run([rewrite, entry], rows=None, retain_input=True)
        self.start, self.start_input = layer, captured[entry].input
        return compute_key(template_keys(captured[rewrite].input, self.batch))

    @torch.no_grad()
    def residual_stream(self, layer: int) -> torch.Tensor:
        """h: the output of decoder layer `layer` at each fact's subject in its bare prompt, (F, d_model)
        float64 (as memit.residual_stream); `layer` ≥ the last layer asked for keys."""
        bare, name = self.batch.bare_rows, module_name(self.model, "layer", layer)
        output = self._run([name], rows=bare, retain_input=False)[name].output
        return output[torch.arange(len(bare), device=output.device), self.batch.subject_pos[bare]].double()

    def _run(self, names: list[str], rows: torch.Tensor | None, retain_input: bool) -> dict:
        """A forward of `rows` (None: all) from the kept start input to the modules `names`."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        with contextlib.ExitStack() as stack:
            if self.start > 0:
                stack.enter_context(self._handed_off(pick(self.start_input)))
            else:
                stack.enter_context(self._noting_tuples())
            trace = stack.enter_context(Trace(self.model, names, retain_input=retain_input, stop=True))
            self.model(input_ids=pick(self.input_ids), attention_mask=pick(self.attention_mask))
        return trace.captured

    @contextlib.contextmanager
    def _handed_off(self, hidden: torch.Tensor):
        """Inside the block the layers below self.start stand aside and layer self.start gets `hidden`."""
        layers = get_module(self.model, architecture_of(self.model).layers)
        originals = [layers[i] for i in range(self.start)]
        try:
            for i in range(self.start):
                layers[i] = _Handoff(hidden if i == self.start - 1 else None, self.as_tuple)
            yield
        finally:
            for i, original in enumerate(originals):
                layers[i] = original

    @contextlib.contextmanager
    def _noting_tuples(self):
        """Note whether the decoder layers return tuples (older transformers), for the stand-ins."""
        layer_0 = get_module(self.model, module_name(self.model, "layer", 0))

        def note(module, inputs, output):
            self.as_tuple = isinstance(output, tuple)

        handle = layer_0.register_forward_hook(note)
        try:
            yield
        finally:
            handle.remove()
