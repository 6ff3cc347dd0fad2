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


def top_tokens(tokenizer, logits: torch.Tensor, top_k: int = 3) -> list[list]:
    """Each row of next-token `logits` (prompts, vocab) as its top-k [token text, probability] pairs."""
    top = logits.softmax(-1).topk(top_k, dim=-1)
    return [[[tokenizer.decode(int(i)), round(float(p), 4)] for p, i in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)]  # fmt: skip


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """The greedy continuation of each prompt (batched, left-padded), whitespace collapsed."""
    if not prompts:
        return []
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    generated = model.generate(
        **encoded, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
    )
    texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(text.split()) for text in texts]


@torch.no_grad()
def probe(model, tokenizer, prompts: list[str], top_k: int = 3, max_new_tokens: int = 12) -> list[dict]:
    """For each prompt: its top-k next tokens with probabilities and a greedy continuation."""
    if not prompts:
        return []
    tops = top_tokens(tokenizer, next_token_logits(model, tokenizer, prompts), top_k)
    texts = continuations(model, tokenizer, prompts, max_new_tokens)
    return [{"prompt": prompt, "top": top, "continuation": text} for prompt, top, text in zip(prompts, tops, texts)]


def probe_table(before: list[dict], after: list[dict], kinds: list[str]) -> str:
    """A markdown table of top-1 tokens and continuations before and after an edit."""
    lines = ["| probe | kind | before | after |", "|---|---|---|---|"]
    for b, a, kind in zip(before, after, kinds):
        cell = lambda r: f"**{r['top'][0][0].strip()}** {r['top'][0][1]:.2f} — {(r['continuation'] or '…')[:48]}"
        lines.append(f"| {b['prompt']} | {kind} | {cell(b)} | {cell(a)} |")
    return "\n".join(lines)
