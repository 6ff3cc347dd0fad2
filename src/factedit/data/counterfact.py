"""CounterFact records in either published format, validated, as a DataModule for `trainer.test`.

Formats (see ../shared/data/SOURCES.md):
    original  ROME's counterfact.json: case_id, requested_rewrite{prompt "{}...", subject, relation_id,
              target_new{str}, target_true{str}}, paraphrase_prompts[2], neighborhood_prompts[10],
              attribute_prompts[10], generation_prompts[10]
    easyedit  counterfact-edit/-train/-val.json: case_id, prompt (the subject written out), subject,
              target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth;
              one paraphrase, one neighbourhood prompt, no relation, attribute or generation prompts.

A malformed record (a missing field, a target that is not a string, a subject absent from the
edit prompt, a repeated case_id) is reported with its case_id and skipped; it never stops a run.
"""

import json
import logging
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning
from torch.utils.data import DataLoader

from factedit.errors import FacteditError
from factedit.paths import SHARED_DATA_DIR, cache_dir

log = logging.getLogger(__name__)

DEV_FILE = SHARED_DATA_DIR / "counterfact" / "counterfact_original_format.json"
FULL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"  # 21,919 records, 45 MB; `data.path=full`
NO_RELATION = "-"


@dataclass
class Record:
    """One CounterFact case: rewrite `prompt.format(subject)` from target_true to target_new.

    neighborhood_target: the true object of the neighbourhood prompts (CounterFact: target_true).
    """

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str
    relation_id: str = NO_RELATION
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    neighborhood_target: str | None = None
    portability_prompts: list[str] = field(default_factory=list)  # zsRE: questions the edit should answer too
    portability_target: str | None = None

    def __post_init__(self):
        if self.neighborhood_target is None:
            self.neighborhood_target = self.target_true

    @property
    def text(self) -> str:
        """The edit prompt with the subject written in."""
        return self.prompt.replace("{}", self.subject)

    def to_fact(self):
        from factedit.rome.facts import Fact

        return Fact(
            subject=self.subject,
            prompt=self.prompt,
            target_new=self.target_new,
            target_true=self.target_true,
            name=f"case{self.case_id}",
            generalization_probes=list(self.paraphrase_prompts),
            specificity_probes=list(self.neighborhood_prompts[:3]),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Skipped:
    """A record that failed validation: its case_id (or `#index` when it has none) and why."""

    case_id: str
    reason: str


class _Invalid(Exception):
    pass


# ---------------------------------------------------------------- reading and validation


def resolve_path(path) -> Path:
    """A local file, or `full` / an http(s) URL downloaded once into the user cache."""
    path = str(path)
    if path == "full":
        path = FULL_URL
    if not path.startswith(("http://", "https://")):
        local = Path(path)
        if not local.is_file():
            raise FacteditError(f"CounterFact file {local} does not exist: use data.path=<file> (default {DEV_FILE})")
        return local
    local = cache_dir() / "counterfact" / path.rsplit("/", 1)[-1]
    if not local.is_file():
        log.info("downloading %s to %s", path, local)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(path, timeout=60) as response:
                data = response.read()
        except OSError as error:
            raise FacteditError(f"cannot download {path} ({error}): offline, use data.path={DEV_FILE}") from None
        tmp = local.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.rename(local)
    return local


def _text(item: dict, key: str, where: str = "") -> str:
    value = item.get(key) if isinstance(item, dict) else None
    if value is None:
        raise _Invalid(f"missing field {where}{key}")
    if not isinstance(value, str):
        raise _Invalid(f"{where}{key} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise _Invalid(f"{where}{key} is empty")
    return value


def _texts(item: dict, key: str, required: bool = True) -> list[str]:
    if key not in item:
        if required:
            raise _Invalid(f"missing field {key}")
        return []
    value = item[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid(f"{key} must be a list of non-empty strings")
    return list(value)


def _object(rewrite: dict, key: str) -> str:
    value = rewrite.get(key)
    if isinstance(value, dict):
        return _text(value, "str", f"requested_rewrite.{key}.").strip()
    if value is None:
        raise _Invalid(f"missing field requested_rewrite.{key}")
    raise _Invalid(f"requested_rewrite.{key} must be {{'str': ...}}, not {type(value).__name__}")


def _from_original(item: dict, case_id: int) -> Record:
    rewrite = item.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise _Invalid("missing field requested_rewrite")
    prompt, subject = _text(rewrite, "prompt", "requested_rewrite."), _text(rewrite, "subject", "requested_rewrite.")
    if prompt.count("{}") != 1:
        where = "is absent from" if "{}" not in prompt else "occurs more than once in"
        raise _Invalid(f"the subject's '{{}}' {where} requested_rewrite.prompt {prompt!r}")
    relation = rewrite.get("relation_id") or NO_RELATION
    return Record(
        case_id,
        subject,
        prompt,
        _object(rewrite, "target_new"),
        _object(rewrite, "target_true"),
        relation if isinstance(relation, str) else str(relation),
        _texts(item, "paraphrase_prompts"),
        _texts(item, "neighborhood_prompts"),
        _texts(item, "attribute_prompts", required=False),
        _texts(item, "generation_prompts", required=False),
    )


def _from_easyedit(item: dict, case_id: int) -> Record:
    text, subject = _text(item, "prompt"), _text(item, "subject")
    start = text.rfind(subject)
    if start < 0:
        raise _Invalid(f"subject {subject!r} is absent from prompt {text!r}")
    prompt = text[:start] + "{}" + text[start + len(subject) :]
    target_true = _text(item, "ground_truth").strip()
    locality = _text(item, "locality_ground_truth").strip() if "locality_ground_truth" in item else target_true
    return Record(
        case_id,
        subject,
        prompt,
        _text(item, "target_new").strip(),
        target_true,
        NO_RELATION,
        [_text(item, "rephrase_prompt")],
        [_text(item, "locality_prompt")],
        neighborhood_target=locality,
    )


def parse_record(item) -> Record:
    """A validated Record from one raw item of either format; raises _Invalid with the reason."""
    if not isinstance(item, dict):
        raise _Invalid(f"a record must be a JSON object, not {type(item).__name__}")
    case_id = item.get("case_id")
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise _Invalid("missing field case_id" if case_id is None else f"case_id must be an integer, not {case_id!r}")
    record = _from_original(item, case_id) if "requested_rewrite" in item else _from_easyedit(item, case_id)
    if "{" in record.prompt.replace("{}", "", 1) or "}" in record.prompt.replace("{}", "", 1):
        raise _Invalid(f"prompt {record.prompt!r} holds braces besides the subject's '{{}}'")
    if record.target_new.strip() == record.target_true.strip():
        raise _Invalid(f"target_new equals target_true ({record.target_new!r})")
    if not record.paraphrase_prompts and not record.neighborhood_prompts:
        raise _Invalid("no paraphrase or neighbourhood prompts")
    return record


def load_records(path, limit: int | None = None) -> tuple[list[Record], list[Skipped]]:
    """The first `limit` items of a CounterFact file: valid Records and the Skipped ones (with reasons)."""
    path = resolve_path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FacteditError(f"cannot read CounterFact file {path}: {error}") from None
    if not isinstance(items, list):
        raise FacteditError(f"{path} must hold a JSON list of CounterFact records")
    if limit is not None:
        items = items[: int(limit)]
    records, skipped, seen = [], [], set()
    for index, item in enumerate(items):
        label = item.get("case_id") if isinstance(item, dict) and item.get("case_id") is not None else f"#{index}"
        try:
            record = parse_record(item)
            if record.case_id in seen:
                raise _Invalid(f"case_id {record.case_id} repeats an earlier record")
        except _Invalid as reason:
            log.warning("skipping CounterFact record %s: %s", label, reason)
            skipped.append(Skipped(str(label), str(reason)))
            continue
        seen.add(record.case_id)
        records.append(record)
    return records, skipped


def relations_of(records: list[Record]) -> list[str]:
    """The sorted relation ids of `records`: the row order of per-relation metrics."""
    return sorted({r.relation_id for r in records})


# ---------------------------------------------------------------- the DataModule


class CounterFactDataModule(lightning.LightningDataModule):
    """Records to evaluate, one per test batch; the Trainer's distributed sampler shards them.

    records: the valid records of the run (a list), minus `done` case_ids (a resumed run).
    Each batch is [Record]. With W processes the sampler pads the last round with repeats of the
    first records; `is_padding(batch_idx, rank, world)` tells the evaluator to skip those.
    """

    def __init__(self, records: list[Record], done: set[int] = frozenset()):
        super().__init__()
        self.records = [r for r in records if r.case_id not in done]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.records, batch_size=1, shuffle=False, collate_fn=list, num_workers=0)

    def is_padding(self, batch_idx: int, rank: int, world_size: int) -> bool:
        """DistributedSampler(shuffle=False) gives rank r the items r, r+W, ...; positions ≥ len are repeats."""
        return batch_idx * world_size + rank >= len(self.records)
