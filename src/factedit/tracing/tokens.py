"""Where the subject sits in a tokenized prompt, found by character offsets (robust to BPE merges)."""
from factedit.errors import FacteditError


def fill_prompt(prompt: str, subject: str) -> str:
    """The prompt text with the subject in place: `prompt` holds one "{}" or already contains `subject`."""
    if not subject or not subject.strip():
        raise FacteditError("the subject is empty: set fact.subject=...")
    if "{}" in prompt:
        return prompt.replace("{}", subject, 1)
    if subject not in prompt:
        raise FacteditError(f"subject {subject!r} is not in the prompt {prompt!r}: put '{{}}' where the subject goes")
    return prompt


def subject_token_range(tokenizer, prompt_text: str, subject: str) -> tuple[int, int]:
    """[start, end) indices of the tokens of `prompt_text` that overlap the subject's characters.

    Uses the first occurrence of `subject`. Indices count special tokens the tokenizer adds (Gemma's
    BOS), so they index `tokenizer(prompt_text).input_ids` directly. A token that merges the subject's
    last characters with what follows (" Tower's") belongs to the subject.
    """
    char_start = prompt_text.find(subject) if subject else -1
    if char_start < 0:
        raise FacteditError(f"subject {subject!r} is not in the prompt {prompt_text!r}")
    char_end = char_start + len(subject)
    offsets = tokenizer(prompt_text, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < char_end and b > char_start]
    if not inside:
        raise FacteditError(f"subject {subject!r} has no tokens in {prompt_text!r} after tokenization")
    return inside[0], inside[-1] + 1
