"""k̄: the rewrite module's input at the subject's last token, averaged over context templates (ROME §3).

An edit (rome.py) takes these keys from the forward at δ = 0 that the v* fit makes anyway (the same
texts, each followed by the target's tokens, which causal attention keeps from reaching the subject);
this is the standalone computation, and the reference the tests hold that run to.
"""
import torch

from factedit.architectures import module_name
from factedit.hooks import run_until
from factedit.tokens import batch_encode, subject_last_positions


def subject_keys(model, tokenizer, templates: list[str], subject: str, layer: int, role: str = "rewrite") -> torch.Tensor:
    """Keys k (inputs of the `role` module) at the subject's last token of each template.format(subject).

    templates: texts with one `{}` for the subject. Returns keys: (len(templates), d_mlp).
    """
    name = module_name(model, role, layer)
    positions = subject_last_positions(tokenizer, templates, subject)
    texts = [t.replace("{}", subject) for t in templates]
    captured = run_until(model, name, **batch_encode(tokenizer, texts, model.device))
    rows = torch.arange(len(texts), device=model.device)
    return captured[name].input[rows, torch.tensor(positions, device=model.device)]


def compute_key(model, tokenizer, prompt: str, subject: str, layer: int, context_templates: list[str],
                role: str = "rewrite") -> torch.Tensor:
    """k̄ = mean over context templates c of k(c + prompt), shape (d_mlp,), float64 (ROME eq. 3 input)."""
    templates = [context.format(prompt) if "{}" in context else context for context in context_templates]
    return subject_keys(model, tokenizer, templates, subject, layer, role).double().mean(dim=0)
