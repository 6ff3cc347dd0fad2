"""The prompts an edit reads the model on: each fact's context-templated prompts, then its KL prompts.

For facts f = 0..F-1 with T templates ("{}" first: the bare prompt) and the KL prompts of KL_PROMPTS:

    rows 0 .. F·T-1           template t of fact f at row f·T + t: context + prompt + the new
                              object's tokens but the last (the NLL of v* reads them)
    rows F·T .. F·T+F·K-1     KL prompt k of fact f at row F·T + f·K + k ("{subject} is a")

One forward of these rows at δ = 0 (`ZeroRun`) gives the keys k (compute_key.py), v₀ and the
reference distributions of the KL term (compute_value.py).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from factedit.architectures import unembed
from factedit.errors import FacteditError
from factedit.tokens import fill_subject, subject_token_range, target_token_ids

KL_PROMPTS = ["{} is a"]


@dataclass
class ValueBatch:
    """Right-padded tokens of the rows above and where the loss reads them.

    input_ids, attention_mask: (rows, seq); subject_pos: (rows,) each row's last subject token;
    target_ids, target_pos, target_weight: (F·T, n_target) the new object's tokens of each template
    row, the positions whose logits predict them, and weight 1 (0: padding to the longest target).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor
    target_ids: torch.Tensor
    target_pos: torch.Tensor
    target_weight: torch.Tensor
    n_facts: int
    n_prompts: int  # T: templated prompts per fact

    @property
    def bare_rows(self) -> torch.Tensor:
        """(F,) the row of each fact's bare prompt (template "{}")."""
        return torch.arange(self.n_facts, device=self.input_ids.device) * self.n_prompts

    @property
    def fact_of_row(self) -> torch.Tensor:
        """(rows,) the fact each row belongs to."""
        rows = torch.arange(len(self.input_ids), device=self.input_ids.device)
        n_templated = self.n_facts * self.n_prompts
        n_kl = (len(rows) - n_templated) // self.n_facts
        return torch.where(rows < n_templated, rows // self.n_prompts, (rows - n_templated) // max(n_kl, 1))

    @property
    def kl_rows(self) -> torch.Tensor:
        """(F·K,) the KL prompts' rows."""
        return torch.arange(self.n_facts * self.n_prompts, len(self.input_ids), device=self.input_ids.device)


class ZeroRun(NamedTuple):
    """One forward of a ValueBatch at δ = 0 (the frozen run of rome/fast, or the full forward).

    rewrite_input: (rows, seq, d_in) the rewrite module's input, ROME's keys k; rewrite_output:
    (rows, seq, d_model) its output, the values v; final_hidden: (rows, seq, d_model) the final norm's output.
    """

    rewrite_input: torch.Tensor
    rewrite_output: torch.Tensor
    final_hidden: torch.Tensor


def value_batch(tokenizer, facts, context_templates: list[str], device=None) -> ValueBatch:
    """The ValueBatch of `facts` (objects with subject, prompt, target_new) under `context_templates`."""
    rows, subject_pos, targets = [], [], []
    for fact in facts:
        target_ids = target_token_ids(tokenizer, fact.target_new)
        for context in context_templates:
            prompt_ids, position = _encode(
                tokenizer, context.format(fact.prompt) if "{}" in context else context, fact.subject
            )
            targets.append((target_ids, [len(prompt_ids) - 1 + j for j in range(len(target_ids))]))
            rows.append(prompt_ids + target_ids[:-1])
            subject_pos.append(position)
    for fact in facts:
        for template in KL_PROMPTS:
            prompt_ids, position = _encode(tokenizer, template, fact.subject)
            rows.append(prompt_ids)
            subject_pos.append(position)
    width, n_target = max(len(r) for r in rows), max(len(ids) for ids, _ in targets)
    pad = tokenizer.pad_token_id
    as_tensor = lambda values, dtype=None: torch.tensor(values, device=device, dtype=dtype)  # noqa: E731
    return ValueBatch(
        input_ids=as_tensor([r + [pad] * (width - len(r)) for r in rows]),
        attention_mask=as_tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        subject_pos=as_tensor(subject_pos),
        target_ids=as_tensor([_pad_last(ids, n_target) for ids, _ in targets]),
        target_pos=as_tensor([_pad_last(pos, n_target) for _, pos in targets]),
        target_weight=as_tensor(
            [[1.0] * len(ids) + [0.0] * (n_target - len(ids)) for ids, _ in targets], torch.float32
        ),
        n_facts=len(facts),
        n_prompts=len(context_templates),
    )


def _encode(tokenizer, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of template.format(subject) and the index of the subject's last token."""
    text, start = fill_subject(template, subject)
    return tokenizer(text)["input_ids"], subject_token_range(tokenizer, text, subject, start)[1] - 1


def _pad_last(values: list[int], n: int) -> list[int]:
    """values repeated at their last entry out to length n (weighted 0 in the loss)."""
    return values + values[-1:] * (n - len(values))


@torch.no_grad()
def known_facts(model, batch: ValueBatch, run: ZeroRun) -> torch.Tensor:
    """(F,) True where the model already gives the fact's new object greedily after its bare prompt."""
    bare = batch.bare_rows
    predicted = unembed(model, run.final_hidden[bare[:, None], batch.target_pos[bare]]).argmax(-1)  # (F, n_target)
    return ((predicted == batch.target_ids[bare]) | (batch.target_weight[bare] == 0)).all(dim=1)


def check_not_known(model, batch: ValueBatch, run: ZeroRun, facts) -> None:
    """Refuse (before any step) a fact whose new object the model already gives after the bare prompt."""
    for fact, known in zip(facts, known_facts(model, batch, run).tolist()):
        if known:
            raise FacteditError(
                f"the model already answers {fact.target_new!r} for {fact.text!r}: pick another target_new"
            )
