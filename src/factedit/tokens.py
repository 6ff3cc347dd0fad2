"""Token positions of a subject inside a prompt, found by character offsets (robust to BPE merges)."""

import torch

from factedit.errors import FacteditError


def subject_token_range(tokenizer, text: str, subject: str, subject_start: int | None = None) -> tuple[int, int]:
    """[start, end) token indices of `subject` in `text` (its last occurrence unless `subject_start`).

    Tokens are those whose character span overlaps the subject's span, so a subject whose last
    token merges with the following character (" Tower's") still ends at that token.
    """
    if subject_start is None:
        subject_start = text.rfind(subject)
    if not subject or subject_start < 0:
        raise FacteditError(f"subject {subject!r} is not in the prompt {text!r}")
    subject_end = subject_start + len(subject)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < subject_end and b > subject_start and b > a]
    if not inside:
        raise FacteditError(f"subject {subject!r} has no tokens in {text!r} after tokenization")
    return inside[0], inside[-1] + 1


def fill_subject(template: str, subject: str) -> tuple[str, int]:
    """template.format(subject) and the subject's character offset; template holds one `{}`."""
    if template.count("{}") != 1:
        raise FacteditError(f"prompt {template!r} must contain exactly one '{{}}' where the subject goes")
    start = template.index("{}")
    return template[:start] + subject + template[start + 2 :], start


def fill_prompt(prompt: str, subject: str) -> str:
    """The prompt text with the subject in place: `prompt` holds one "{}" or already contains `subject`."""
    if not subject or not subject.strip():
        raise FacteditError("the subject is empty: set fact.subject=...")
    if "{}" in prompt:
        return prompt.replace("{}", subject, 1)
    if subject not in prompt:
        raise FacteditError(f"subject {subject!r} is not in the prompt {prompt!r}: put '{{}}' where the subject goes")
    return prompt


def subject_last_positions(tokenizer, templates: list[str], subject: str) -> list[int]:
    """Index of the subject's last token in each template.format(subject)."""
    positions = []
    for template in templates:
        text, start = fill_subject(template, subject)
        positions.append(subject_token_range(tokenizer, text, subject, start)[1] - 1)
    return positions


def special_prefix(tokenizer) -> list[int]:
    """The token ids the tokenizer puts before every text (e.g. [BOS]; [] for GPT-2)."""
    return list(tokenizer("")["input_ids"])


def target_token_ids(tokenizer, target: str) -> list[int]:
    """The tokens of an object as it follows a prompt: " " + target, no special tokens."""
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FacteditError(f"target {target!r} tokenizes to nothing; give a non-empty object")
    return ids


def batch_encode(tokenizer, texts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask for `texts` (positions of real tokens are unchanged)."""
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return {key: encoded[key].to(device) for key in ("input_ids", "attention_mask")}


# A fact's prompt runs through the model once per context template (21 rows for ROME) with gradients
# behind the edited layer: an edit of the default model with a 244-token prompt peaks at 2.8 GB resident
# (benchmarks/bench_prompt_length.py); every CounterFact or zsRE prompt is under 40 tokens.
MAX_PROMPT_TOKENS = 256


def check_prompt_lengths(tokenizer, model, texts, limit: int | None = None) -> None:
    """Refuse (one line, before any work) a text longer than `limit` tokens (default: MAX_PROMPT_TOKENS,
    or the model's context if shorter)."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    limit = min(limit or MAX_PROMPT_TOKENS, context or MAX_PROMPT_TOKENS)
    for text in texts:
        if len(tokenizer(text)["input_ids"]) > limit:  # tokenizing even 5,000 words takes milliseconds
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise FacteditError(f"the prompt {shown!r} is longer than {limit} tokens: shorten it (prompts and probes "
                                "are sentences; the subject and the words that lead to the object)")  # fmt: skip
