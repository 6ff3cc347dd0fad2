"""CounterFactEvaluator: `trainer.test` over CounterFact records; each test_step edits, measures, restores.

Per record (one test batch):
    pre  = NLLs of target_new / target_true on the unedited model (one padded forward)
    edit = the editor's in-place change (gradients on: the Trainer runs with inference_mode=False)
    post = the same NLLs on the edited model; generations, entropy and reference score when enabled
    revert, then check bit for bit that every edited weight equals its pristine copy, and that the
         fingerprint of all weights (factedit.model_fingerprint) is the one before the first record
The result is appended to records.jsonl at once (a killed run resumes after the finished records)
and added to the torchmetrics, which are reduced over processes at the end of the epoch.
"""

import logging
import time
from pathlib import Path

import lightning
import torch

from factedit.errors import FacteditError
from factedit.evaluation.generation import generate_texts, generation_entropy, reference_score, reference_texts
from factedit.evaluation.metrics import CounterFactMetrics
from factedit.evaluation.probabilities import measure_record, record_scores, zsre_scores
from factedit.io import append_line
from factedit.models import model_fingerprint
from factedit.rome import WeightBackup, revert_edits

log = logging.getLogger(__name__)


class CounterFactEvaluator(lightning.LightningModule):
    """Evaluates `editor` on the test batches of a CounterFactDataModule.

    editor(model, tokenizer, record) -> WeightBackup; gen: None or {"max_tokens", "top_k", "prompts"};
    zsre: also score each record by zsRE's token accuracies (probabilities.zsre_scores), before and after;
    prior: results of a resumed run (added to the metrics once, by rank 0); records_file: where
    each finished record's result line goes (None: nowhere). After trainer.test, `summary`
    holds CounterFactMetrics.compute() on every rank.
    """

    def __init__(
        self,
        model,
        tokenizer,
        editor,
        relations: list[str],
        *,
        records_file: Path | None = None,
        gen: dict | None = None,
        pre: bool = True,
        prior: list[dict] = (),
        seed: int = 0,
        batched: bool = True,
        zsre: bool = False,
    ):
        super().__init__()
        self.model, self.tokenizer, self.editor = model, tokenizer, editor
        self.records_file, self.gen, self.pre, self.prior = records_file, gen, pre, list(prior)
        self.seed, self.batched, self.zsre = seed, batched, zsre
        self.metrics = CounterFactMetrics(relations)
        self.pristine: dict[str, torch.Tensor] = {}  # module name -> its weight before any edit
        self.summary: dict | None = None
        self.tfidf, self.fingerprint = None, None

    # ------------------------------------------------------------------ Lightning hooks
    def on_test_start(self) -> None:
        self.model.eval()
        self.fingerprint = model_fingerprint(self.model)
        if self.gen is not None:
            from factedit.evaluation.generation import wikipedia_tfidf

            self.tfidf = wikipedia_tfidf()
        if self.global_rank == 0:  # finished records of a resumed run enter the sums once
            self.add_prior()

    def test_step(self, batch, batch_idx):
        datamodule = self.trainer.datamodule
        if datamodule is not None and datamodule.is_padding(batch_idx, self.global_rank, self.trainer.world_size):
            return None  # a repeat the distributed sampler added to even out the ranks
        (record,) = batch
        result = self.evaluate_record(record)
        result["rank"] = self.global_rank
        if self.records_file is not None:
            append_line(self.records_file, result)
        self.metrics.update(result)
        if result.get("error"):
            log.warning("case %s: %s", record.case_id, result["error"])
        return None

    def on_test_epoch_end(self) -> None:
        self.summary = self.metrics.compute()

    def add_prior(self) -> None:
        for result in self.prior:
            self.metrics.update(result)

    def summarize(self, prior: bool = False) -> dict:
        """The summary without a test loop (a resumed run with nothing left to do): prior results only."""
        if prior:
            self.add_prior()
        self.summary = self.metrics.compute()
        return self.summary

    # ------------------------------------------------------------------ one record
    def evaluate_record(self, record) -> dict:
        """Edit, measure, restore: the result line of one record (see records.jsonl in the README)."""
        result = {
            "case_id": record.case_id,
            "relation_id": record.relation_id,
            "subject": record.subject,
            "target_new": record.target_new,
            "target_true": record.target_true,
            "editor": self.editor.name,
        }
        seconds, start = {}, time.perf_counter()
        nlls, scores = {}, {}
        try:
            if self.pre:
                nlls["pre"] = measure_record(self.model, self.tokenizer, record, self.batched)
                scores["pre"] = self._scores(record, nlls["pre"])
            seconds["pre"], start = time.perf_counter() - start, time.perf_counter()
            with torch.enable_grad():
                backup = self.editor(self.model, self.tokenizer, record)
            if getattr(self.editor, "info", None):
                result["edit_info"] = self.editor.info
        except FacteditError as error:
            self._check_pristine()
            return {**result, "error": str(error)}
        seconds["edit"], start = time.perf_counter() - start, time.perf_counter()
        try:
            self.model.to(self.device).eval()  # a nested Trainer may have moved it to the CPU and set train mode
            self._remember_pristine(backup)
            nlls["post"] = measure_record(self.model, self.tokenizer, record, self.batched)
            scores["post"] = self._scores(record, nlls["post"])
            seconds["post"], start = time.perf_counter() - start, time.perf_counter()
            if self.gen is not None and record.generation_prompts:
                result["generation"] = self.generation(record)
                seconds["generation"] = time.perf_counter() - start
        finally:
            revert_edits(self.model, backup)
            self._check_pristine()
        return {**result, "scores": scores, "nlls": nlls, "seconds": {k: round(v, 3) for k, v in seconds.items()}}

    def _scores(self, record, nlls) -> dict:
        """ES / PS / NS and magnitudes from the NLLs; with zsre=True also the token accuracies on the weights now."""
        scores = record_scores(nlls)
        if self.zsre:
            scores.update(zsre_scores(self.model, self.tokenizer, record))
        return scores

    def generation(self, record) -> dict:
        """Texts from the generation prompts, their entropy and their TF-IDF similarity to the reference text."""
        prompts = record.generation_prompts[: self.gen.get("prompts") or None]
        texts = generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            max_tokens=int(self.gen["max_tokens"]),
            top_k=int(self.gen["top_k"]),
            seed=self.seed * 1_000_003 + record.case_id,
        )
        return {
            "texts": texts,
            "generation_entropy": generation_entropy(texts),
            "reference_score": reference_score(texts, reference_texts(record), self.tfidf)
            if record.attribute_prompts
            else None,
        }

    # ------------------------------------------------------------------ exact restore
    def _remember_pristine(self, backup: WeightBackup) -> None:
        """Keep (on the CPU) the first pre-edit copy of every module an editor touches; later copies must equal it."""
        for name, original in backup.items():
            if name not in self.pristine:
                self.pristine[name] = original.detach().cpu().clone()
            elif not torch.equal(original.cpu(), self.pristine[name]):
                raise AssertionError(f"{name} was not restored exactly before this record")

    def _check_pristine(self) -> None:
        for name, original in self.pristine.items():
            if not torch.equal(self.model.get_submodule(name).weight.cpu(), original):
                raise AssertionError(f"{name} differs from its original weights after restoring")
        if self.fingerprint is not None and model_fingerprint(self.model) != self.fingerprint:
            raise AssertionError(f"the weights changed outside the editor's backup ({self.editor.name})")
