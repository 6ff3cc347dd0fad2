"""k̄: the rewrite module's input at the subject's last token, averaged over context templates (ROME §3, eq. 3).

An edit reads the keys from its one pass through the model at δ = 0 (`template_keys` of the
ZeroRun that rome/fast makes anyway for v*); MEMIT reads them layer after layer on the weights its
earlier layers changed (`batch_keys`); `subject_keys` is the standalone computation (a forward up to
the rewrite module), the reference the tests hold that pass to.
"""

import torch
from einops import rearrange

from factedit.architectures import module_name
from factedit.hooks import run_until
from factedit.rome.value_batch import ValueBatch
from factedit.tokens import batch_encode, subject_last_positions


def template_keys(rewrite_input: torch.Tensor, batch: ValueBatch) -> torch.Tensor:
    """k at each templated prompt's subject token: (F, T, d_in), fact f's T templates in row f.
    rewrite_input: (rows, seq, d_in), the rewrite module's input over the batch's rows (a ZeroRun's)."""
    rows = torch.arange(batch.n_facts * batch.n_prompts, device=rewrite_input.device)
    keys = rewrite_input[rows, batch.subject_pos[rows]]
    return rearrange(keys, "(facts prompts) d -> facts prompts d", facts=batch.n_facts)


def compute_key(keys: torch.Tensor) -> torch.Tensor:
    """k̄ = the mean of the templated keys (…, T, d_in) over the templates: (…, d_in) in float64."""
    return keys.double().mean(dim=-2)


@torch.no_grad()
def batch_keys(model, batch: ValueBatch, layer: int, role: str = "rewrite") -> torch.Tensor:
    """k̄ of every fact of `batch` at `layer` on the current weights, by a forward of the templated rows up
    to the `role` module (MEMIT: after each layer's update): (F, d_in) float64."""
    rows, name = batch.n_facts * batch.n_prompts, module_name(model, role, layer)
    captured = run_until(model, name, input_ids=batch.input_ids[:rows], attention_mask=batch.attention_mask[:rows])
    return compute_key(template_keys(captured[name].input, batch))


def subject_keys(
    model, tokenizer, templates: list[str], subject: str, layer: int, role: str = "rewrite"
) -> torch.Tensor:
    """Keys k (inputs of the `role` module) at the subject's last token of each template.format(subject),
    by a forward of its own: (len(templates), d_in).

    templates: texts with one `{}` for the subject.
    """
    name = module_name(model, role, layer)
    positions = subject_last_positions(tokenizer, templates, subject)
    texts = [t.replace("{}", subject) for t in templates]
    captured = run_until(model, name, **batch_encode(tokenizer, texts, model.device))
    rows = torch.arange(len(texts), device=model.device)
    return captured[name].input[rows, torch.tensor(positions, device=model.device)]


def reference_key(
    model, tokenizer, prompt: str, subject: str, layer: int, context_templates: list[str], role: str = "rewrite"
) -> torch.Tensor:
    """k̄ of one fact by its own forward (the reference for tests and benchmarks): (d_in,) float64."""
    templates = [context.format(prompt) if "{}" in context else context for context in context_templates]
    return compute_key(subject_keys(model, tokenizer, templates, subject, layer, role))
