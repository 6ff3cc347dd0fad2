"""Average indirect effects over many facts (ROME §2.1, Fig. 2), traced as a Lightning `predict`.

Indirect effect of a restoration = P(true object | corrupted, state restored) − P(true object | corrupted).
Per fact, the effects of the tokens in each bucket are averaged; then buckets are averaged over facts.
Total effect = P(clean) − P(corrupted).
"""

import json
import logging
import warnings
from pathlib import Path

import lightning
import numpy as np
import torch

from factedit.errors import FacteditError
from factedit.io import write_json
from factedit.tracing.causal_trace import encode_prompt, trace_fact

log = logging.getLogger(__name__)
BUCKETS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
LAST_SUBJECT = BUCKETS.index("last subject token")


# ---------------------------------------------------------------- token buckets and averages


def bucket_tokens(subject_range, n_tokens: int) -> dict[str, list[int]]:
    """Token indices of each bucket. A one-token subject is both first and last subject token; the
    token after the subject is "first subsequent" unless it is the last token. Tokens before the
    subject (Gemma's BOS) belong to no bucket."""
    start, end = subject_range
    last = n_tokens - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end < last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


def bucket_effects(result: dict) -> dict[str, np.ndarray]:
    """kind -> (len(BUCKETS), L) indirect effects of one fact, averaged over each bucket's tokens (nan if empty)."""
    effects = {}
    for kind, scores in result["scores"].items():
        indirect = np.array(scores) - result["corrupted_prob"]  # (T, L)
        buckets = bucket_tokens(result["subject_range"], indirect.shape[0])
        empty = np.full(indirect.shape[1], np.nan)
        effects[kind] = np.stack([indirect[buckets[b]].mean(axis=0) if buckets[b] else empty for b in BUCKETS])
    return effects


def peak(values) -> dict:
    values = np.asarray(values, dtype=float)
    layer = int(np.nanargmax(values))
    return {"layer": layer, "aie": float(values[layer])}


def average_effects(results: list[dict], model_name: str = "") -> dict:
    """Average indirect effects per kind, bucket and layer over `results`, with counts, totals and peaks."""
    if not results:
        raise FacteditError("no traced facts to average: raise data.limit or check the data file")
    per_fact = [bucket_effects(r) for r in results]
    clean = np.array([r["clean_prob"] for r in results])
    corrupted = np.array([r["corrupted_prob"] for r in results])
    effects = {}
    for kind in per_fact[0]:
        stacked = np.stack([f[kind] for f in per_fact])  # (facts, buckets, L)
        counts = (~np.isnan(stacked[:, :, 0])).sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a bucket no fact has: nan
            means = np.nanmean(stacked, axis=0)
        effects[kind] = {b: {"aie": means[i].tolist(), "count": int(counts[i])} for i, b in enumerate(BUCKETS)}
    sites = (
        ("mlp", "last subject token"),
        ("hidden", "last subject token"),
        ("attn", "last token"),
        ("mlp", "last token"),
    )
    peaks = {f"{kind} at {bucket}": peak(effects[kind][bucket]["aie"]) for kind, bucket in sites if kind in effects}
    first = results[0]
    return dict(model=model_name, n_facts=len(results), window=first["window"], samples=first["samples"],
                noise=first["noise"], noise_std=first["noise_std"], corruption=first["corruption"],
                clean_prob=float(clean.mean()), corrupted_prob=float(corrupted.mean()),
                total_effect=float((clean - corrupted).mean()), peaks=peaks, effects=effects,
                facts=[_fact_line(r, f) for r, f in zip(results, per_fact)])  # fmt: skip


def _fact_line(result: dict, effects: dict) -> dict:
    keys = ("case_id", "subject", "text", "target", "clean_prob", "corrupted_prob")
    line = {key: result.get(key) for key in keys}
    line["mlp_peak_at_last_subject"] = peak(effects["mlp"][LAST_SUBJECT]) if "mlp" in effects else None
    return line


# ---------------------------------------------------------------- CounterFact facts the model knows


def read_counterfact(path) -> list[dict]:
    """{case_id, subject, prompt, target_true} of each record of a CounterFact file (ROME's format)."""
    path = Path(path)
    if not path.is_file():
        raise FacteditError(f"CounterFact file {path} not found: set data.path=...")
    try:
        records = json.loads(path.read_text())
        rewrites = [(r.get("case_id", i), r["requested_rewrite"]) for i, r in enumerate(records)]
        return [
            {
                "case_id": case_id,
                "subject": rewrite["subject"],
                "prompt": rewrite["prompt"],
                "target_true": rewrite["target_true"]["str"],
            }
            for case_id, rewrite in rewrites
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise FacteditError(f"{path} is not a CounterFact file in ROME's format ({error!r})") from None


@torch.no_grad()
def known_facts(model, tokenizer, facts: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` facts whose true object's first token is the model's top prediction."""
    known = []
    for fact in facts:
        try:
            prompt = encode_prompt(tokenizer, fact["prompt"], fact["subject"], fact["target_true"])
        except FacteditError as error:
            log.debug("skipping case %s: %s", fact["case_id"], error)
            continue
        logits = model(input_ids=prompt.input_ids.to(model.device), use_cache=False, logits_to_keep=1).logits[0, -1]
        if int(logits.argmax()) == prompt.target_id:
            known.append(fact)
            if limit is not None and len(known) >= limit:
                break
    return known


# ---------------------------------------------------------------- Lightning predict


class CausalTraceModule(lightning.LightningModule):
    """predict_step traces one fact and writes facts/<case_id>.json; the Trainer splits facts over devices.

    A fact file already written with the same settings is read back instead of traced again.
    """

    def __init__(self, model, tokenizer, settings: dict, fact_dir, tag: dict):
        super().__init__()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.fact_dir, self.tag = Path(fact_dir), tag

    def predict_step(self, fact: dict, batch_idx: int) -> dict:
        path = self.fact_dir / f"{fact['case_id']}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("tag") == self.tag:
                return cached
        result = trace_fact(
            self.model,
            self.tokenizer,
            fact["prompt"],
            fact["subject"],
            fact["target_true"],
            force=True,
            **self.settings,
        ).to_dict()
        result.update(case_id=fact["case_id"], tag=self.tag, rank=self.global_rank)
        write_json(path, result)
        return result


def trace_facts(
    model, tokenizer, facts: list[dict], settings: dict, out_dir, tag: dict, trainer_cfg: dict
) -> list[dict] | None:
    """Trace `facts` with lightning.Trainer(**trainer_cfg).predict; on rank 0, return every fact's result."""
    fact_dir = Path(out_dir) / "facts"
    module = CausalTraceModule(model, tokenizer, settings, fact_dir, tag)
    loader = torch.utils.data.DataLoader(facts, batch_size=None, shuffle=False)
    trainer = lightning.Trainer(**trainer_cfg)
    trainer.predict(module, loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    return [json.loads((fact_dir / f"{fact['case_id']}.json").read_text()) for fact in facts]
