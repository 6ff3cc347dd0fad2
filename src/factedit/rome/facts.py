"""A fact to write: subject, prompt template, new object, and the probes reported around an edit."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from factedit.errors import FacteditError


@dataclass
class Fact:
    """`prompt.format(subject)` should be completed by `target_new` after the edit."""

    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    name: str = "fact"
    generalization_probes: list[str] = field(default_factory=list)
    specificity_probes: list[str] = field(default_factory=list)

    def __post_init__(self):
        for key in ("subject", "prompt", "target_new"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise FacteditError(f"fact {self.name!r}: {key} must be a non-empty string (got {value!r})")
        if self.prompt.count("{}") != 1:
            raise FacteditError(
                f"fact {self.name!r}: prompt {self.prompt!r} needs exactly one '{{}}' where the subject goes"
            )
        if self.target_true is not None and self.target_new.strip() == str(self.target_true).strip():
            raise FacteditError(
                f"fact {self.name!r}: target_new equals target_true ({self.target_new!r}); nothing to edit"
            )
        self.target_new = self.target_new.strip()

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict:
        return asdict(self)


def fact_from_config(cfg) -> Fact:
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    known = {k: v for k, v in data.items() if k in Fact.__dataclass_fields__}
    missing = {"subject", "prompt", "target_new"} - set(known)
    if missing:
        raise FacteditError(
            f"fact is missing {', '.join(sorted(missing))}: set fact.{sorted(missing)[0]}=... or pick fact=<name>"
        )
    return Fact(**known)


def as_facts(facts) -> list[Fact]:
    """A Fact, a mapping, or a list of them, as a list of Facts."""
    facts = facts if isinstance(facts, (list, tuple, ListConfig)) else [facts]
    return [f if isinstance(f, Fact) else fact_from_config(f) for f in facts]


def load_facts(path) -> list[Fact]:
    """Facts from a JSON or YAML file holding a list of fact mappings (or CounterFact records)."""
    path = Path(path)
    if not path.is_file():
        raise FacteditError(f"facts file {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else OmegaConf.to_container(OmegaConf.load(path))
    except (ValueError, OSError) as error:
        raise FacteditError(f"cannot read facts file {path}: {error}") from None
    if isinstance(data, (dict, DictConfig)):
        data = [data]
    if not isinstance(data, (list, ListConfig)):
        raise FacteditError(f"facts file {path} must hold a list of facts")
    return [fact_from_config(_from_counterfact(item, i)) for i, item in enumerate(data)]


def _from_counterfact(item: dict, index: int) -> dict:
    """Accept CounterFact records (requested_rewrite) beside plain fact mappings."""
    if "requested_rewrite" not in item:
        return {"name": f"fact{index}", **item}
    rewrite = item["requested_rewrite"]
    return {
        "name": f"case{item.get('case_id', index)}",
        "subject": rewrite["subject"],
        "prompt": rewrite["prompt"],
        "target_new": rewrite["target_new"]["str"],
        "target_true": rewrite["target_true"]["str"],
        "generalization_probes": list(item.get("paraphrase_prompts", [])),
        "specificity_probes": list(item.get("neighborhood_prompts", []))[:3],
    }
