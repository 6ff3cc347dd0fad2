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

from factedit.architectures import module_name
from factedit.hooks import Trace
from factedit.rome.compute_key import compute_key
from factedit.rome.fast.frozen_prefix import noting_tuple_outputs, replayed_below
from factedit.rome.value_batch import ValueBatch


class LayerPasses:
    """The reads of one MEMIT batch, layer after layer: `keys(l)` then `residual_stream(L)` before updating l.

    Layers must be asked for in increasing order, each after the update of the one before; `keys(l)`
    keeps layer l's input for the next pass (rows (F·T, width, d_model): the templated rows cut after
    their last subject token). A pass runs rows_per_pass rows at a time (a batch of 1,000 facts has 6,000).
    """

    def __init__(self, model, batch: ValueBatch, role: str = "rewrite", rows_per_pass: int = 1024):
        self.model, self.batch, self.role, self.rows_per_pass = model, batch, role, rows_per_pass
        rows = batch.n_facts * batch.n_prompts
        width = int(batch.subject_pos[:rows].max()) + 1
        self.input_ids, self.attention_mask = batch.input_ids[:rows, :width], batch.attention_mask[:rows, :width]
        self.start, self.start_input, self.as_tuple = 0, None, None

    @torch.no_grad()
    def keys(self, layer: int) -> torch.Tensor:
        """k̄ of every fact at `layer` on the current weights: (F, d_in) float64 (as rome/compute_key.batch_keys)."""
        rewrite, entry = module_name(self.model, self.role, layer), module_name(self.model, "layer", layer)
        keys, entry_inputs = [], []
        for rows in self._row_chunks(len(self.input_ids)):
            captured = self._run([rewrite, entry], rows, retain_input=True)
            subject = self.batch.subject_pos[rows]
            keys.append(captured[rewrite].input[torch.arange(len(rows), device=subject.device), subject])
            entry_inputs.append(captured[entry].input)
        self.start, self.start_input = layer, torch.cat(entry_inputs)
        per_fact = torch.cat(keys).reshape(self.batch.n_facts, self.batch.n_prompts, -1)  # (F, T, d_in)
        return compute_key(per_fact)

    @torch.no_grad()
    def residual_stream(self, layer: int, n_facts: int | None = None) -> torch.Tensor:
        """h: the output of decoder layer `layer` at each fact's subject in its bare prompt, (F, d_model)
        float64 (as memit.residual_stream), of the first n_facts facts only when given; `layer` ≥ the last layer
        asked for keys."""
        bare, name, outputs = self.batch.bare_rows[:n_facts], module_name(self.model, "layer", layer), []
        for rows in self._row_chunks(len(bare)):
            output = self._run([name], bare[rows], retain_input=False)[name].output
            subject = self.batch.subject_pos[bare[rows]]
            outputs.append(output[torch.arange(len(rows), device=output.device), subject])
        return torch.cat(outputs).double()

    def _row_chunks(self, n_rows: int) -> list[torch.Tensor]:
        """Row indices in chunks of rows_per_pass: the activations of one forward stay bounded."""
        every = torch.arange(n_rows, device=self.input_ids.device)
        return list(every.split(self.rows_per_pass))

    def _run(self, names: list[str], rows: torch.Tensor, retain_input: bool) -> dict:
        """A forward of `rows` from the kept start input to the modules `names`."""
        with contextlib.ExitStack() as stack:
            if self.start > 0:  # the layers below the start hand it the input kept from the last pass
                stack.enter_context(replayed_below(self.model, self.start, self.start_input[rows], self.as_tuple))
            else:
                noted = stack.enter_context(noting_tuple_outputs(self.model))
            trace = stack.enter_context(Trace(self.model, names, retain_input=retain_input, stop=True))
            self.model(input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows])
        if self.start == 0:
            self.as_tuple = noted[0]
        return trace.captured
