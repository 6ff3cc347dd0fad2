"""A fact to write: subject, prompt template, new object, and the probes reported around an edit."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from factedit.errors import FacteditError
from factedit.options import shown


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
        check_prompt(self.prompt, f"fact {self.name!r}")
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


def check_prompt(prompt: str, where: str) -> None:
    """A prompt template holds exactly one `{}` (where the subject goes) and no other brace: `{{}}` or
    `{name}` would be read by str.format as something else than the subject."""
    if prompt.count("{}") != 1 or "{" in prompt.replace("{}", "", 1) or "}" in prompt.replace("{}", "", 1):
        raise FacteditError(
            f"{where}: prompt {prompt!r} needs exactly one '{{}}' where the subject goes and no other braces"
        )


def fact_from_config(cfg) -> Fact:
    if not isinstance(cfg, (dict, DictConfig, Fact)):
        raise FacteditError(f"a fact must be a mapping with subject, prompt and target_new (got {shown(repr(cfg))})")
    if isinstance(cfg, DictConfig):
        unset = [key for key in ("subject", "prompt", "target_new") if OmegaConf.is_missing(cfg, key)]
        if unset:
            raise FacteditError(f"fact.{unset[0]} is not set: pass fact.{unset[0]}=... or pick fact=<name>")
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


def fact_texts(facts: list[Fact]) -> list[str]:
    """Every text an edit of `facts` runs: the prompts with their subject, and the probes."""
    return [text for fact in facts for text in (fact.text, *fact.generalization_probes, *fact.specificity_probes)]


def load_facts(path) -> list[Fact]:
    """Facts from a JSON or YAML file holding a list of fact mappings (or CounterFact records)."""
    path = Path(path)
    if not path.is_file():
        raise FacteditError(f"facts file {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else OmegaConf.to_container(OmegaConf.load(path))
    except (ValueError, OSError, OmegaConfBaseException, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FacteditError(f"cannot read facts file {path} ({reason}): give a JSON or YAML list of facts") from None
    if isinstance(data, (dict, DictConfig)):
        data = [data]
    if not isinstance(data, (list, ListConfig)):
        raise FacteditError(f"facts file {path} must hold a list of facts")
    if not data:
        raise FacteditError(f"facts file {path} holds no facts")
    facts = []
    for index, item in enumerate(data):
        if not isinstance(item, (dict, DictConfig)):
            raise FacteditError(f"facts file {path}: item {index} is {shown(repr(item))}, not a fact mapping "
                                "(subject, prompt, target_new) or a CounterFact record")  # fmt: skip
        facts.append(fact_from_config(_from_counterfact(item, index, path)))
    return facts


def _from_counterfact(item: dict, index: int, path) -> dict:
    """Accept CounterFact records (requested_rewrite) beside plain fact mappings."""
    if "requested_rewrite" not in item:
        return {"name": f"fact{index}", **item}
    rewrite = item["requested_rewrite"]
    try:
        return {
            "name": f"case{item.get('case_id', index)}",
            "subject": rewrite["subject"],
            "prompt": rewrite["prompt"],
            "target_new": rewrite["target_new"]["str"],
            "target_true": rewrite["target_true"]["str"],
            "generalization_probes": list(item.get("paraphrase_prompts", [])),
            "specificity_probes": list(item.get("neighborhood_prompts", []))[:3],
        }
    except (KeyError, TypeError) as error:
        raise FacteditError(f"facts file {path}: CounterFact record {index} has no requested_rewrite {error} "
                            "(needs subject, prompt, target_new.str, target_true.str)") from None  # fmt: skip
