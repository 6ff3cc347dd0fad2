"""How many tokens C = E[k kᵀ] needs: cosine of u = C⁻¹k at n tokens against u at all tokens.

ROME's update direction is u = C⁻¹k for the subject key k, so the budget question is when u stops
moving. One pass keeps copies of C after n = 10k, 20k, ... tokens; k are real CounterFact subject
keys (rewrite-module input at the subject's last token of requested_rewrite.prompt).
"""
import json
import logging

import torch
from lightning.pytorch.callbacks import Callback

from factedit.architectures import module_name
from factedit.data.wikipedia import WikipediaDataModule
from factedit.hooks import run_until
from factedit.paths import SHARED_DATA_DIR
from factedit.stats.collect import plan_jobs, run_pass

log = logging.getLogger(__name__)
COUNTERFACT = SHARED_DATA_DIR / "counterfact" / "counterfact_original_format.json"
SNAPSHOT_TOKENS = (10_000, 20_000, 50_000, 100_000, 200_000, 300_000, 500_000, 750_000, 1_000_000, 2_000_000, 5_000_000)


class Snapshots(Callback):
    """Keeps (n, C_n) after the first batch at which n ≥ each threshold tokens are summed."""

    def __init__(self, layer: int, thresholds=SNAPSHOT_TOKENS):
        self.layer, self.pending, self.taken = layer, sorted(thresholds), []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        tokens = pl_module.rows_done() * batch["input_ids"].shape[1]
        if not self.pending or tokens < self.pending[0]:
            return
        while self.pending and tokens >= self.pending[0]:
            self.pending.pop(0)
        moment = pl_module.moments[str(self.layer)]
        with moment.sync_context():
            self.taken.append((int(moment.count), (moment.key_outer_sum / moment.count).cpu()))


def subject_keys(model, tokenizer, layer: int, count: int) -> tuple[list[str], torch.Tensor]:
    """Subjects of the first `count` CounterFact records and their keys: (count, d_mlp) float64."""
    from factedit.tokens import batch_encode, fill_subject, subject_token_range

    records = json.loads(COUNTERFACT.read_text())[:count]
    subjects, texts, last = [], [], []
    for record in records:
        subject = record["requested_rewrite"]["subject"]
        text, start = fill_subject(record["requested_rewrite"]["prompt"], subject)
        subjects.append(subject)
        texts.append(text)
        last.append(subject_token_range(tokenizer, text, subject, start)[1] - 1)
    name = module_name(model, "rewrite", layer)
    keys = run_until(model, [name], **batch_encode(tokenizer, texts, next(model.parameters()).device))[name].input
    return subjects, keys[torch.arange(len(texts)), torch.tensor(last)].double().cpu()


def cosines(second_moment: torch.Tensor, reference: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(C⁻¹k, C_ref⁻¹k) per key; keys: (subjects, d_mlp) -> (subjects,)."""
    u = torch.linalg.solve(second_moment.double(), keys.T)
    u_reference = torch.linalg.solve(reference.double(), keys.T)
    return torch.nn.functional.cosine_similarity(u, u_reference, dim=0)


def second_moment_in_memory(model, tokenizer, layer, *, callbacks=(), trainer_kwargs=None, **data) -> tuple[torch.Tensor, int]:
    """C of one pass, not written to disk: (d_mlp, d_mlp) float64, and its token count."""
    datamodule = WikipediaDataModule(tokenizer, **data)
    jobs, _ = plan_jobs(model, [layer], datamodule, "report", write=False)
    collector = run_pass(model, datamodule, jobs, trainer_kwargs=trainer_kwargs, callbacks=callbacks)
    return collector.second_moments[layer], collector.counts[layer]


def convergence_report(model, tokenizer, layer: int, *, subjects: int = 10, reference_source: str | None = None,
                       trainer_kwargs=None, **data) -> list[dict]:
    """Print and return rows {tokens, min_cos, mean_cos, rel_error}: u = C_n⁻¹k against u = C_all⁻¹k.

    data: WikipediaDataModule arguments (source, max_tokens (None: all), seq_len, batch_size, seed).
    reference_source: also compare C_all with C of all of another source (the corpus' own spread).
    """
    names, keys = subject_keys(model, tokenizer, layer, subjects)
    snapshots = Snapshots(layer)
    final, total = second_moment_in_memory(model, tokenizer, layer, callbacks=[snapshots], trainer_kwargs=trainer_kwargs, **data)
    rows = []
    for tokens, second_moment in snapshots.taken:
        cos = cosines(second_moment, final, keys)
        rel_error = float(torch.linalg.norm(second_moment - final) / torch.linalg.norm(final))
        rows.append({"tokens": tokens, "min_cos": float(cos.min()), "mean_cos": float(cos.mean()), "rel_error": rel_error})
    lines = [f"convergence of u = C⁻¹k at layer {layer}, {len(names)} CounterFact subjects "
             f"({', '.join(names[:4])}, ...), source {data.get('source')}, against all {total:,} tokens",
             f"{'tokens':>10} {'min cos':>9} {'mean cos':>9} {'‖C−C_all‖/‖C_all‖':>18}"]
    lines += [f"{r['tokens']:>10,} {r['min_cos']:>9.4f} {r['mean_cos']:>9.4f} {r['rel_error']:>18.4f}" for r in rows]
    if reference_source:
        other, _ = second_moment_in_memory(model, tokenizer, layer, trainer_kwargs=trainer_kwargs,
                                        **{**data, "source": reference_source, "max_tokens": None})
        cos = cosines(other, final, keys)
        rows.append({"tokens": None, "source": reference_source, "min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                     "rel_error": float(torch.linalg.norm(other - final) / torch.linalg.norm(final))})
        lines.append(f"{'all ' + reference_source:>10} {rows[-1]['min_cos']:>9.4f} {rows[-1]['mean_cos']:>9.4f} "
                     f"{rows[-1]['rel_error']:>18.4f}   (another corpus: the spread between text sources)")
    print("\n".join(lines), flush=True)
    return rows
