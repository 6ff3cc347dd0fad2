"""CounterFact evaluation (ROME §4.2): per record edit, measure, restore; metrics reduced over processes.

probabilities.py  P(new) / P(true) of all of a record's prompts in one padded forward
generation.py     sampled generations, n-gram entropy, TF-IDF reference score
metrics.py        torchmetrics: ES / PS / NS and magnitudes, Score, GE, RS; per relation
editors.py        none, rome, attn_late, ft, ft_l, saved edits
module.py         CounterFactEvaluator(LightningModule): test_step = edit, measure, restore
report.py         summary.json, markdown tables, bar charts, compare=[...]
command.py        `python src/evaluate.py`
"""

from factedit.evaluation.metrics import CounterFactMetrics, EditScore, RecordMean
from factedit.evaluation.module import CounterFactEvaluator
from factedit.evaluation.probabilities import measure_record, record_scores, target_nlls

__all__ = [
    "CounterFactEvaluator",
    "CounterFactMetrics",
    "EditScore",
    "RecordMean",
    "measure_record",
    "record_scores",
    "target_nlls",
]
