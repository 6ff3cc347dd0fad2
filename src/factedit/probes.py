"""What the model says: top-k next tokens with probabilities and a short greedy continuation."""

import torch

from factedit.tokens import batch_encode


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Logits of the token after each prompt, (len(prompts), vocab), float32."""
    encoded = batch_encode(tokenizer, prompts, model.device)
    logits = model(**encoded).logits
    last = encoded["attention_mask"].sum(dim=1) - 1
    return logits[torch.arange(len(prompts), device=logits.device), last].float()


def probe_prompts(facts) -> tuple[list[str], list[str]]:
    """The texts probed around an edit of `facts` (each fact's prompt, then its generalization and specificity
    probes) and the kind of each: edit, generalization, specificity."""
    prompts, kinds = [], []
    for fact in facts:
        for kind, items in (
            ("edit", [fact.text]),
            ("generalization", fact.generalization_probes),
            ("specificity", fact.specificity_probes),
        ):
            prompts += list(items)
            kinds += [kind] * len(items)
    return prompts, kinds


@torch.no_grad()
def probe(model, tokenizer, prompts: list[str], top_k: int = 3, max_new_tokens: int = 12) -> list[dict]:
    """For each prompt: its top-k next tokens with probabilities and a greedy continuation."""
    if not prompts:
        return []
    probs = next_token_logits(model, tokenizer, prompts).softmax(-1)
    top = probs.topk(top_k, dim=-1)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    generated = model.generate(
        **encoded, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
    )
    continuations = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        {
            "prompt": prompt,
            "top": [[tokenizer.decode(int(i)), round(float(p), 4)] for p, i in zip(top.values[row], top.indices[row])],
            "continuation": " ".join(continuations[row].split()),
        }
        for row, prompt in enumerate(prompts)
    ]


def probe_table(before: list[dict], after: list[dict], kinds: list[str]) -> str:
    """A markdown table of top-1 tokens and continuations before and after an edit."""
    lines = ["| probe | kind | before | after |", "|---|---|---|---|"]
    for b, a, kind in zip(before, after, kinds):
        cell = lambda r: f"**{r['top'][0][0].strip()}** {r['top'][0][1]:.2f} — {r['continuation'][:48]}"
        lines.append(f"| {b['prompt']} | {kind} | {cell(b)} | {cell(a)} |")
    return "\n".join(lines)
