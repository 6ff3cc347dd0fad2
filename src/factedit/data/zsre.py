"""zsRE question-answering edits (Levy et al. 2017; the MEND/ROME split), as CounterFact-style Records.

Each item: subject, src (a question about the subject), alt (the new answer), answers (the true
ones), rephrase (a paraphrased question), loc / loc_ans (an unrelated Natural Questions pair), and in
the EasyEdit release a `portability` question whose answer follows from the edit. ROME, MEMIT and
AlphaEdit report zsRE as top-1 token accuracy: each answer token predicted from the question plus the
answer tokens before it (probabilities.token_accuracies).

    data=zsre    ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json (1,037 records)
"""

import logging

from factedit.data.counterfact import Record, Skipped
from factedit.errors import FacteditError
from factedit.io import read_json
from factedit.paths import SHARED_DATA_DIR

log = logging.getLogger(__name__)
ZSRE_FILE = SHARED_DATA_DIR / "zsre" / "zsre_mend_eval_portability_gpt4.json"


def load_zsre(path=None, limit: int | None = None) -> tuple[list[Record], list[Skipped]]:
    """The first `limit` items of a zsRE file as Records (case_id = position), and the skipped ones."""
    path = ZSRE_FILE if path is None else path
    items = read_json(path, f"use data.path=<file> (default {ZSRE_FILE})")
    if not isinstance(items, list):
        raise FacteditError(f"{path} must hold a JSON list of zsRE records")
    records, skipped = [], []
    for index, item in enumerate(items[: None if limit is None else int(limit)]):
        try:
            records.append(_record(item, index))
        except (KeyError, TypeError, ValueError) as reason:
            log.warning("skipping zsRE record %d: %s", index, reason)
            skipped.append(Skipped(str(index), str(reason)))
    return records, skipped


def _record(item: dict, index: int) -> Record:
    subject, question = _text(item, "subject"), _text(item, "src")
    if subject not in question:
        raise ValueError(f"subject {subject!r} is not in the question {question!r}")
    if "{" in question or "}" in question:
        raise ValueError(f"question {question!r} holds braces")
    answers, new_answer = item.get("answers") or [item.get("pred")], _text(item, "alt")
    if new_answer == str(answers[0]).strip():  # a few items of the MEND split: no edit to make
        raise ValueError(f"the new answer {new_answer!r} is the true one: nothing to edit")
    portability = item.get("portability") or {}
    record = Record(
        case_id=index,
        subject=subject,
        prompt=question.replace(subject, "{}", 1),
        target_new=new_answer,
        target_true=str(answers[0]).strip(),
        relation_id="zsre",
        paraphrase_prompts=[_text(item, "rephrase")],
        neighborhood_prompts=[_text(item, "loc")],
        neighborhood_target=_text(item, "loc_ans"),
    )
    if portability.get("New Question") and portability.get("New Answer"):
        record.portability_prompts = [str(portability["New Question"]).strip()]
        record.portability_target = str(portability["New Answer"]).strip()
    return record


def _text(item: dict, key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string")
    return value.strip()
