"""Context templates: short texts the model writes itself, prefixed to the prompt (ROME §3).

Averaging keys and values over varied prefixes makes the edit hold in contexts other than the
bare prompt. ROME generates 10 texts of 5 tokens and 10 of 10 tokens from five openings.
"""

import json
import logging
import weakref

import torch

from factedit.io import write_json
from factedit.models import model_fingerprint
from factedit.paths import cache_dir
from factedit.tokens import special_prefix

log = logging.getLogger(__name__)
OPENINGS = ["The", "Therefore", "Because", "I", "You"]
_IN_MEMORY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(spec, seed, prefix): templates}


def context_templates(model, tokenizer, spec=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """["{}", "<text>. {}", ...]: the bare prompt plus one template per generated text.

    spec: (tokens, count) pairs. Cached on disk per model fingerprint, spec, seed and the tokenizer's
    BOS, and in memory per model object (an edited model keeps the templates of its first call).
    """
    spec = [tuple(int(x) for x in pair) for pair in spec]
    prefix = "".join(f"-{i}" for i in special_prefix(tokenizer))  # generation starts from BOS + opening
    remembered = _IN_MEMORY.setdefault(model, {})
    if (tuple(spec), seed, prefix) not in remembered:  # once per model object: later edits keep them (as ROME)
        remembered[(tuple(spec), seed, prefix)] = _cached_templates(model, tokenizer, spec, seed, prefix)
    return list(remembered[(tuple(spec), seed, prefix)])


def _cached_templates(model, tokenizer, spec: list[tuple[int, int]], seed: int, prefix: str) -> list[str]:
    key = f"{model_fingerprint(model)}-{'_'.join(f'{n}x{c}' for n, c in spec)}-seed{seed}{prefix}"
    path = cache_dir() / "context_templates" / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["templates"]
        except (ValueError, KeyError):
            log.warning("ignoring unreadable template cache %s", path)
    texts = [text for length, count in spec for text in _generate(model, tokenizer, length, count, seed + length)]
    templates = ["{}"] + [text.replace("{", " ").replace("}", " ") + ". {}" for text in texts]
    write_json(path, {"spec": spec, "seed": seed, "templates": templates})
    return templates


@torch.no_grad()
def _generate(model, tokenizer, length: int, count: int, seed: int) -> list[str]:
    """`count` texts of `length` new tokens, top-5 sampled from the openings in turn."""
    openings = [OPENINGS[i % len(OPENINGS)] for i in range(count)]
    encoded = tokenizer(openings, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        output = model.generate(
            **encoded,
            do_sample=True,
            top_k=5,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    texts = tokenizer.batch_decode(output, skip_special_tokens=True)
    return [" ".join(text.split()) for text in texts]
