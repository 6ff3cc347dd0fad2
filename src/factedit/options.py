"""The options of the four entry points, checked before any work: types, ranges, finite numbers, names.

Each entry point's composed config is read against one table (OPTIONS) of checks; the first bad
value is a one-line FacteditError `<key>=<value>: <what it must be>`. Editor hyperparameters are
checked by their own dataclasses (rome/hparams.py), which this module calls with the model's block
and the overrides, so `model.rome.layer=abc` is refused here as `editor.layer=abc` would be.
"""

import math
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from factedit.errors import FacteditError

_MISSING = object()


def _fail(key: str, value, must: str):
    raise FacteditError(f"{key}={shown(value)}: {must}")


def shown(value) -> str:
    """A value as it goes in a one-line message: strings as they are, other values as repr, cut at 60."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(low: int = 0, high: int | None = None, null: bool = False):
    """An integer in [low, high] (None: no upper bound); null allows `null`."""

    def check(key, value):
        if value is None and null:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f">= {low}"
            _fail(key, value, f"must be an integer {span}{' (or null)' if null else ''}")

    return check


def number(low: float = 0.0, high: float | None = None, open_low: bool = False, null: bool = False):
    """A finite number in [low, high] ((low, high] with open_low)."""

    def check(key, value):
        if value is None and null:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (open_low and value == low) or (high is not None and value > high):
            span = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            _fail(key, value, f"must be a finite number {span}")

    return check


def boolean(key, value):
    if not isinstance(value, bool):
        _fail(key, value, "use true or false")


def choice(*values, null: bool = False):
    def check(key, value):
        hashable = not isinstance(value, (list, dict, ListConfig, DictConfig))
        if not (value is None and null) and (not hashable or value not in values):
            _fail(key, value, f"use one of {', '.join(map(str, values))}")

    return check


def text(null: bool = True):
    """A string (or null)."""

    def check(key, value):
        if not (value is None and null) and (not isinstance(value, str) or not value.strip()):
            _fail(key, value, "must be a non-empty string")

    return check


def name(key, value):
    """A run name: one folder name under checkpoints/ or logs/, never a path (out_dir= takes paths)."""
    if value is None:
        return
    value = str(value)
    if not value.strip() or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        _fail(key, value, "a run is a folder name, not a path: use letters, digits, - and _ (or out_dir=PATH)")


def existing_file(null: bool = True):
    def check(key, value):
        if value is None and null:
            return
        if not isinstance(value, str) or not Path(value).is_file():
            _fail(key, value, "no such file: give the path of an existing file")

    return check


def saved_edits(also_under_checkpoints: bool):
    """A folder holding edits.safetensors, or such a file: as given (evaluate's edits=: or under checkpoints/)."""

    def check(key, value):
        from factedit.paths import CHECKPOINT_DIR

        if value is None:
            return
        places = [Path(str(value))] + ([CHECKPOINT_DIR / str(value)] if also_under_checkpoints else [])
        if not any((p / "edits.safetensors").is_file() or (p.is_file() and p.suffix == ".safetensors") for p in places):
            _fail(key, value, "no saved edits there: give checkpoints/<run> made by src/edit.py")

    return check


def devices(key, value):
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    if isinstance(value, (list, ListConfig)) and value and all(isinstance(v, int) and v >= 0 for v in value):
        return
    _fail(key, value, "use a number of devices >= 1, a list of device indices, or auto")


def layers(key, value):
    """null, one layer, or a list of layers (non-negative integers)."""
    values = value if isinstance(value, (list, tuple, ListConfig)) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if value is not None and (not values or bad):
        _fail(key, value, "give a layer index or a list of them, e.g. layers=[3,4,5]")


def kinds(key, value):
    allowed = ("hidden", "mlp", "attn")
    if not isinstance(value, (list, ListConfig)) or not value or any(v not in allowed for v in value):
        _fail(key, value, f"give a non-empty list of {', '.join(allowed)}, e.g. kinds=[hidden,mlp]")


def generation(key, value):
    """evaluate's gen: false, or its settings."""
    if value is False:
        return
    if not isinstance(value, (dict, DictConfig)):
        _fail(key, value, "use gen=false or set gen.max_tokens / gen.top_k / gen.prompts")
    for sub, check in (("max_tokens", integer(2, 2048)), ("top_k", integer(1)), ("prompts", integer(1, null=True))):
        check(f"{key}.{sub}", value.get(sub))


TRAINER = {
    "trainer.accelerator": choice("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.devices": devices,
    "trainer.num_nodes": integer(1, null=True),
    "trainer.precision": choice("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true", null=True),
}
STATS = {"stats.dir": text(), "stats.source": text(), "stats.tokens": integer(1, null=True), "stats.auto": boolean,
         "stats.auto_tokens": integer(1)}  # fmt: skip
COMMON = {"seed": integer(0, 2**32 - 1), **TRAINER}
PROBE = {"probe.top_k": integer(1, 100), "probe.max_new_tokens": integer(0, 1000)}
TRACE = {
    "samples": integer(1, 10_000),
    "noise": number(open_low=True),
    "noise_std_from": choice("subjects", "vocab"),
    "corruption": choice("noise", "replace"),
    "window": integer(1),
    "batch_size": integer(1),
    "min_prob": number(0.0, 1.0),
    "data.path": text(),
}  # causal tracing's settings (configs/trace.yaml)
OPTIONS = {
    "edit": {**COMMON, **STATS, **PROBE, "run": name, "out_dir": text(), "facts": existing_file(),
             "resume": saved_edits(False), "batch_size": integer(1, null=True), "revert": boolean,
             "save_model": boolean},
    "evaluate": {**COMMON, **STATS, "run": name, "out_dir": text(), "label": text(), "pre": boolean, "gen": generation,
                 "edits": saved_edits(True),
                 "sequential": boolean, "batch_size": integer(1), "checkpoint_every": integer(1),
                 "control_records": integer(0), "perplexity_tokens": integer(2), "generation_prompts": integer(0),
                 "generation_tokens": integer(2, 2048), "data.path": text(), "data.limit": integer(1, null=True),
                 "data.kind": choice("counterfact", "zsre")},
    "trace": {**COMMON, **TRACE, "mode": choice("single", "aggregate"), "kinds": kinds, "force": boolean,
              "threads": integer(1, null=True), "data.limit": integer(1), "out_dir": text()},
    "precompute_stats": {**COMMON, "layers": layers, "force": boolean, "stats_dir": text(), "report": boolean,
                         "report_subjects": integer(1), "report_max_tokens": integer(1, null=True),
                         "report_reference_source": choice("wiki_offline", "wikitext", "wikipedia", null=True),
                         "data.source": choice("wiki_offline", "wikitext", "wikipedia"),
                         "data.max_tokens": integer(1, null=True), "data.seq_len": integer(2, 1_000_000),
                         "data.batch_size": integer(1), "data.save_every": integer(0)},
    "app": {**COMMON, **STATS, **PROBE, **{f"trace.{key}": check for key, check in TRACE.items()},
            "host": text(null=False), "port": integer(1, 65535), "threads": integer(1, null=True),
            "checkpoints_dir": text()},
}  # fmt: skip


def validate(cfg: DictConfig, task: str) -> None:
    """Refuse the first bad option of `task`'s config (edit, evaluate, trace, precompute_stats, app) in one line."""
    for key, check in OPTIONS[task].items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if value is not _MISSING:
            check(key, value)
    _check_editor(cfg, task)
    if task == "edit" and cfg.get("revert") and not cfg.get("resume"):
        raise FacteditError("revert=true needs resume=checkpoints/<run>: the saved edits to revert")
    if task == "edit" and not cfg.get("revert"):
        from factedit.rome.facts import fact_from_config, load_facts

        load_facts(cfg.facts) if cfg.get("facts") else fact_from_config(cfg.fact)  # subject, prompt with one {}, object
    if task == "trace" and cfg.mode == "single":
        check_trace_fact(cfg.fact)


def check_trace_fact(fact: DictConfig) -> None:
    """A traced fact's subject and prompt are set; a prompt template holds one `{}` and no other brace (a
    prompt without braces holds the subject itself)."""
    from factedit.rome.facts import check_prompt

    for key in ("subject", "prompt"):
        missing = key not in fact or OmegaConf.is_missing(fact, key)
        if missing or not isinstance(fact[key], str) or not fact[key].strip():
            raise FacteditError(f"fact.{key} is not set: pick fact=<name> or pass fact.{key}=... on the command line")
    if "{}" in fact.prompt or "{" in fact.prompt or "}" in fact.prompt:  # else the prompt holds the subject itself
        check_prompt(fact.prompt, "fact")


def _check_editor(cfg: DictConfig, task: str) -> None:
    """ROME / MEMIT options as the editor will resolve them: the model's block, then editor.<option>."""
    from factedit.rome.hparams import KINDS, resolve_hparams

    editor = str(cfg.editor.get("name")) if "editor" in cfg else None
    for kind_name, kind in KINDS.items():
        block = cfg.model.get(kind_name)
        try:  # the model's block alone first, so that its errors name model.<block>.<option>
            resolve_hparams(None, None, model_rome=block, kind=kind)
        except FacteditError as error:
            raise FacteditError(str(error).replace("editor.", f"model.{kind_name}.", 1)) from None
        if task != "trace" and kind_name == editor:
            resolve_hparams(None, cfg.editor, model_rome=block, kind=kind)
