"""CounterFact metrics as torchmetrics: means over records, overall and per relation, sum-reduced across processes.

Every score is first a per-record value (probabilities.record_scores, generation.*); a metric
averages it over records as ROME's summarize does:
    efficacy / paraphrase / neighborhood score and magnitude       (ES, EM, PS, PM, NS, NM)
    generation entropy, reference score                            (GE, RS)
    Score = harmonic mean of ES, PS and NS                         (EditScore)
States are float64 sums of shape (relations,), so any number of processes reduce exactly by a sum.
"""

import math
import warnings

import torch
from torchmetrics import Metric

from factedit.evaluation.probabilities import ZSRE_KEYS

SCORE_KEYS = (
    "efficacy_score",
    "efficacy_magnitude",
    "paraphrase_score",
    "paraphrase_magnitude",
    "neighborhood_score",
    "neighborhood_magnitude",
)
GENERATION_KEYS = ("generation_entropy", "reference_score")
SHORT = {
    "efficacy_score": "ES",
    "efficacy_magnitude": "EM",
    "paraphrase_score": "PS",
    "paraphrase_magnitude": "PM",
    "neighborhood_score": "NS",
    "neighborhood_magnitude": "NM",
    "generation_entropy": "GE",
    "reference_score": "RS",
    "score": "Score",
    "efficacy_accuracy": "Eff",
    "paraphrase_accuracy": "Par",
    "neighborhood_accuracy": "Spe",
    "portability_accuracy": "Port",
}


def harmonic_mean(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Harmonic mean along `dim`; 0 where any value is 0 (scipy.stats.hmean), NaN where any is NaN."""
    values = values.double()
    zero = (values == 0).any(dim)
    result = values.shape[dim] / (1 / values.clamp_min(1e-300)).sum(dim)
    return torch.where(zero & ~values.isnan().any(dim), torch.zeros_like(result), result)


class RecordMean(Metric):
    """Mean of one per-record value over records, overall and per relation.

    update(values: (records,), relation: (records,) long); NaN values are not counted.
    compute() -> {"all": (), "by_relation": (relations,)} (NaN where a relation has no value).
    """

    full_state_update = False

    def __init__(self, relations: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(relations, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(relations, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, relation: torch.Tensor) -> None:
        values = torch.as_tensor(values, dtype=torch.float64, device=self.total.device).reshape(-1)
        relation = torch.as_tensor(relation, dtype=torch.long, device=self.total.device).reshape(-1)
        keep = ~values.isnan()
        self.total.index_add_(0, relation[keep], values[keep])
        self.count.index_add_(0, relation[keep], torch.ones_like(values[keep]))

    def compute(self) -> dict[str, torch.Tensor]:
        return {"all": self.total.sum() / self.count.sum(), "by_relation": self.total / self.count}


class EditScore(Metric):
    """Score: the harmonic mean of the mean ES, PS and NS (each a mean over records), overall and per relation.

    update(scores: (records, 3) columns ES, PS, NS, relation: (records,)).
    """

    full_state_update = False

    def __init__(self, relations: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros(relations, 3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(relations, 3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, relation: torch.Tensor) -> None:
        scores = torch.as_tensor(scores, dtype=torch.float64, device=self.total.device).reshape(-1, 3)
        relation = torch.as_tensor(relation, dtype=torch.long, device=self.total.device).reshape(-1)
        known = ~scores.isnan()
        self.total.index_add_(0, relation, scores.nan_to_num(0.0))
        self.count.index_add_(0, relation, known.double())

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "all": harmonic_mean(self.total.sum(0) / self.count.sum(0)),
            "by_relation": harmonic_mean(self.total / self.count),
        }


class Count(Metric):
    """A number of records, sum-reduced across processes."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, n: float = 1.0) -> None:
        self.count += n

    def compute(self) -> torch.Tensor:
        return self.count


class CounterFactMetrics(torch.nn.Module):
    """All summary metrics of a run: `pre_*` on the unedited model, `post_*` after each edit, GE and RS after.

    update(result, relation) takes one record's result dict (module.CounterFactEvaluator.evaluate_record).
    compute() -> {"records", "failed", "pre": {...}, "post": {...}, "by_relation": {relation: {...}}}.
    """

    def __init__(self, relations: list[str]):
        super().__init__()
        self.relations = list(relations)
        n = len(self.relations)
        self.means = torch.nn.ModuleDict(
            {f"{stage}_{key}": RecordMean(n) for stage in ("pre", "post") for key in SCORE_KEYS + ZSRE_KEYS}
        )
        self.means.update({key: RecordMean(n) for key in GENERATION_KEYS})
        self.scores = torch.nn.ModuleDict({stage: EditScore(n) for stage in ("pre", "post")})
        self.records, self.failed = Count(), Count()
        self.records_per_relation = RecordMean(n)  # counts only: total = records

    def relation_index(self, relation_id: str) -> int:
        return self.relations.index(relation_id)

    def update(self, result: dict) -> None:
        relation = torch.tensor([self.relation_index(result["relation_id"])])
        value = lambda *numbers: torch.tensor([numbers], dtype=torch.float64)
        if result.get("error"):
            self.failed.update(1.0)
            return
        self.records.update(1.0)
        self.records_per_relation.update(value(1.0), relation)
        for stage in ("pre", "post"):
            scores = result["scores"].get(stage)
            if scores is None:
                continue
            for key in SCORE_KEYS:
                self.means[f"{stage}_{key}"].update(value(scores[key]), relation)
            for key in ZSRE_KEYS:  # zsRE records only; NaN (no portability question) is not counted
                if key in scores:
                    self.means[f"{stage}_{key}"].update(value(scores[key]), relation)
            self.scores[stage].update(
                value(scores["efficacy_score"], scores["paraphrase_score"], scores["neighborhood_score"]), relation
            )
        for key in GENERATION_KEYS:
            number = (result.get("generation") or {}).get(key)
            if number is not None:
                self.means[key].update(value(number), relation)

    def compute(self) -> dict:
        """Sync (every process must call it) and return plain floats; None where nothing was measured."""
        with warnings.catch_warnings():  # metrics without updates (GE with gen=false, failures) are expected
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return self._compute()

    def _compute(self) -> dict:
        flat = lambda out: {
            "all": out["all"],
            "by_relation": out["by_relation"].reshape(-1),
        }  # torchmetrics squeezes one relation
        means = {name: flat(metric.compute()) for name, metric in self.means.items()}
        scores = {stage: flat(metric.compute()) for stage, metric in self.scores.items()}
        with self.records_per_relation.sync_context():
            counts = self.records_per_relation.count.clone().reshape(-1)
        summary = {
            "records": int(self.records.compute().item()),
            "failed": int(self.failed.compute().item()),
            "by_relation": {},
        }
        for stage in ("pre", "post"):
            keys = SCORE_KEYS + (GENERATION_KEYS if stage == "post" else ())
            summary[stage] = {
                key: _float(means[key if key in GENERATION_KEYS else f"{stage}_{key}"]["all"]) for key in keys
            }
            summary[stage]["score"] = _float(scores[stage]["all"])
            accuracies = {key: _float(means[f"{stage}_{key}"]["all"]) for key in ZSRE_KEYS}
            summary[stage].update({k: v for k, v in accuracies.items() if v is not None})  # zsRE runs only
        for row, relation in enumerate(self.relations):
            if counts[row] == 0:
                continue
            summary["by_relation"][relation] = {
                "records": int(counts[row].item()),
                **{
                    stage: {
                        "score": _float(scores[stage]["by_relation"][row]),
                        **{key: _float(means[f"{stage}_{key}"]["by_relation"][row]) for key in SCORE_KEYS},
                    }
                    for stage in ("pre", "post")
                },
            }
        return summary


def _float(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
