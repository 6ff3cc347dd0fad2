"""P(target | prompt) for all of a record's prompts in one padded forward (ROME's test_batch_prediction).

P(x) = exp(−mean token NLL of " x" after the prompt). Each (prompt, target) pair needs the tokens
prompt + target[:-1]; the logits at the last prompt position and at each target token but the
last predict the target tokens. Rows that are a prefix of another row are dropped (a causal
model gives a prefix the same hidden states), so a record whose targets are single tokens runs
one row per prompt; the rest run in one right-padded batch that stops at the final norm, and
only the positions the NLL reads are unembedded.
"""

import torch

from factedit.architectures import module_name, unembed
from factedit.hooks import Trace
from factedit.tokens import target_token_ids

Pair = tuple[str, str]  # (prompt text, target object without its leading space)


def pair_tokens(tokenizer, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per pair; the target is tokenized as " target" on its own."""
    prompts, targets = {}, {}
    for prompt, target in pairs:
        if prompt not in prompts:
            prompts[prompt] = tokenizer(prompt)["input_ids"]
        if target not in targets:
            targets[target] = target_token_ids(tokenizer, target)
    return [(prompts[p], targets[t]) for p, t in pairs]


def pack_rows(sequences: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Rows that hold every sequence as a prefix, and the row of each sequence.

    sequences: token-id lists. Longest first, each sequence joins the first kept row it prefixes.
    """
    rows, row_of = [], [0] * len(sequences)
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
        sequence = sequences[index]
        home = next((r for r, row in enumerate(rows) if row[: len(sequence)] == sequence), None)
        if home is None:
            rows.append(sequence)
            home = len(rows) - 1
        row_of[index] = home
    return rows, row_of


@torch.no_grad()
def target_nlls(model, tokenizer, pairs: list[Pair]) -> torch.Tensor:
    """Mean token NLL of each pair's target after its prompt, (len(pairs),) float64; one forward."""
    tokens = pair_tokens(tokenizer, pairs)
    rows, row_of = pack_rows([p + t[:-1] for p, t in tokens])
    width, pad = max(len(r) for r in rows), tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    final_norm = module_name(model, "final_norm")
    with Trace(model, final_norm, stop=True) as trace:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = trace[final_norm].output  # (rows, width, d_model)
    read_rows, read_cols, target_ids, owner = [], [], [], []
    for index, ((prompt, target), row) in enumerate(zip(tokens, row_of)):
        read_rows += [row] * len(target)
        read_cols += range(len(prompt) - 1, len(prompt) - 1 + len(target))
        target_ids += target
        owner += [index] * len(target)
    index = lambda values: torch.tensor(values, device=hidden.device)
    logits = unembed(model, hidden[index(read_rows), index(read_cols)]).double()  # (target tokens, vocab)
    token_nll = -logits.log_softmax(-1).gather(-1, index(target_ids)[:, None])[:, 0]
    owner = index(owner)
    sums = torch.zeros(len(pairs), dtype=torch.float64, device=hidden.device).index_add_(0, owner, token_nll)
    return (sums / torch.bincount(owner, minlength=len(pairs))).cpu()


@torch.no_grad()
def reference_target_nlls(model, tokenizer, pairs: list[Pair]) -> torch.Tensor:
    """The same as target_nlls with one full forward (all logits) per pair: the reference and the baseline."""
    nlls = []
    for prompt_ids, target_ids in pair_tokens(tokenizer, pairs):
        input_ids = torch.tensor([prompt_ids + target_ids], device=model.device)
        log_probs = model(input_ids=input_ids).logits[0].double().log_softmax(-1)
        positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(target_ids))
        nlls.append(-log_probs[positions, torch.tensor(target_ids)].mean())
    return torch.stack(nlls).cpu()


@torch.no_grad()
def token_accuracies(model, tokenizer, pairs: list[Pair]) -> torch.Tensor:
    """Top-1 token accuracy of each pair's target after its prompt, (len(pairs),) float64; one forward.
    Each target token counts as right when it is the argmax given the prompt and the target tokens before it."""
    tokens = pair_tokens(tokenizer, pairs)
    rows, row_of = pack_rows([p + t[:-1] for p, t in tokens])
    width, pad = max(len(r) for r in rows), tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=model.device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
    predicted = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.argmax(-1).cpu()
    right = [
        (predicted[row, len(prompt) - 1 : len(prompt) - 1 + len(target)] == torch.tensor(target)).double().mean()
        for (prompt, target), row in zip(tokens, row_of)
    ]
    return torch.stack(right)


# ---------------------------------------------------------------- per record

PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood")


def record_pairs(record) -> tuple[list[Pair], list[tuple[str, int]]]:
    """(prompt, target) pairs of a record: for each prompt (kind, index), target_new then the true object."""
    pairs, keys = [], []
    prompts = {
        "rewrite": [record.text],
        "paraphrase": record.paraphrase_prompts,
        "neighborhood": record.neighborhood_prompts,
    }
    for kind in PROMPT_KINDS:
        true = record.neighborhood_target if kind == "neighborhood" else record.target_true
        for index, prompt in enumerate(prompts[kind]):
            pairs += [(prompt, record.target_new), (prompt, true)]
            keys.append((kind, index))
    return pairs, keys


def measure_record(model, tokenizer, record, batched: bool = True) -> dict[str, list[list[float]]]:
    """NLLs per prompt kind: {"rewrite": [[nll_new, nll_true]], "paraphrase": [...], "neighborhood": [...]}."""
    pairs, keys = record_pairs(record)
    nlls = (target_nlls if batched else reference_target_nlls)(model, tokenizer, pairs).view(-1, 2)
    result = {kind: [] for kind in PROMPT_KINDS}
    for (kind, _), (new, true) in zip(keys, nlls.tolist()):
        result[kind].append([new, true])
    return result


def record_scores(nlls: dict[str, list[list[float]]]) -> dict[str, float]:
    """ROME's per-record scores from NLL pairs [new, true] (fractions and probability differences).

    efficacy/paraphrase score: share of prompts with P(new) > P(true); magnitude: mean P(new) − P(true).
    neighborhood score: share with P(true) > P(new); magnitude: mean P(true) − P(new).
    A kind without prompts gives NaN (not counted in the means).
    """
    scores = {}
    for kind, name, sign in (
        ("rewrite", "efficacy", 1),
        ("paraphrase", "paraphrase", 1),
        ("neighborhood", "neighborhood", -1),
    ):
        pairs = torch.tensor(nlls[kind], dtype=torch.float64).view(-1, 2)
        if len(pairs) == 0:
            scores[f"{name}_score"] = scores[f"{name}_magnitude"] = float("nan")
            continue
        new, true = pairs[:, 0], pairs[:, 1]
        wins = true > new if sign > 0 else true < new  # NLL: lower is more probable
        scores[f"{name}_score"] = wins.double().mean().item()
        scores[f"{name}_magnitude"] = (sign * ((-new).exp() - (-true).exp())).mean().item()
    return scores


ZSRE_KEYS = ("efficacy_accuracy", "paraphrase_accuracy", "neighborhood_accuracy", "portability_accuracy")


def zsre_scores(model, tokenizer, record) -> dict[str, float]:
    """zsRE's scores of one record: token accuracy of target_new after the question (efficacy) and its
    paraphrase, of the unrelated answer after its question (neighborhood), and of the portability answer."""
    new, neighbour, portable = record.target_new, record.neighborhood_target, record.portability_target
    groups = [("efficacy_accuracy", [(record.text, new)]),
              ("paraphrase_accuracy", [(p, new) for p in record.paraphrase_prompts]),
              ("neighborhood_accuracy", [(p, neighbour) for p in record.neighborhood_prompts]),
              ("portability_accuracy", [(p, portable) for p in record.portability_prompts])]  # fmt: skip
    pairs = [pair for _, members in groups for pair in members]
    accuracies, scores, start = token_accuracies(model, tokenizer, pairs).tolist(), {}, 0
    for key, members in groups:
        chosen = accuracies[start : start + len(members)]
        scores[key], start = (sum(chosen) / len(chosen) if chosen else float("nan")), start + len(members)
    return scores
